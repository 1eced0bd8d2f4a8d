"""Tests of the synthetic demo dataset generator (cxrlt.demo_data).

One small dataset (120 train / 30 test images, sides 64-128 px) is generated once per module
and checked against the CXR-LT 2026 file layout, the label constraints and the image format.
"""

from __future__ import annotations

import filecmp
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxrlt import demo_data
from cxrlt.errors import InputError
from cxrlt.labels import CXRLT2026_APPROX_COUNTS, CXRLT2026_LABELS, CXRLT2026_TOTAL_IMAGES
from cxrlt.tables import ID_COLUMNS

N_TRAIN, N_TEST, MIN_SIDE, MAX_SIDE = 120, 30, 64, 128
ROOT = Path(__file__).resolve().parents[1]

ID_SHAPES = {
    "39": re.compile(r"^\d{39}_[a-z0-9]{6}\.png$"),
    "38": re.compile(r"^\d{38}_[a-z0-9]{6}\.png$"),
    "45": re.compile(r"^\d{45}_\d{2}-\d{3}-\d{3}\.png$"),
    "2nd": re.compile(r"^\d{38,39}_2_[a-z0-9]{6}\.png$"),
}
PATIENT_ID = re.compile(r"^[1-9]\.\d{2}E\+3[5-8]$")


def _gen(out, **kw):
    args = dict(n_train=N_TRAIN, n_test=N_TEST, seed=0, min_side=MIN_SIDE, max_side=MAX_SIDE,
                workers=1, progress=False)
    args.update(kw)
    return demo_data.generate(out, **args)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """(root folder, summary) of the small dataset."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    summary = _gen(root)
    return root, summary


def _csv(root, name):
    return pd.read_csv(root / name, dtype={"StudyDate_DICOM": str, "PatientID": str})


def _study(image_id: str) -> str:
    return image_id.split("_")[0]


def _windowed64(path) -> np.ndarray:
    """Percentile window (0.5/99.5) then 64x64 area resize, as the demo cache does."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    lo, hi = np.percentile(img, [0.5, 99.5])
    x = np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1.0), 0, 1)
    return cv2.resize(x, (64, 64), interpolation=cv2.INTER_AREA)


# ---- CSV layout -----------------------------------------------------------------------------

def test_files_and_headers(ds):
    root, summary = ds
    assert not summary["skipped"]
    for name in ("train.csv", "CXRLT_2026_TEST_ALL_TASK1.csv", "Removal.csv", "test_labels.csv",
                 "dataset.json"):
        assert (root / name).is_file(), name
    expected = ",".join(ID_COLUMNS + CXRLT2026_LABELS)
    for name in ("train.csv", "test_labels.csv"):
        assert (root / name).read_text().split("\n")[0] == expected
    assert (root / "Removal.csv").read_text().split("\n")[0] == "ImageID,StudyDate_DICOM,PatientID"
    train = _csv(root, "train.csv")
    assert len(train) == N_TRAIN
    assert set(np.unique(train[CXRLT2026_LABELS].values)) <= {0, 1}
    assert train[CXRLT2026_LABELS].dtypes.map(lambda d: d.kind == "i").all()
    assert train.ImageID.is_unique
    assert not list(root.parent.glob(".demo.tmp-*"))  # temp folder renamed away


def test_test_list_has_30_empty_trailing_columns(ds):
    root, _ = ds
    raw = (root / "CXRLT_2026_TEST_ALL_TASK1.csv").read_bytes()
    assert b"\r" not in raw
    assert not raw.endswith(b"\n")  # like the real file: no newline after the last row
    lines = raw.decode().split("\n")
    assert lines[0] == "ImageID,StudyDate_DICOM,PatientID" + "," * 30
    assert len(lines) == N_TEST + 1
    for line in lines[1:]:
        fields = line.split(",")
        assert len(fields) == 33 and fields[3:] == [""] * 30, line
        assert line.endswith(",,,,,,,,,,,,,,,,,,,,,,,,,,,,,,") and not line.endswith(",,,,," * 7)
        assert PATIENT_ID.match(fields[2]) and re.fullmatch(r"\d{8}", fields[1])


