"""Tests of the synthetic demo dataset generator (cxrlt.synth).

One small dataset (160 train / 40 test images, sides 64-128 px) is generated once per module
and checked against the official CXR-LT 2026 files (excerpts in tests/data/), PadChest's ID
shapes and metadata layout, the label constraints, the images and the boxes. Cohort-level
facts that need many studies (proportions) are checked on cohorts built without images.
"""

from __future__ import annotations

import ast
import filecmp
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxrlt import synth
from cxrlt.core.errors import InputError
from cxrlt.core.labels import CXRLT2026_APPROX_COUNTS, CXRLT2026_LABELS, CXRLT2026_TOTAL_IMAGES
from cxrlt.synth import cohort, dataset, files, labelling, patterns, render
from cxrlt.data.tables import ID_COLUMNS

N_TRAIN, N_TEST, MIN_SIDE, MAX_SIDE = 160, 40, 64, 128
ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "tests" / "data"
FRONTAL = {"PA", "AP", "AP_horizontal"}

# PadChest's ImageID shapes; the StudyID is the ImageID without its last `_<suffix>.png`.
ID_SHAPES = {
    "plain": re.compile(r"^\d{30,39}_([a-z0-9]{6}|-[a-z0-9]{5})\.png$"),
    "repeat": re.compile(r"^\d{30,39}[_-]\d{1,2}_([a-z0-9]{6}|-[a-z0-9]{5})\.png$"),
    "uid": re.compile(r"^\d{20,45}_\d{2}-\d{3}-\d{3}\.png$"),
}
LOSSY_PATIENT_ID = re.compile(r"^[1-9]\.\d{2}E\+(2[89]|3[0-8])$")
# The second centre's images (cxrlt.synth.cohort.make_nih_cohort): NIH ChestX-ray14's ImageIDs.
NIH_ID = re.compile(r"^\d{8}_\d{3}\.png$")


def _is_nih(image_id: str) -> bool:
    return bool(NIH_ID.match(image_id))


def _path(root, image_id: str) -> Path:
    """Where an image is: PadChest-shaped under images/, NIH-shaped in NIH's images_NNN/images/."""
    if _is_nih(image_id):
        return root / "images" / cohort.nih_folder(image_id) / image_id
    return root / "images" / image_id


def _padchest(df: pd.DataFrame) -> pd.DataFrame:
    """The PadChest-shaped rows of a table (the facts of PadChest hold for them)."""
    return df[~df.ImageID.map(_is_nih)]


def _gen(out, **kw):
    args = dict(n_train=N_TRAIN, n_test=N_TEST, seed=0, min_side=MIN_SIDE, max_side=MAX_SIDE,
                workers=1, progress=False)
    args.update(kw)
    return synth.generate(out, **args)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """(root folder, summary) of the small dataset."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    return root, _gen(root)


@pytest.fixture(scope="module")
def big_cohort():
    """Studies of a default-size cohort (no images): 3000 train / 600 test images."""
    rng = np.random.default_rng([5, 1])
    studies = cohort.make_cohort(cohort.IdMaker(rng, random.Random(5)), rng, 3000, 600)
    cohort.mark_removal(rng, studies, 3000)
    return studies


def _csv(root, name):
    return pd.read_csv(root / name, dtype={"StudyDate_DICOM": str, "PatientID": str},
                       keep_default_na=False)


def _meta(root):
    return pd.read_csv(root / synth.META_NAME, dtype=str, keep_default_na=False)


def _study_of(image_id: str) -> str:
    if _is_nih(image_id):
        return image_id[:-4]  # every NIH image is a visit of its own
    return re.sub(r"_[^_]+\.png$", "", image_id)


def _windowed(path, side=64) -> np.ndarray:
    """Percentile window (0.5/99.5) then an area resize, as the demo cache does."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    lo, hi = np.percentile(img, [0.5, 99.5])
    x = np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1.0), 0, 1)
    return cv2.resize(x, (side, side), interpolation=cv2.INTER_AREA)


