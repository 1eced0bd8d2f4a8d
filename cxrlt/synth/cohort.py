"""The cohort: patients, their studies and images, with ImageIDs, PatientIDs and dates in the
shapes of the real files, the train/test split and the extra Removal studies."""

from __future__ import annotations

import datetime as dt
import random
import string
from dataclasses import dataclass, field

import numpy as np

REMOVAL_FRACTION = 0.03  # extra training images listed in Removal.csv
COLLISION_RATE = 0.04  # PatientID strings shared by two distinct patients
# Study/image structure (probabilities): images per study, studies per patient.
IMAGES_PER_STUDY = ([1, 2, 3], [0.30, 0.60, 0.10])
STUDIES_PER_PATIENT = ([1, 2, 3, 4], [0.50, 0.27, 0.14, 0.09])


@dataclass
class Study:
    split: str  # "train" | "test"
    patient_id: str  # Excel float form, shared by colliding patients
    patient: int  # internal patient number (distinct per real patient)
    date: str  # yyyymmdd
    image_ids: list[str]
    removed: bool = False  # an extra training study listed in Removal.csv
    labels: set = field(default_factory=set)
    distractor: int = -1  # index into DISTRACTORS, -1 = none


class IdMaker:
    """Unique ImageIDs and PatientID strings in the real shapes."""

    ALNUM = string.ascii_lowercase + string.digits

    def __init__(self, rng: np.random.Generator, pyrng: random.Random):
        self.rng, self.py = rng, pyrng
        self.images: set[str] = set()
        self.studies: set[str] = set()
        self.patient_ids: set[str] = set()

    def patient_id(self) -> str:
        """A new PatientID string: "%.2E" of a random 128-bit patient number."""
        while True:
            s = f"{self.py.randrange(10 ** 37, 2 ** 128):.2E}"
            if s not in self.patient_ids:
                self.patient_ids.add(s)
                return s

    def study_images(self, n: int) -> list[str]:
        r = self.rng.random()
        if r < 0.05:  # older export: 45-digit UID + series-number suffix
            while (sid := self._digits(45)) in self.studies:
                pass
            self.studies.add(sid)
            a, b = self.rng.integers(0, 2), self.rng.integers(0, 1000)
            c = int(self.rng.integers(0, 900))
            ids = []
            for _ in range(n):
                c += int(self.rng.integers(1, 6))
                ids.append(f"{sid}_{a:02d}-{b:03d}-{c:03d}.png")
            self.images.update(ids)
            return ids
        ndig = 38 if r < 0.13 else 39
        while (sid := self._digits(ndig)) in self.studies:
            pass
        self.studies.add(sid)
        ids = []
        for i in range(n):
            mid = "_2" if (i > 0 and self.rng.random() < 0.08) else ""
            while (iid := f"{sid}{mid}_{self._alnum(6)}.png") in self.images:
                pass
            self.images.add(iid)
            ids.append(iid)
        return ids

    def _digits(self, n: int) -> str:
        return str(self.py.randrange(10 ** (n - 1), 10 ** n))

    def _alnum(self, n: int) -> str:
        return "".join(self.py.choice(self.ALNUM) for _ in range(n))


def random_date(rng: np.random.Generator) -> str:
    d0, d1 = dt.date(2009, 1, 1).toordinal(), dt.date(2017, 12, 31).toordinal()
    return dt.date.fromordinal(int(rng.integers(d0, d1 + 1))).strftime("%Y%m%d")


def make_split(ids: IdMaker, rng, split: str, n_images: int, first_patient: int) -> list[Study]:
    """Whole PatientID groups (1 patient, or 2 colliding ones) until exactly n_images images."""
    studies: list[Study] = []
    left = n_images
    patient = first_patient
    while left > 0:
        pid = ids.patient_id()
        # a collision: a second, distinct patient whose number rounds to the same "%.2E" string
        for _ in range(2 if rng.random() < COLLISION_RATE else 1):
            for _ in range(int(rng.choice(STUDIES_PER_PATIENT[0], p=STUDIES_PER_PATIENT[1]))):
                k = min(left, int(rng.choice(IMAGES_PER_STUDY[0], p=IMAGES_PER_STUDY[1])))
                if k == 0:
                    break
                studies.append(Study(split, pid, patient, random_date(rng), ids.study_images(k)))
                left -= k
            patient += 1
    return studies


def mark_removal(rng, studies: list[Study], n_train: int) -> None:
    """Flag whole training studies as extra Removal entries until ~REMOVAL_FRACTION of images."""
    target = max(1, round(REMOVAL_FRACTION * n_train))
    train = [s for s in studies if s.split == "train"]
    got = 0
    for i in rng.permutation(len(train)):
        if got >= target:
            break
        train[i].removed = True
        got += len(train[i].image_ids)