def test_image_id_shapes_and_studies(ds):
    root, _ = ds
    df = pd.concat([_csv(root, "train.csv"), _csv(root, "test_labels.csv")])
    shape = df.ImageID.map(lambda i: next((k for k, rx in ID_SHAPES.items() if rx.match(i)), None))
    assert shape.notna().all(), df.ImageID[shape.isna()].tolist()
    assert (shape == "39").mean() > 0.6  # mostly the standard shape
    assert {"38", "45"} <= set(shape)  # plus the real variants
    # images of one study share PatientID and date; some studies have 2-3 images
    per_study = df.groupby(df.ImageID.map(_study)).agg(
        n=("ImageID", "size"), pids=("PatientID", "nunique"), dates=("StudyDate_DICOM", "nunique"))
    assert (per_study.pids == 1).all() and (per_study.dates == 1).all()
    assert (per_study.n >= 2).mean() > 0.3 and per_study.n.max() <= 3
    years = df.StudyDate_DICOM.str[:4].astype(int)
    assert years.between(2009, 2017).all()
    pd.to_datetime(df.StudyDate_DICOM, format="%Y%m%d")  # all valid dates


def test_patient_ids_excel_float_form_with_collisions(ds):
    root, summary = ds
    df = pd.concat([_csv(root, "train.csv"), _csv(root, "test_labels.csv")])
    assert df.PatientID.map(lambda s: bool(PATIENT_ID.match(s))).all()
    studies_per_pid = df.groupby("PatientID").ImageID.apply(lambda s: s.map(_study).nunique())
    assert (studies_per_pid >= 2).sum() >= 5  # several studies per patient
    assert summary["n_patient_ids"] < summary["n_patients"]  # distinct patients collide


def test_patients_never_span_train_and_test(ds):
    root, _ = ds
    train, test = _csv(root, "train.csv"), _csv(root, "CXRLT_2026_TEST_ALL_TASK1.csv")
    assert not set(train.PatientID) & set(test.PatientID)
    assert not set(train.ImageID) & set(test.ImageID)


def test_removal_lists_all_test_images_plus_train_extras(ds):
    root, summary = ds
    removal = _csv(root, "Removal.csv")
    assert list(removal.columns) == ID_COLUMNS and removal.ImageID.is_unique
    test_ids = set(_csv(root, "CXRLT_2026_TEST_ALL_TASK1.csv").ImageID)
    train = _csv(root, "train.csv")
    extra = set(removal.ImageID) - test_ids
    assert test_ids <= set(removal.ImageID)
    assert extra <= set(train.ImageID)
    assert 0.02 * N_TRAIN <= len(extra) <= 0.06 * N_TRAIN
    assert len(extra) == summary["n_removal_extra"]
    # ID columns agree with train.csv for the extras
    merged = removal.merge(train[ID_COLUMNS], on="ImageID", suffixes=("", "_t"))
    assert len(merged) == len(extra)
    assert (merged.PatientID == merged.PatientID_t).all()


def test_test_labels_match_test_list(ds):
    root, _ = ds
    test_list = _csv(root, "CXRLT_2026_TEST_ALL_TASK1.csv")
    labels = _csv(root, "test_labels.csv")
    assert labels.ImageID.tolist() == test_list.ImageID.tolist()
    assert (labels.PatientID == test_list.PatientID).all()


# ---- labels ---------------------------------------------------------------------------------

def test_normal_exclusive_and_some_unlabelled(ds):
    root, summary = ds
    for name in ("train.csv", "test_labels.csv"):
        df = _csv(root, name)
        findings = df[CXRLT2026_LABELS[1:]].sum(axis=1)
        assert (findings[df["Normal"] == 1] == 0).all()
    train = _csv(root, "train.csv")
    assert (train[CXRLT2026_LABELS].sum(axis=1) == 0).sum() > 0
    assert summary["n_unlabelled_images"] > 0


def test_minimum_positives_after_removal(ds):
    root, _ = ds
    removal = set(_csv(root, "Removal.csv").ImageID)
    train = _csv(root, "train.csv")
    kept = train[~train.ImageID.isin(removal)]
    assert (kept[CXRLT2026_LABELS].sum() >= demo_data.MIN_POS_TRAIN).all()
    assert (_csv(root, "test_labels.csv")[CXRLT2026_LABELS].sum() >= demo_data.MIN_POS_TEST).all()
    # study images share labels
    per_study = train.groupby(train.ImageID.map(_study))[CXRLT2026_LABELS].nunique()
    assert (per_study.max(axis=1) == 1).all()


def test_label_profile_long_tail_and_correlations():
    """Label sampling on many studies (no images): marginals follow the CXR-LT profile and
    the configured pairs co-occur more than chance."""
    rng = np.random.default_rng(0)
    studies = [demo_data.Study("train", "1.00E+38", i, "20100101", ["x"]) for i in range(20000)]
    demo_data._sample_labels(rng, studies, CXRLT2026_LABELS)
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
    assert lift("central venous catheter", "sternotomy") > 3
    assert (y[CXRLT2026_LABELS[1:]].sum(axis=1)[y["Normal"]] == 0).all()