# ---- layout against the official files --------------------------------------------------------

def test_headers_match_the_official_files(ds):
    root, summary = ds
    assert not summary["skipped"]
    official = (OFFICIAL / "cxrlt2026_training_header.csv").read_text().splitlines()[0]
    for name in ("train.csv", "test_labels.csv"):
        assert (root / name).read_text().split("\n")[0] == official, name
    removal = (OFFICIAL / "cxrlt2026_removal_excerpt.csv").read_bytes()
    assert (root / "Removal.csv").read_bytes().split(b"\n")[0] == removal.split(b"\n")[0]
    train = _csv(root, "train.csv")
    assert len(train) == N_TRAIN and train.ImageID.is_unique
    assert train[CXRLT2026_LABELS].dtypes.map(lambda d: d.kind == "i").all()
    assert set(np.unique(train[CXRLT2026_LABELS].values)) <= {0, 1}
    assert not list(root.parent.glob(".demo.tmp-*"))  # temp folder renamed away


def test_test_list_and_removal_are_shaped_like_the_official_files(ds):
    root, _ = ds
    for name, excerpt in ((synth.TEST_LIST_NAME, "cxrlt2026_test_list_excerpt.csv"),
                          ("Removal.csv", "cxrlt2026_removal_excerpt.csv")):
        ours, real = (root / name).read_bytes(), (OFFICIAL / excerpt).read_bytes()
        assert ours.split(b"\n")[0] == real.split(b"\n")[0], name  # same header
        assert b"\r" not in ours and not ours.endswith(b"\n") and not real.endswith(b"\n")
        real_fields = [line.count(b",") for line in real.split(b"\n")]
        for line in ours.decode().split("\n")[1:]:
            fields = line.split(",")
            assert len(fields) - 1 == real_fields[1], (name, line)  # 30 empty columns in the list
            assert all(f == "" for f in fields[3:])
            assert re.fullmatch(r"\d{8}", fields[1])
            if _is_nih(fields[0]):
                assert re.fullmatch(r"[1-9]\d{0,4}", fields[2])  # NIH's plain Patient ID
            else:
                assert LOSSY_PATIENT_ID.match(fields[2])
    assert len(_csv(root, synth.TEST_LIST_NAME)) == N_TEST


def test_test_labels_follow_the_test_list(ds):
    root, _ = ds
    test_list, labels = _csv(root, synth.TEST_LIST_NAME), _csv(root, "test_labels.csv")
    assert labels.ImageID.tolist() == test_list.ImageID.tolist()
    assert labels.PatientID.tolist() == test_list.PatientID.tolist()


# ---- IDs, patients, metadata -------------------------------------------------------------------

def _shape(image_id: str) -> str | None:
    return next((k for k, rx in ID_SHAPES.items() if rx.match(image_id)), None)


def test_id_shapes_are_padchest_shapes_and_give_the_study_id(ds):
    real = pd.read_csv(OFFICIAL / "padchest_metadata_excerpt.csv", dtype=str)
    assert real.ImageID.map(_shape).notna().all()  # the shapes describe the real IDs...
    assert (real.ImageID.map(_study_of) == real.StudyID).all()  # ...and the StudyID rule
    root, _ = ds
    meta = _meta(root)
    shapes = meta.ImageID.map(_shape)
    assert shapes.notna().all(), meta.ImageID[shapes.isna()].tolist()
    assert (meta.ImageID.map(_study_of) == meta.StudyID).all()
    csv_ids = _padchest(pd.concat([_csv(root, "train.csv"), _csv(root, "test_labels.csv")])).ImageID
    assert sorted(meta.ImageID) == sorted(csv_ids)  # one metadata row per PadChest image


