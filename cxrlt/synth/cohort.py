"""The cohort: patients, their studies and images, with IDs, dates and projections in the shapes
of the real PadChest / CXR-LT 2026 files, the train/test split and the extra Removal studies.

Facts mirrored (measured on the official files):

* ImageID = `<StudyID>_<suffix>.png`, so the ImageID without its last `_<suffix>.png` is the
  StudyID. StudyIDs come in three shapes: a random 128-bit number (35-39 digits, most of them);
  a repeat study of a patient, `<digits>_<n>` or `<digits>-<n>`, whose `<digits>` is often
  the patient's earlier study; and an older DICOM-UID export (`216840111366964...`, 45 digits,
  or a 22-digit `12752243133198...`) whose images are `<uid>_<dd>-<ddd>-<ddd>.png` (training
  only: the Task-1 test list has none). Image suffixes are 6 lowercase alphanumerics, a few
  `-` + 5 of them.
* PatientID: PadChest's exact patient number is a random 128-bit integer (35-39 digits,
  written in the metadata CSV); the challenge CSVs hold its lossy Excel form `"%.2E"`
  (`1.90E+38`), which many unrelated patients share. A few test images of different
  patients share (lossy PatientID, StudyDate) on purpose, as in the real test list.
* Training studies are mostly a PA + lateral pair or a single PA, some single AP /
  AP_horizontal frontals or lone laterals (~31% of training images lateral). The test list
  holds one FRONTAL image per study (PA ~93%, AP_horizontal ~6%, AP ~1%); about a third of
  test patients also have training studies.
* A second centre, NIH ChestX-ray14 (CXR-LT 2026's test list mixes PadChest and NIH images): a
  few patients (make_nih_cohort) with ImageIDs `<8-digit Patient ID>_<3-digit follow-up>.png`
  (`00000001_000.png`), every image its own visit, frontal only (PA ~60%, AP ~40%, like NIH),
  train and test patients disjoint; the CSVs hold the plain Patient ID. Their files are 8-bit
  PNGs of another size (square) and contrast, under NIH's `images_001/images/` folders.
"""

from __future__ import annotations

import datetime as dt
import random
import string
from dataclasses import dataclass, field

import numpy as np

from cxrlt.data.identity import FRONTAL
LATERAL = "L"
REMOVAL_FRACTION = 0.03  # extra training images listed in Removal.csv (whole studies)
STUDIES_PER_PATIENT = ([1, 2, 3, 4], [0.50, 0.27, 0.14, 0.09])  # training-only patients
P_TEST_PATIENT_HAS_TRAIN = 0.33  # a test patient also has training studies (real: 534/1606)
P_TWO_TEST_STUDIES = 0.01  # a test patient has two test images (real: 1620 images, 1606 patients)
TEST_DATE_CLASHES = 300  # one (lossy PatientID, date) group of 2 test studies per this many
# Projections of the images of a training study, with their probabilities (PA first).
TRAIN_COMPOSITIONS = [
    (("PA", "L"), 0.42), (("PA",), 0.47), (("AP_horizontal",), 0.055), (("AP",), 0.025),
    (("L",), 0.02), (("PA", "PA"), 0.01), (("PA", "L", "L"), 0.01), (("PA", "PA", "L"), 0.008),
    (("AP", "L"), 0.005),
]
TEST_PROJECTIONS = (("PA", "AP_horizontal", "AP"), (0.927, 0.062, 0.011))
# ViewPosition_DICOM as PadChest writes it per projection ("nan" where the tag was absent).
VIEW_POSITIONS = {
    "PA": (("POSTEROANTERIOR", "PA", "nan"), (0.45, 0.22, 0.33)),
    "L": (("LATERAL", "LL", "nan"), (0.35, 0.15, 0.50)),
    "AP": (("AP", "ANTEROPOSTERIOR", "nan"), (0.10, 0.10, 0.80)),
    "AP_horizontal": (("nan",), (1.0,)),
}
P_UID_STUDY = 0.2  # training studies with an older DICOM-UID StudyID
P_REPEAT_STUDY = 0.12  # later studies of a patient named `<first study digits>_<n>`
P_DASH_SUFFIX = 0.01  # image suffix `-` + 5 alnum instead of 6 alnum