# ---- images ---------------------------------------------------------------------------------

def test_png_format_sizes_and_windows(ds):
    root, summary = ds
    ids = _csv(root, "train.csv").ImageID.tolist() + _csv(root, "test_labels.csv").ImageID.tolist()
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(ids)
    shapes, maxima = set(), []
    for iid in ids:
        img = cv2.imread(str(root / "images" / iid), cv2.IMREAD_UNCHANGED)
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
        x = _windowed64(root / "images" / iid)
        sides = np.concatenate([x[8:56, :2].ravel(), x[8:56, -2:].ravel()])  # air beside the body
        lungs = np.concatenate([x[24:36, 14:22].ravel(), x[24:36, 42:50].ravel()])
        if iid in inverted:
            assert sides.mean() > lungs.mean(), iid
        else:
            assert sides.mean() < lungs.mean(), iid


def test_label_patterns_visible_after_windowing_at_64px(ds):
    """Each finding's probe region is brighter (or darker) in positives than in negatives
    after percentile windowing and a 64-px resize (non-inverted images).

    Bright metal (wires, electrodes) moves the 99.5th percentile and so dims the whole image;
    to compare regions across images each one is re-scaled by its own 10th/90th percentiles,
    which small patterns hardly move.
    """
    root, summary = ds
    df = pd.concat([_csv(root, "train.csv"), _csv(root, "test_labels.csv")])
    df = df[~df.ImageID.isin(summary["inverted"])].reset_index(drop=True)
    imgs = np.stack([_windowed64(root / "images" / i) for i in df.ImageID])
    p10, p90 = np.percentile(imgs, [10, 90], axis=(1, 2), keepdims=True)
    imgs = (imgs - p10) / (p90 - p10)
    specs = demo_data.patterns_for(CXRLT2026_LABELS)
    weak = []
    for lab, spec in specs.items():
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


# ---- determinism, re-runs, errors, other label sets --------------------------------------

def test_deterministic_across_runs_and_worker_counts(ds, tmp_path):
    root, _ = ds
    again = tmp_path / "again"
    _gen(again, workers=2)
    names = ["train.csv", "CXRLT_2026_TEST_ALL_TASK1.csv", "Removal.csv", "test_labels.csv",
             "dataset.json"]
    for name in names:
        assert (root / name).read_bytes() == (again / name).read_bytes(), name
    pngs = sorted(p.name for p in (root / "images").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(root / "images", again / "images", pngs,
                                               shallow=False)
    assert not mismatch and not errors and len(match) == N_TRAIN + N_TEST


def test_existing_dataset_is_kept_unless_forced(ds, tmp_path, capsys):
    root, _ = ds
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
    rc = demo_data.main(["--out", str(out), "--n-train", "60", "--n-test", "12", "--min-side",
                         "64", "--max-side", "96", "--labels-file", str(lf), "--workers", "1"])
    assert rc == 0
    train = _csv(out, "train.csv")
    assert list(train.columns) == ID_COLUMNS + nih
    raw = (out / "CXRLT_2026_TEST_ALL_TASK1.csv").read_text().split("\n")
    assert raw[0] == "ImageID,StudyDate_DICOM,PatientID" + "," * 14
    assert all(line.endswith("E+38" + "," * 14) or line.endswith("E+37" + "," * 14)
               or line.endswith("E+36" + "," * 14) for line in raw[1:])
    removal = set(_csv(out, "Removal.csv").ImageID)
    kept = train[~train.ImageID.isin(removal)]
    assert (kept[nih].sum() >= demo_data.MIN_POS_TRAIN).all()
    assert (_csv(out, "test_labels.csv")[nih].sum() >= demo_data.MIN_POS_TEST).all()
    counts = kept[nih].sum()
    assert counts.iloc[:3].mean() > counts.iloc[-3:].mean()  # generic long tail, file order
    specs = demo_data.patterns_for(nih)
    assert len({id(s) for s in specs.values()}) == 14  # one distinct pattern per label
    assert specs["Mass"] is demo_data.PATTERNS["Mass"]
    assert specs["Effusion"] is demo_data.PATTERNS["pleural effusion"]


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
            demo_data.main(["--out", str(tmp_path / "x"), *args])
    assert not (tmp_path / "x").exists()


def test_cli_bad_input_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cxrlt.demo_data", "--out", str(tmp_path / "x"),
                        "--n-test", "3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "--n-test" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
