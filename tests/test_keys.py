"""Study, patient and projection keys (cxrlt.data.identity), the metadata CSV reader (cxrlt.data.tables.read_meta_csv)
and the keys stored in a cache index, on real PadChest IDs.

tests/data/padchest_meta_sample.csv: 300 rows of PadChest's metadata (ImageID, StudyID, PatientID,
StudyDate_DICOM, Projection, ViewPosition_DICOM; no labels or reports) for images of the CXR-LT 2026
test list and Removal.csv, among them every image of 25 (PatientID, StudyDate) pairs that hold
images of different studies.
"""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrlt.data import identity
from cxrlt.data.cache import open_cache
from cxrlt.data.cache_build import build_test_cache, build_train_cache
from cxrlt.data.tables import META_COLUMNS, read_meta_csv
from cxrlt.core.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "padchest_meta_sample.csv"


def sample_rows() -> list[dict]:
    with open(SAMPLE, newline="") as f:
        return list(csv.DictReader(f))


def colliding_groups(rows) -> list[list[dict]]:
    """(PatientID, StudyDate) pairs whose images belong to more than one study."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["PatientID"], r["StudyDate_DICOM"])].append(r)
    return [g for g in groups.values() if len({r["StudyID"] for r in g}) > 1]


# ---- keys -------------------------------------------------------------------------------------------


def test_derived_study_key_is_the_padchest_study_id_on_every_row():
    rows = sample_rows()
    assert len(rows) == 300
    for r in rows:
        assert identity.is_padchest_id(r["ImageID"]), r["ImageID"]
        # whatever patient and date say: the ImageID alone gives the study
        assert identity.study_key(r["ImageID"], "1.90E+38", "20170101") == r["StudyID"], r["ImageID"]
    assert any("-" in r["StudyID"] for r in rows)  # IDs like 1131...374-3_1ud9by.png are covered


def test_images_sharing_patient_and_date_in_different_studies_get_different_keys():
    groups = colliding_groups(sample_rows())
    assert len(groups) == 25
    for g in groups:
        by_study = defaultdict(set)
        for r in g:
            by_study[r["StudyID"]].add(identity.study_key(r["ImageID"], r["PatientID"], r["StudyDate_DICOM"]))
        assert all(len(k) == 1 for k in by_study.values())  # one key per study ...
        assert len(set.union(*by_study.values())) == len(by_study)  # ... and a different one for each


def test_fallback_study_keys_and_blank_keys_are_their_own_study():
    assert identity.study_key("img1.png", "P1", "20200101") == "P1|20200101"
    assert identity.study_key("img2.png", "P1", "20200101") == "P1|20200101"  # same patient and day: one study
    blank = [identity.study_key(f"img{i}.png", "", "") for i in range(3)]
    assert blank == ["img0.png", "img1.png", "img2.png"]  # never one study of every keyless image
    assert identity.study_key("img4.png", "P1", " ") == "img4.png" and identity.study_key("img5.png", "", "2020") == "img5.png"
    assert not identity.is_padchest_id("12345_ab.png") and not identity.is_padchest_id("1" * 20 + ".png")


def test_patient_and_projection_rules():
    assert identity.patient_key("a.png", "1.90E+38", "18964122433871190702") == "18964122433871190702"
    assert identity.patient_key("a.png", "1.90E+38", "") == "1.90E+38"
    assert identity.patient_key("a.png", " ", "") == "a.png"
    assert [identity.projection(p) for p in ("PA", " L ", "UNK", "", "AP_horizontal")] == ["PA", "L", "", "", "AP_horizontal"]


def test_test_cache_key_follows_the_content_of_the_test_list_and_metadata(tmp_path):
    a, b, meta = tmp_path / "a.csv", tmp_path / "sub" / "b.csv", tmp_path / "meta.csv"
    b.parent.mkdir()
    a.write_text("ImageID\nx.png\ny.png\n")
    b.write_text("ImageID\nx.png\ny.png\n")
    meta.write_text(SAMPLE.read_text())
    k = identity.test_cache_key(a)
    assert len(k) == 12 and int(k, 16) >= 0
    assert identity.test_cache_key(b) == k  # content, not path
    assert identity.test_cache_key(a, meta) != k
    b.write_text("ImageID\nx.png\n")
    assert identity.test_cache_key(b) != k
    p = subprocess.run([sys.executable, "-m", "cxrlt.data.identity", str(a), str(meta)], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0 and p.stdout.strip() == identity.test_cache_key(a, meta)
    p = subprocess.run([sys.executable, "-m", "cxrlt.data.identity", str(tmp_path / "none.csv")], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {tmp_path / 'none.csv'}: file not found"


# ---- the metadata CSV -------------------------------------------------------------------------------


def write_meta(path: Path, rows: list[dict], extra=True) -> Path:
    """PadChest's layout: an unnamed index column first, the metadata, then Labels and Report."""
    header = ["", *META_COLUMNS] + (["Labels", "Report"] if extra else [])
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, r in enumerate(rows):
            w.writerow([i, *(r.get(c, "") for c in META_COLUMNS)]
                       + (["['pneumonia', 'secret']", "line one,\nline two \"quoted\""] if extra else []))
    return path