@dataclass
class Patient:
    index: int  # distinct per real patient
    number: int  # PadChest's exact PatientID (metadata CSV); NIH: its Patient ID (1..30805)
    centre: str = "padchest"  # "padchest" | "nih" (cxrlt.data.identity.centre)

    @property
    def lossy(self) -> str:
        """The PatientID of the challenge CSVs: Excel's float form, shared by many patients."""
        return f"{self.number:.2E}"

    @property
    def csv_id(self) -> str:
        """The PatientID written in the CSVs: PadChest's lossy form; NIH's plain Patient ID."""
        return str(self.number) if self.centre == "nih" else self.lossy


@dataclass
class Image:
    image_id: str
    projection: str  # PA, AP, AP_horizontal or L
    view_position: str  # ViewPosition_DICOM

    @property
    def frontal(self) -> bool:
        return self.projection in FRONTAL


@dataclass
class Study:
    split: str  # "train" | "test" (a test study has one frontal image, in the test list)
    patient: Patient
    date: str  # yyyymmdd
    projections: tuple  # of its images, in order
    rank: int = 0  # order among the patient's studies by date (0 = first)
    study_id: str = ""
    images: list[Image] = field(default_factory=list)
    removed: bool = False  # an extra training study listed in Removal.csv
    labels: set = field(default_factory=set)
    distractor: int = -1  # index into patterns.DISTRACTORS, -1 = none

    @property
    def image_ids(self) -> list[str]:
        return [im.image_id for im in self.images]