def test_cohort_id_shape_mix(big_cohort):
    images = [(st, im) for st in big_cohort for im in st.images]
    shapes = pd.Series([_shape(im.image_id) for _, im in images])
    assert shapes.notna().all()
    share = shapes.value_counts(normalize=True)
    assert share["plain"] > 0.6 and 0.08 < share["uid"] < 0.3 and 0.005 < share["repeat"] < 0.1
    assert not any(_shape(im.image_id) == "uid" for st, im in images if st.split == "test")
    digits = pd.Series([len(re.match(r"\d+", im.image_id)[0]) for _, im in images
                        if _shape(im.image_id) == "plain"]).value_counts(normalize=True)
    assert digits[39] > 0.6 and digits[38] > 0.15  # uniform 128-bit numbers, like PadChest's
    # a repeat study `<digits>_<n>` often continues the same patient's earlier study
    by_id = {st.study_id: st for st in big_cohort}
    repeats = [st for st in big_cohort if re.fullmatch(r"\d+[_-]\d+", st.study_id)]
    prefix_same_patient = [by_id.get(re.match(r"\d+", st.study_id)[0]) for st in repeats]
    assert all(p is None or p.patient is st.patient for p, st in zip(prefix_same_patient, repeats))
    assert sum(p is not None for p in prefix_same_patient) >= len(repeats) // 2


def test_patient_ids_exact_in_metadata_lossy_in_csvs(ds):
    root, summary = ds
    meta = _meta(root).set_index("ImageID")
    rows = _padchest(pd.concat([_csv(root, "train.csv"), _csv(root, synth.TEST_LIST_NAME)]))
    exact = rows.ImageID.map(meta.PatientID)
    assert exact.str.fullmatch(r"\d{30,39}").all()
    assert (rows.PatientID == exact.map(lambda n: f"{int(n):.2E}")).all()
    assert rows.PatientID.map(lambda s: bool(LOSSY_PATIENT_ID.match(s))).all()
    assert (rows.StudyDate_DICOM == rows.ImageID.map(meta.StudyDate_DICOM)).all()
    # unrelated patients collapse onto one lossy value
    per_value = pd.Series(exact.values, index=rows.PatientID.values).groupby(level=0).nunique()
    assert (per_value >= 2).sum() >= 3
    assert summary["n_patient_ids"] < summary["n_patients"]


def test_lossy_collisions_and_test_date_clash(big_cohort):
    patients = {st.patient.index: st.patient for st in big_cohort}
    per_value = pd.Series([p.lossy for p in patients.values()]).value_counts()
    assert per_value.max() >= 4 and (per_value >= 2).sum() > 50
    tests = [st for st in big_cohort if st.split == "test"]
    groups: dict = {}
    for st in tests:
        groups.setdefault((st.patient.lossy, st.date), []).append(st)
    clashes = [g for g in groups.values() if len({s.patient.index for s in g}) > 1]
    assert len(clashes) >= 2  # (PatientID, StudyDate) joins different patients' studies


def test_metadata_columns_and_values(ds):
    root, _ = ds
    header = (root / synth.META_NAME).read_text().split("\n")[0]
    assert header == ("ImageID,StudyID,PatientID,StudyDate_DICOM,Projection,ViewPosition_DICOM,"
                      "Labels,Report")
    meta = _meta(root)
    assert meta.ImageID.is_unique and meta.ImageID.is_monotonic_increasing
    views = {"PA": {"POSTEROANTERIOR", "PA", "nan"}, "L": {"LATERAL", "LL", "nan"},
             "AP": {"AP", "ANTEROPOSTERIOR", "nan"}, "AP_horizontal": {"nan"}}
    assert set(meta.Projection) <= set(views)
    assert all(v in views[p] for p, v in zip(meta.Projection, meta.ViewPosition_DICOM))
    # Labels / Report carry the true labels (which is why the pipeline must never read them)
    truth = pd.concat([_csv(root, "train.csv"), _csv(root, "test_labels.csv")]).set_index("ImageID")
    for iid, text, report in zip(meta.ImageID, meta.Labels, meta.Report):
        listed = ast.literal_eval(text)
        assert listed == [lab for lab in CXRLT2026_LABELS if truth.at[iid, lab] == 1]
        assert all(lab in report for lab in listed)