def test_meta_reader_reads_only_the_metadata_columns_plain_or_gz(tmp_path):
    rows = sample_rows()
    plain = read_meta_csv(write_meta(tmp_path / "m.csv", rows))
    gz = read_meta_csv(write_meta(tmp_path / "m.csv.gz", rows))
    assert list(plain.columns) == META_COLUMNS  # never Labels or Report
    assert plain.equals(gz) and len(plain) == 300
    assert plain["ImageID"].tolist() == [r["ImageID"] for r in rows]
    assert plain["PatientID"].iloc[0] == rows[0]["PatientID"]  # a 39-digit ID kept exactly, as text
    wanted = [rows[5]["ImageID"], rows[7]["ImageID"], "not_there.png"]
    sub = read_meta_csv(tmp_path / "m.csv", ids=wanted)
    assert sub["ImageID"].tolist() == wanted[:2] and sub.index.tolist() == [7, 9]  # spreadsheet rows
    minimal = tmp_path / "min.csv"
    minimal.write_text("ImageID,PatientID,Projection\na.png,P1,PA\n")
    assert read_meta_csv(minimal)[["StudyID", "StudyDate_DICOM"]].iloc[0].tolist() == ["", ""]


def test_meta_reader_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageID,patientid,Projection\na.png,1,PA\n")
    with pytest.raises(InputError, match=r"bad\.csv: row 1 \(header\): missing column 'PatientID'; found "
                                         r"'patientid'"):
        read_meta_csv(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("ImageID,PatientID,Projection\na.png,1,PA\nb.png,2,L\na.png,1,PA\n")
    with pytest.raises(InputError, match=r"dup\.csv: ImageID 'a.png' appears on rows 2, 4"):
        read_meta_csv(dup)
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(gzip.compress(SAMPLE.read_bytes())[:500])
    with pytest.raises(InputError) as e:
        read_meta_csv(broken)
    assert str(e.value).startswith(f"{broken}: not a readable CSV") and "\n" not in str(e.value)


# ---- keys in the cache ------------------------------------------------------------------------------


def test_cache_index_holds_exact_keys_from_the_metadata(tmp_path):
    """Real PadChest IDs, the official CSV's lossy PatientID: study = StudyID, patient = exact
    PatientID, projection from the metadata; images of different studies that share (lossy
    PatientID, date) stay apart."""
    rows = sample_rows()
    group = colliding_groups(rows)[0]
    others = [r for r in rows if r not in group][:6]
    picked = group + others
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for r in picked:
        cv2.imwrite(str(images / r["ImageID"]), rng.integers(0, 4000, (20, 24)).astype(np.uint16))
    train = picked[: len(picked) - 2]
    test = picked[len(picked) - 2:]
    lossy = lambda pid: f"{int(pid[0]) + 0.9:.2f}E+38"  # noqa: E731  the official CSV's form
    (tmp_path / "train.csv").write_text("ImageID,StudyDate_DICOM,PatientID,A,B\n" + "".join(
        f"{r['ImageID']},{r['StudyDate_DICOM']},{lossy(r['PatientID'])},{i % 2},{(i + 1) % 2}\n"
        for i, r in enumerate(train)))
    (tmp_path / "test.csv").write_text("ImageID,StudyDate_DICOM,PatientID\n" + "".join(
        f"{r['ImageID']},{r['StudyDate_DICOM']},{lossy(r['PatientID'])}\n" for r in test))
    meta = write_meta(tmp_path / "meta.csv.gz", rows)
    build_train_cache(tmp_path / "train.csv", images, tmp_path / "c/train", 16, meta_csv=meta, folds=2, workers=1)
    build_test_cache(tmp_path / "test.csv", images, tmp_path / "c/test", 16, meta_csv=meta, workers=1)
    truth = {r["ImageID"]: r for r in rows}
    for name in ("train", "test"):
        cache = open_cache(tmp_path / "c" / name)
        r = cache.rows()
        ids = cache.ids(r)
        assert cache.study_keys(r).tolist() == [truth[i]["StudyID"] for i in ids]
        # a test image's patient is the test list's own (META_CSV never re-identifies it: docs/rules.md)
        patient = (lambda i: truth[i]["PatientID"]) if name == "train" else (lambda i: lossy(truth[i]["PatientID"]))
        assert cache.patient_keys(r).tolist() == [patient(i) for i in ids]
        assert cache.projections(r).tolist() == [truth[i]["Projection"] for i in ids]
        assert cache.frontal(r).tolist() == [truth[i]["Projection"] in ("PA", "AP", "AP_horizontal") for i in ids]
        assert cache.has_projection
    cache = open_cache(tmp_path / "c/train")
    in_group = np.isin(cache.ids(cache.rows()), [r["ImageID"] for r in group])
    assert len(set(cache.study_keys(cache.rows())[in_group])) == len({r["StudyID"] for r in group}) > 1