class IdMaker:
    """Unique StudyIDs, ImageIDs and patient numbers in the real shapes."""

    ALNUM = string.ascii_lowercase + string.digits

    def __init__(self, rng: np.random.Generator, pyrng: random.Random):
        self.rng, self.py = rng, pyrng
        self.images: set[str] = set()
        self.studies: set[str] = set()
        self.numbers: set[int] = set()
        self.first_study: dict[int, str] = {}  # patient index -> digits of its first study

    def patient_number(self) -> int:
        """Uniform over 128 bits, like PadChest's (so 71% have 39 digits, 26% 38, ...)."""
        while (n := self.py.randrange(10 ** 30, 2 ** 128)) in self.numbers:
            pass
        self.numbers.add(n)
        return n

    def colliding_number(self, lossy: str) -> int:
        """Another patient number that rounds to the same "%.2E" string."""
        mant, exp = lossy.split("E")
        step = 10 ** (int(exp) - 2)  # one unit of the last printed digit
        centre = int(round(float(mant) * 100)) * step
        while True:
            n = self.py.randrange(centre - step // 2 + 1, centre + step // 2)
            if n not in self.numbers and f"{n:.2E}" == lossy:
                self.numbers.add(n)
                return n

    def name_study(self, st: Study) -> None:
        """Set st.study_id and its images' ImageIDs, projections and view positions."""
        uid = st.split == "train" and self.rng.random() < P_UID_STUDY
        first = self.first_study.get(st.patient.index)
        if uid:
            st.study_id = self._new_study(self._uid_digits)
        elif first is not None and self.rng.random() < P_REPEAT_STUDY:
            st.study_id = self._new_study(lambda: self._repeat_of(first))
        else:
            st.study_id = self._new_study(lambda: str(self.py.randrange(10 ** 30, 2 ** 128)))
            self.first_study.setdefault(st.patient.index, st.study_id)
        suffixes = self._uid_suffixes(len(st.projections)) if uid else None
        for i, proj in enumerate(st.projections):
            while True:
                suffix = suffixes[i] if uid else self._suffix()
                iid = f"{st.study_id}_{suffix}.png"
                if iid not in self.images:
                    break
            self.images.add(iid)
            names, p = VIEW_POSITIONS[proj]
            st.images.append(Image(iid, proj, str(self.rng.choice(names, p=p))))

    def _new_study(self, make) -> str:
        while (sid := make()) in self.studies:
            pass
        self.studies.add(sid)
        return sid

    def _uid_digits(self) -> str:
        if self.rng.random() < 0.1:
            return "12752243133198010" + self._digits(5)
        return "216840111366964" + self._digits(30)

    def _repeat_of(self, digits: str) -> str:
        n = int(self.rng.choice([2, 3, 4, 5], p=[0.85, 0.09, 0.03, 0.03]))
        return f"{digits}{'-' if self.rng.random() < 0.35 else '_'}{n}"

    def _uid_suffixes(self, k: int) -> list[str]:
        a, b = int(self.rng.integers(0, 5)), int(self.rng.integers(0, 1000))
        cs = sorted(self.rng.choice(1000, k, replace=False))
        return [f"{a:02d}-{b:03d}-{int(c):03d}" for c in cs]

    def _suffix(self) -> str:
        if self.rng.random() < P_DASH_SUFFIX:
            return "-" + self._alnum(5)
        return self._alnum(6)

    def _digits(self, n: int) -> str:
        return "".join(self.py.choice(string.digits) for _ in range(n))

    def _alnum(self, n: int) -> str:
        return "".join(self.py.choice(self.ALNUM) for _ in range(n))


def _dates(rng: np.random.Generator, k: int) -> list[str]:
    """k distinct sorted study dates (yyyymmdd) in 2009-2017."""
    d0, d1 = dt.date(2009, 1, 1).toordinal(), dt.date(2017, 12, 31).toordinal()
    days = sorted(rng.choice(d1 - d0 + 1, k, replace=False) + d0)
    return [dt.date.fromordinal(int(d)).strftime("%Y%m%d") for d in days]


def _train_composition(rng: np.random.Generator) -> tuple:
    comps, p = zip(*TRAIN_COMPOSITIONS)
    p = np.asarray(p) / sum(p)
    return comps[int(rng.choice(len(comps), p=p))]


def _patient_studies(rng, patient: Patient, splits: list[str]) -> list[Study]:
    """Studies of one patient on distinct dates, in random split order, ranked by date."""
    order = rng.permutation(len(splits))
    studies = []
    for rank, (i, date) in enumerate(zip(order, _dates(rng, len(splits)))):
        split = splits[i]
        if split == "test":
            proj = (str(rng.choice(TEST_PROJECTIONS[0], p=TEST_PROJECTIONS[1])),)
        else:
            proj = _train_composition(rng)
        studies.append(Study(split, patient, date, proj, rank))
    return studies


def make_cohort(ids: IdMaker, rng: np.random.Generator, n_train: int, n_test: int) -> list[Study]:
    """Test patients (n_test test images; a third also have training studies), then
    training-only patients until train.csv holds exactly n_train images."""
    studies: list[Study] = []
    patients: list[Patient] = []

    def new_patient() -> Patient:
        patients.append(Patient(len(patients), ids.patient_number()))
        return patients[-1]

    n_tests = 0
    while n_tests < n_test:
        k_test = 2 if n_test - n_tests >= 2 and rng.random() < P_TWO_TEST_STUDIES else 1
        k_train = 0
        if rng.random() < P_TEST_PATIENT_HAS_TRAIN:
            k_train = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
        studies += _patient_studies(rng, new_patient(), ["test"] * k_test + ["train"] * k_train)
        n_tests += k_test
    n_images = sum(len(s.projections) for s in studies if s.split == "train")
    while n_images < n_train:
        k = int(rng.choice(STUDIES_PER_PATIENT[0], p=STUDIES_PER_PATIENT[1]))
        studies += _patient_studies(rng, new_patient(), ["train"] * k)
        n_images += sum(len(s.projections) for s in studies[-k:])
    _trim_train(studies, n_train)
    for st in studies:
        ids.name_study(st)
    _test_date_clashes(ids, rng, studies)
    return studies


def _trim_train(studies: list[Study], n_train: int) -> None:
    """Drop trailing training images/studies (the last patients') down to exactly n_train."""
    extra = sum(len(s.projections) for s in studies if s.split == "train") - n_train
    for st in reversed(studies):
        if extra <= 0:
            break
        if st.split != "train":
            continue
        cut = min(extra, len(st.projections))
        st.projections = st.projections[:len(st.projections) - cut]
        extra -= cut
    studies[:] = [s for s in studies if s.projections]


def _test_date_clashes(ids: IdMaker, rng, studies: list[Study]) -> None:
    """Make a few pairs of test studies of DIFFERENT patients share (lossy PatientID, date), as
    3 groups do in the real test list: a key on (PatientID, StudyDate) would wrongly join
    them. Only patients with a single study take part; the second one's number is redrawn to
    collide with the first one's string."""
    n_studies: dict[int, int] = {}
    for s in studies:
        n_studies[s.patient.index] = n_studies.get(s.patient.index, 0) + 1
    tests = [s for s in studies if s.split == "test"]
    singles = [s for s in tests if n_studies[s.patient.index] == 1]
    n = max(1, round(len(tests) / TEST_DATE_CLASHES))
    pick = rng.permutation(len(singles))[:2 * n]
    for a, b in zip(pick[0::2], pick[1::2]):
        sa, sb = singles[a], singles[b]
        ids.numbers.discard(sb.patient.number)
        sb.patient.number = ids.colliding_number(sa.patient.lossy)
        sb.date = sa.date


def mark_removal(rng, studies: list[Study], n_train: int) -> None:
    """Flag whole training studies as extra Removal entries until ~REMOVAL_FRACTION of images."""
    target = max(1, round(REMOVAL_FRACTION * n_train))
    train = [s for s in studies if s.split == "train"]
    got = 0
    for i in rng.permutation(len(train)):
        if got >= target:
            break
        train[i].removed = True
        got += len(train[i].images)


# ---- the second centre: NIH ChestX-ray14 -----------------------------------------------------------
NIH_PATIENTS = 30805  # Patient IDs 1..30805, as in NIH's Data_Entry_2017.csv
NIH_FOLLOW_UPS = ([1, 2, 3], [0.6, 0.25, 0.15])  # images (visits) per patient
NIH_PROJECTIONS = (("PA", "AP"), (0.6, 0.4))
NIH_FOLDERS = 12  # images_001 .. images_012, consecutive Patient IDs


def nih_folder(image_id: str) -> str:
    """NIH's download folder of an image (`images_001/images`): the folders hold consecutive IDs."""
    k = 1 + (int(image_id[:8]) - 1) * NIH_FOLDERS // NIH_PATIENTS
    return f"images_{k:03d}/images"


def make_nih_cohort(rng: np.random.Generator, n_train: int, n_test: int, first_index: int) -> list[Study]:
    """Exactly n_train training and n_test test images of NIH-shaped patients (train and test
    patients disjoint), one study per image, patient indices from first_index on."""
    numbers = sorted(int(n) + 1 for n in rng.choice(NIH_PATIENTS, size=n_train + n_test + 1, replace=False))
    numbers = [numbers[i] for i in rng.permutation(len(numbers))]
    studies: list[Study] = []
    for split, n in (("test", n_test), ("train", n_train)):
        left = n
        while left > 0:
            k = min(left, int(rng.choice(NIH_FOLLOW_UPS[0], p=NIH_FOLLOW_UPS[1])))
            patient = Patient(first_index + len({s.patient.index for s in studies}), numbers.pop(), "nih")
            for rank, date in enumerate(_dates(rng, k)):
                proj = str(rng.choice(NIH_PROJECTIONS[0], p=NIH_PROJECTIONS[1]))
                st = Study(split, patient, date, (proj,), rank, study_id=f"{patient.number:08d}_{rank:03d}")
                st.images.append(Image(f"{st.study_id}.png", proj, proj))
                studies.append(st)
            left -= k
    return studies