# ---- studies, projections, splits --------------------------------------------------------------

def test_training_studies_pair_pa_with_lateral(big_cohort):
    train = [st for st in big_cohort if st.split == "train"]
    projections = [im.projection for st in train for im in st.images]
    assert 0.27 < projections.count("L") / len(projections) < 0.35  # PadChest: ~31%
    comps = pd.Series(["+".join(im.projection for im in st.images) for st in train])
    share = comps.value_counts(normalize=True)
    assert share.index[0] in ("PA+L", "PA") and share["PA+L"] > 0.3
    assert share["AP_horizontal"] > 0.02 and share["AP"] > 0.01
    pairs = comps[comps.str.count(r"\+") == 1].value_counts(normalize=True)
    assert pairs["PA+L"] > 0.9  # a two-image study is a PA + lateral pair


def test_test_list_is_frontal_one_image_per_study(ds, big_cohort):
    root, _ = ds
    meta = _meta(root).set_index("ImageID")
    test_ids = _padchest(_csv(root, synth.TEST_LIST_NAME)).ImageID
    assert set(meta.loc[test_ids].Projection) <= FRONTAL
    studies = meta.loc[test_ids].StudyID
    assert studies.is_unique
    train_ids = _padchest(_csv(root, "train.csv")).ImageID
    assert not set(studies) & set(meta.loc[train_ids].StudyID)
    tests = [st for st in big_cohort if st.split == "test"]
    proj = pd.Series([st.images[0].projection for st in tests]).value_counts(normalize=True)
    assert all(len(st.images) == 1 for st in tests) and proj["PA"] > 0.85


def test_a_third_of_test_patients_have_kept_training_studies(big_cohort):
    test_patients = {st.patient.index for st in big_cohort if st.split == "test"}
    kept = {st.patient.index for st in big_cohort if st.split == "train" and not st.removed}
    assert 0.22 < len(test_patients & kept) / len(test_patients) < 0.45  # real: 534 / 1606


def test_removal_lists_test_images_plus_whole_training_studies(ds):
    root, summary = ds
    removal = _csv(root, "Removal.csv")
    assert list(removal.columns) == ID_COLUMNS and removal.ImageID.is_unique
    test_ids = set(_csv(root, synth.TEST_LIST_NAME).ImageID)
    train = _csv(root, "train.csv")
    extra = set(removal.ImageID) - test_ids
    assert test_ids <= set(removal.ImageID) and extra <= set(train.ImageID)
    assert 0.02 * N_TRAIN <= len(extra) <= 0.06 * N_TRAIN
    assert len(extra) == summary["n_removal_extra"]
    study = train.ImageID.map(_study_of)
    removed_studies = set(study[train.ImageID.isin(extra)])
    assert set(train.ImageID[study.isin(removed_studies)]) == extra  # whole studies
    merged = removal.merge(train[ID_COLUMNS], on="ImageID", suffixes=("", "_t"))
    assert (merged.PatientID == merged.PatientID_t).all()


# ---- labels ------------------------------------------------------------------------------------

def test_labels_shared_by_a_study_normal_exclusive_some_unlabelled(ds):
    root, summary = ds
    train = _csv(root, "train.csv")
    per_study = train.groupby(train.ImageID.map(_study_of))[CXRLT2026_LABELS].nunique()
    assert (per_study.max(axis=1) == 1).all()
    assert (train.groupby(train.ImageID.map(_study_of)).size() == 2).sum() > 10
    for name in ("train.csv", "test_labels.csv"):
        df = _csv(root, name)
        assert (df[CXRLT2026_LABELS[1:]].sum(axis=1)[df["Normal"] == 1] == 0).all()
    assert (train[CXRLT2026_LABELS].sum(axis=1) == 0).sum() > 0
    assert summary["n_unlabelled_images"] > 0


def test_minimum_positives_on_kept_frontal_images(ds):
    root, _ = ds
    removal = set(_csv(root, "Removal.csv").ImageID)
    projection = _meta(root).set_index("ImageID").Projection
    train = _csv(root, "train.csv")
    frontal = train.ImageID.map(projection).isin(FRONTAL) | train.ImageID.map(_is_nih)  # NIH: frontal only
    kept = train[~train.ImageID.isin(removal) & frontal]
    assert (kept[CXRLT2026_LABELS].sum() >= labelling.MIN_POS_TRAIN).all()
    test = _csv(root, "test_labels.csv")
    assert (test[CXRLT2026_LABELS].sum() >= labelling.MIN_POS_TEST).all()


def _labelled_cohort(n_patients=6000, studies_each=2):
    rng = np.random.default_rng(0)
    studies = []
    for i in range(n_patients):
        pat = cohort.Patient(i, 10 ** 38 + i)
        studies += [cohort.Study("train", pat, f"201{r}0101", ("PA",), r)
                    for r in range(studies_each)]
    labelling.sample_labels(rng, studies, CXRLT2026_LABELS)
    return studies


def test_label_profile_long_tail_and_correlations():
    """Marginals follow the CXR-LT profile; configured pairs co-occur more than chance."""
    studies = _labelled_cohort()
    y = pd.DataFrame([[lab in st.labels for lab in CXRLT2026_LABELS] for st in studies],
                     columns=CXRLT2026_LABELS)
    target = pd.Series(CXRLT2026_APPROX_COUNTS) / CXRLT2026_TOTAL_IMAGES
    rate = y.mean()
    for lab in CXRLT2026_LABELS:
        assert abs(rate[lab] - target[lab]) < 0.15 * target[lab] + 0.002, lab
    assert rate.idxmax() == "Normal"

    def lift(a, b):
        return y[a][y[b]].mean() / y[a].mean()

    assert lift("aortic elongation", "aortic atheromatosis") > 3
    assert lift("cardiomegaly", "pleural effusion") > 2
    assert lift("Support Devices", "sternotomy") > 5
    assert (y[CXRLT2026_LABELS[1:]].sum(axis=1)[y["Normal"]] == 0).all()


def test_findings_persist_across_a_patients_studies():
    """A patient's second study repeats the first one's chronic findings far above chance,
    acute ones less: what gives same-patient training labels their value."""
    studies = _labelled_cohort()
    first, second = studies[0::2], studies[1::2]

    def lift(lab):
        had = np.array([lab in s.labels for s in first])
        has = np.array([lab in s.labels for s in second])
        return has[had].mean() / has.mean()

    assert lift("sternotomy") > 10 and lift("Kyphosis") > 5
    assert lift("sternotomy") > lift("pleural effusion") > 1.5


# ---- images ------------------------------------------------------------------------------------

def test_png_format_sizes_and_windows(ds):
    root, summary = ds
    ids = _meta(root).ImageID.tolist()
    assert sorted(p.name for p in (root / "images").glob("*.png")) == sorted(ids)
    shapes, maxima = set(), []
    for iid in ids:
        img = cv2.imread(str(_path(root, iid)), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint16 and img.ndim == 2
        h, w = img.shape
        assert MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE and h != w
        shapes.add(img.shape)
        maxima.append(int(img.max()))
    assert len(shapes) > 50
    assert min(maxima) < 1024 and max(maxima) > 8192  # 10-bit .. 16-bit exports
    assert len(summary["inverted"]) == max(1, round(0.03 * (N_TRAIN + N_TEST)))


def test_inverted_images_have_bright_background(ds):
    root, summary = ds
    inverted = set(summary["inverted"])
    test_ids = _csv(root, "test_labels.csv").ImageID.tolist()[:10]
    for iid in sorted(inverted) + test_ids:
        x = _windowed(_path(root, iid))
        sides = np.concatenate([x[8:56, :2].ravel(), x[8:56, -2:].ravel()])  # air beside the body
        lungs = x[24:36, 20:44].ravel()  # lung fields of both views
        if iid in inverted:
            assert sides.mean() > lungs.mean(), iid
        else:
            assert sides.mean() < lungs.mean(), iid


def test_lateral_images_look_different(ds):
    """On a frontal image the mediastinum is a bright band between two dark lung fields; on a
    lateral one the superimposed lungs fill the middle of the chest."""
    root, summary = ds
    meta = _meta(root)
    meta = meta[~meta.ImageID.isin(summary["inverted"])]

    def mediastinal_contrast(iid):
        x = _windowed(_path(root, iid), 32)
        return x[10:16, 14:18].mean() - (x[10:16, 8:12].mean() + x[10:16, 20:24].mean()) / 2

    lat = [mediastinal_contrast(i) for i in meta.ImageID[meta.Projection == "L"]]
    front = [mediastinal_contrast(i) for i in meta.ImageID[meta.Projection.isin(FRONTAL)]]
    assert len(lat) > 20 and len(front) > 50
    assert np.percentile(lat, 90) < np.percentile(front, 10)


def test_label_patterns_visible_on_frontal_images_at_64px(ds):
    """Each finding's probe region is brighter (or darker) in positive frontal images than in
    negatives after percentile windowing and a 64-px resize (non-inverted images).

    Bright metal (wires, electrodes) moves the 99.5th percentile and so dims the whole image;
    to compare regions across images each one is re-scaled by its own 10th/90th percentiles,
    which small patterns hardly move.
    """
    root, summary = ds
    projection = _meta(root).set_index("ImageID").Projection
    df = pd.concat([_csv(root, "train.csv"), _csv(root, "test_labels.csv")])
    df = df[~df.ImageID.isin(summary["inverted"]) & df.ImageID.map(projection).isin(FRONTAL)]
    imgs = np.stack([_windowed(_path(root, i)) for i in df.ImageID])
    p10, p90 = np.percentile(imgs, [10, 90], axis=(1, 2), keepdims=True)
    imgs = (imgs - p10) / (p90 - p10)
    weak = []
    for lab, spec in patterns.patterns_for(CXRLT2026_LABELS).items():
        p, q, r, sign = spec.probe
        # chest coordinates ~ image coordinates (the chest is placed with small jitter only)
        y0, y1 = round((q - r) * 64), round((q + r) * 64)
        x0, x1 = round((p - r) * 64), round((p + r) * 64)
        region = imgs[:, y0:y1, x0:x1].mean(axis=(1, 2))
        pos = df[lab].to_numpy() == 1
        diff = sign * (region[pos].mean() - region[~pos].mean())
        if diff < 0.05:
            weak.append((lab, round(float(diff), 3)))
    assert not weak, weak


# ---- boxes -------------------------------------------------------------------------------------

def test_boxes_inside_images_and_on_positive_findings(ds):
    root, _ = ds
    boxes = pd.read_csv(root / synth.BOXES_NAME)
    assert list(boxes.columns) == ["ImageID", "label", "x0", "y0", "x1", "y1"]
    truth = pd.concat([_csv(root, "train.csv"), _csv(root, "test_labels.csv")]).set_index("ImageID")
    for row in boxes.itertuples():
        h, w = cv2.imread(str(_path(root, row.ImageID)), cv2.IMREAD_UNCHANGED).shape
        assert 0 <= row.x0 < row.x1 <= w and 0 <= row.y0 < row.y1 <= h, row
        assert truth.at[row.ImageID, row.label] == 1 and row.label != "Normal", row
    assert not boxes.duplicated(["ImageID", "label"]).any()
    # most positive findings are drawn (some are occult: label noise)
    projection = _meta(root).set_index("ImageID").Projection
    frontal = truth[truth.index.map(projection).isin(FRONTAL)][CXRLT2026_LABELS[1:]]
    n_pos = int(frontal.values.sum())
    n_box = int(boxes.ImageID.map(projection).isin(FRONTAL).sum())
    assert 0.8 * n_pos <= n_box <= n_pos


def _small_jobs(n_train=40, n_test=10, seed=2):
    rng = np.random.default_rng([seed, 1])
    studies = cohort.make_cohort(cohort.IdMaker(rng, random.Random(seed)), rng, n_train, n_test)
    labelling.sample_labels(rng, studies, CXRLT2026_LABELS)
    labelling.enforce_minimums(rng, studies, CXRLT2026_LABELS)
    labelling.add_distractors(rng, studies, len(patterns.DISTRACTORS))
    return dataset.image_jobs(rng, studies, CXRLT2026_LABELS, Path("unused"), seed, 64, 112)


def test_box_is_where_the_finding_changes_the_image():
    """Rendering a job without one of its findings changes the image inside that finding's
    box and nowhere else (random streams are per finding, so nothing else moves; except that
    free air under the diaphragm follows the diaphragm, which anatomy findings move)."""
    checked: dict = {}
    for job in _small_jobs():
        img, boxes = render.render_image(job)
        crescent = any(spec.kind == "crescent" for _, _, spec in job["findings"])
        for label, x0, y0, x1, y1 in boxes:
            if checked.get((job["view"], label), 0) >= 2:
                continue  # two of each are enough (and keep this test fast)
            without = dict(job, findings=[f for f in job["findings"] if f[1] != label])
            diff = np.abs(img.astype(np.int64) - render.render_image(without)[0]) > 0
            inside = np.zeros_like(diff)
            inside[y0:y1, x0:x1] = True
            assert diff[inside].mean() > 0.05, (job["image_id"], label)
            if not (crescent and patterns.PATTERNS[label].kind == "anatomy"):
                assert not diff[~inside].any(), (job["image_id"], label)
            checked[job["view"], label] = checked.get((job["view"], label), 0) + 1
    assert len({lab for _, lab in checked}) >= 25 and ("lateral", "cardiomegaly") in checked


def test_occult_and_hidden_findings_have_no_box():
    for job in _small_jobs(seed=3):
        drawn = {lab for lab, *_ in render.render_image(job)[1]}
        labelled = {lab for _, lab, _ in job["findings"] if lab is not None}
        assert drawn <= labelled
        if job["view"] == "lateral":
            assert "azygos lobe" not in drawn  # the azygos fissure does not show on a lateral


# ---- determinism, re-runs, errors, other label sets -------------------------------------------

def test_deterministic_across_runs_and_worker_counts(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _gen(one, n_train=40, n_test=10, seed=4)
    _gen(two, n_train=40, n_test=10, seed=4, workers=2)
    names = ["train.csv", synth.TEST_LIST_NAME, "Removal.csv", "test_labels.csv", synth.META_NAME,
             synth.BOXES_NAME, "dataset.json"]
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    pngs = sorted(str(p.relative_to(one / "images")) for p in (one / "images").rglob("*.png"))
    match, mismatch, errors = filecmp.cmpfiles(one / "images", two / "images", pngs, shallow=False)
    assert not mismatch and not errors and len(match) == 50


def test_existing_dataset_is_kept_unless_forced(tmp_path, capsys):
    out = tmp_path / "d"
    _gen(out, n_train=40, n_test=10)
    stamp = (out / "train.csv").stat().st_mtime_ns
    before = (out / "train.csv").read_bytes()
    again = _gen(out, n_train=40, n_test=10)
    assert again["skipped"] and "already holds a complete" in capsys.readouterr().out
    assert (out / "train.csv").stat().st_mtime_ns == stamp
    forced = _gen(out, n_train=40, n_test=10, seed=3, force=True)
    assert not forced["skipped"] and json.loads((out / "dataset.json").read_text())["seed"] == 3
    assert (out / "train.csv").read_bytes() != before  # another seed, another dataset
    assert not list(tmp_path.glob(".d.*"))  # no temp or old folder left behind
    marker = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps(dict(marker, format_version=1)))
    (out / synth.BOXES_NAME).unlink()  # an older generator's dataset: replaced, not kept
    assert not _gen(out, n_train=40, n_test=10)["skipped"] and (out / synth.BOXES_NAME).is_file()
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a complete demo dataset"):
        _gen(stray, n_train=40, n_test=10)
    assert (stray / "notes.txt").read_text() == "mine"


def test_labels_file_with_14_labels(tmp_path):
    nih = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
           "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
           "Pleural_Thickening", "Hernia"]
    lf = tmp_path / "nih.txt"
    lf.write_text("\n".join(nih) + "\n")
    out = tmp_path / "nih"
    rc = synth.main(["--out", str(out), "--n-train", "60", "--n-test", "12", "--min-side", "64",
                     "--max-side", "96", "--labels-file", str(lf), "--workers", "1"])
    assert rc == 0
    train = _csv(out, "train.csv")
    assert list(train.columns) == ID_COLUMNS + nih
    raw = (out / synth.TEST_LIST_NAME).read_text().split("\n")
    assert raw[0] == "ImageID,StudyDate_DICOM,PatientID" + "," * 14
    assert all(re.search(r"(E\+\d\d|^\d{8}_\d{3}\.png,\d{8},\d+),{14}$", line) for line in raw[1:])
    projection = _meta(out).set_index("ImageID").Projection
    removal = set(_csv(out, "Removal.csv").ImageID)
    frontal = train.ImageID.map(projection).isin(FRONTAL) | train.ImageID.map(_is_nih)
    kept = train[~train.ImageID.isin(removal) & frontal]
    assert (kept[nih].sum() >= labelling.MIN_POS_TRAIN).all()
    assert (_csv(out, "test_labels.csv")[nih].sum() >= labelling.MIN_POS_TEST).all()
    counts = train[nih].sum()
    assert counts.iloc[:3].mean() > counts.iloc[-3:].mean()  # generic long tail, file order
    assert set(pd.read_csv(out / synth.BOXES_NAME).label) <= set(nih)
    specs = patterns.patterns_for(nih)
    assert len({id(s) for s in specs.values()}) == 14  # one distinct pattern per label
    assert specs["Mass"] is patterns.PATTERNS["Mass"]
    assert specs["Effusion"] is patterns.PATTERNS["pleural effusion"]
    assert all(s.lateral is not None for s in specs.values())


def test_bad_input_raises_input_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a,b\nc\n")
    for args, needle in (
        (["--n-train", "5"], "--n-train"),
        (["--min-side", "100", "--max-side", "100"], "--min-side"),
        (["--seed", "-1"], "--seed"),
        (["--labels-file", str(bad)], "bad.txt"),
        (["--labels-file", str(tmp_path / "missing.txt")], "missing.txt"),
    ):
        with pytest.raises(InputError, match=re.escape(needle)):
            synth.main(["--out", str(tmp_path / "x"), *args])
    assert not (tmp_path / "x").exists()


def test_cli_bad_input_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cxrlt.synth", "--out", str(tmp_path / "x"),
                        "--n-test", "3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "--n-test" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_metadata_layout_constants_match_the_writer():
    assert files.META_COLUMNS[:6] == list(pd.read_csv(OFFICIAL / "padchest_metadata_excerpt.csv",
                                                      nrows=0).columns)
