"""Readers of the public chest X-ray datasets in their native layout (cxrlt.data.external) and the
train caches built from them (cache_build.build_external_cache, preprocess.py external)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrlt.core.errors import InputError
from cxrlt.data import external
from cxrlt.data.cache import open_cache
from cxrlt.data.cache_build import build_external_cache

SIZE = 16


def _png(path: Path, value: int = 100, alpha: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((20, 24), value, np.uint8)
    img[:5, :5] = 255 - value
    if alpha:
        img = np.dstack([img, img, img, np.full_like(img, 7)])  # BGRA, alpha must not leak into gray
    assert cv2.imwrite(str(path), img)


def _jpg(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((20, 24), value, np.uint8)
    assert cv2.imwrite(str(path), img)


def _write(path: Path, text: str, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


# ---- NIH -------------------------------------------------------------------------------------------------


def _nih(tmp_path: Path, missing: bool = False) -> Path:
    d = tmp_path / "nih"
    rows = [("00000001_000.png", "Cardiomegaly|Effusion", "0", "1", "PA"),
            ("00000001_001.png", "No Finding", "1", "1", "AP"),
            ("00000002_000.png", "No Finding|Hernia", "0", "2", "PA"),  # No Finding with a finding
            ("00000003_000.png", "Nodule", "0", "3", "LL"),  # a lateral view
            ("00000004_000.png", "Mass", "0", "4", "PA")]
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position," \
             "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
    # the real file's header has unbalanced brackets with commas in them: 11 fields
    text = header + "".join(f"{i},{f},{u},{p},58,M,{v},2682,2749,0.143,0.143\n" for i, f, u, p, v in rows)
    _write(d / "Data_Entry_2017_v2020.csv", text)
    _write(d / "test_list.txt", "00000004_000.png\n")
    for k, (name, *_rest) in enumerate(rows):
        if missing and k == 4:
            continue
        _png(d / f"images_00{k % 2 + 1}" / "images" / name, value=40 * k + 20, alpha=(k == 1))
    return d


def test_nih_labels_keys_and_split(tmp_path):
    ext = external.read_dataset("nih", _nih(tmp_path))
    f = ext.frame
    assert ext.labels == external.NIH_LABELS
    assert f["ImageID"].tolist()[:2] == ["images_001/images/00000001_000.png", "images_002/images/00000001_001.png"]
    y = f[ext.labels].astype(float).to_numpy()
    j = {lab: k for k, lab in enumerate(ext.labels)}
    assert y[0, j["Cardiomegaly"]] == 1 and y[0, j["Effusion"]] == 1 and y[0].sum() == 2
    assert y[1, j["No Finding"]] == 1 and y[1].sum() == 1
    assert y[2, j["Hernia"]] == 1 and y[2, j["No Finding"]] == 0  # a finding beats No Finding
    assert f["projection"].tolist() == ["PA", "AP", "PA", "L", "PA"]
    assert f["study"].tolist()[:2] == ["1|0", "1|1"] and f["patient"].tolist()[:2] == ["1", "1"]
    assert f["official"].tolist() == ["train"] * 4 + ["test"]


def test_nih_cache_decodes_alpha_and_reports_missing(tmp_path):
    d = _nih(tmp_path)
    m = build_external_cache("nih", d, tmp_path / "cache" / "train", SIZE, folds=2, workers=1)
    c = open_cache(tmp_path / "cache" / "train")
    assert m["dataset"] == "nih" and c.labels == external.NIH_LABELS and len(c.index) == 5
    row = c.index["row"][c.index["ImageID"] == "images_002/images/00000001_001.png"].iloc[0]
    img = np.asarray(c.images[row])
    assert img.max() == 255 - 60 and img.min() == 60  # gray of the colour channels, alpha (7) ignored
    assert not np.isnan(c.targets(c.rows())).any()
    dropped = build_external_cache("nih", d, tmp_path / "cache2" / "train", SIZE, folds=2, workers=1,
                                   official_test="drop")
    assert dropped["counts"]["images"] == 4 and dropped["removed"] == 1
    d2 = _nih(tmp_path / "b", missing=True)
    with pytest.raises(InputError, match="00000004_000.png.*not found|not found.*00000004_000.png"):
        build_external_cache("nih", d2, tmp_path / "c3" / "train", SIZE, folds=2, workers=1)
    m = build_external_cache("nih", d2, tmp_path / "c3" / "train", SIZE, folds=2, workers=1, skip_bad=True)
    assert m["counts"]["failed"] == 1 and m["counts"]["images"] == 4


def test_nih_unknown_finding_names_row(tmp_path):
    d = _nih(tmp_path)
    p = d / "Data_Entry_2017_v2020.csv"
    p.write_text(p.read_text().replace("Nodule", "Nodules"))
    with pytest.raises(InputError, match=r"row 5, column 'Finding Labels': unknown finding 'Nodules'"):
        external.read_dataset("nih", d)


# ---- CheXpert --------------------------------------------------------------------------------------------


def _chexpert(tmp_path: Path) -> Path:
    d = tmp_path / "CheXpert-v1.0-small"
    labs = external.CHEXPERT_LABELS
    head = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(labs) + "\n"

    def line(path, fl, ap, vals):
        cells = [""] * len(labs)
        for k, v in vals.items():
            cells[labs.index(k)] = v
        return f"{path},Female,68,{fl},{ap}," + ",".join(cells) + "\n"

    train = head + line("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP",
                        {"No Finding": "1.0", "Support Devices": "1.0"}) \
        + line("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", "Frontal", "PA",
               {"Edema": "-1.0", "Cardiomegaly": "1.0", "Pneumonia": "0.0"}) \
        + line("CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg", "Lateral", "",
               {"Edema": "-1.0", "Cardiomegaly": "1.0", "Pneumonia": "0.0"})
    valid = head + line("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP",
                        {k: "0.0" for k in labs} | {"Edema": "1.0"})
    _write(d / "train.csv", train)
    _write(d / "valid.csv", valid)
    for k, rel in enumerate(["train/patient00001/study1/view1_frontal.jpg", "train/patient00002/study2/view1_frontal.jpg",
                             "train/patient00002/study2/view2_lateral.jpg", "valid/patient64541/study1/view1_frontal.jpg"]):
        _jpg(d / rel, 30 + 40 * k)
    return d


@pytest.mark.parametrize("uncertain,blank,edema,pneumothorax", [
    ("ones", "zeros", 1.0, 0.0), ("zeros", "zeros", 0.0, 0.0), ("ignore", "zeros", np.nan, 0.0),
    ("ones", "ignore", 1.0, np.nan), ("ignore", "ignore", np.nan, np.nan)])
def test_chexpert_policies(tmp_path, uncertain, blank, edema, pneumothorax):
    ext = external.read_dataset("chexpert", _chexpert(tmp_path), uncertain, blank)
    y = ext.frame[ext.labels].astype("float32").to_numpy(dtype=np.float32, na_value=np.nan)
    j = {lab: k for k, lab in enumerate(ext.labels)}
    np.testing.assert_equal(y[1, j["Edema"]], edema)  # -1
    np.testing.assert_equal(y[1, j["Pneumothorax"]], pneumothorax)  # blank
    assert y[1, j["Cardiomegaly"]] == 1 and y[1, j["Pneumonia"]] == 0  # 1.0 / 0.0 under every policy
    assert not np.isnan(y[3]).any()  # valid.csv: every cell 0/1
    assert ext.frame["projection"].tolist() == ["AP", "PA", "L", "AP"]
    assert ext.frame["patient"].tolist()[1:3] == ["patient00002", "patient00002"]
    assert ext.frame["study"].iloc[1] == ext.frame["study"].iloc[2] == "patient00002/study2"
    assert ext.frame["official"].tolist() == ["train", "train", "train", "test"]


def test_chexpert_cache_masks_and_key(tmp_path):
    d = _chexpert(tmp_path)
    a = build_external_cache("chexpert", d, tmp_path / "a" / "train", SIZE, uncertain="ignore", blank="ignore",
                             folds=2, workers=1)
    c = open_cache(tmp_path / "a" / "train")
    y = c.targets(c.rows())
    assert np.isnan(y).sum() > 0 and "annotated" in a["counts"]
    assert c.index["ImageID"].iloc[0] == "train/patient00001/study1/view1_frontal.jpg"
    b = build_external_cache("chexpert", d, tmp_path / "b" / "train", SIZE, uncertain="ones", blank="zeros",
                             folds=2, workers=1)
    assert not np.isnan(open_cache(tmp_path / "b" / "train").targets(c.rows())).any()
    assert a["key"] != b["key"]
    assert a["label_policy"] == {"uncertain": "ignore", "blank": "ignore"}


def test_chexpert_path_without_the_folder_name(tmp_path):
    d = _chexpert(tmp_path)
    p = d / "train.csv"
    p.write_text(p.read_text().replace("CheXpert-v1.0-small/train/", "train/"))
    ext = external.read_dataset("chexpert", d, "ones", "zeros")
    assert ext.frame["ImageID"].tolist()[:2] == ["train/patient00001/study1/view1_frontal.jpg",
                                                 "train/patient00002/study2/view1_frontal.jpg"]


def test_chexpert_bad_value(tmp_path):
    d = _chexpert(tmp_path)
    p = d / "train.csv"
    p.write_text(p.read_text().replace("-1.0", "2.0", 1))
    with pytest.raises(InputError, match=r"train.csv: row 3, column 'Edema': label value '2.0'"):
        external.read_dataset("chexpert", d, "ones", "zeros")


# ---- MIMIC-CXR-JPG ---------------------------------------------------------------------------------------


def _mimic(tmp_path: Path) -> Path:
    d = tmp_path / "mimic-cxr-jpg"
    labs = external.MIMIC_LABELS

    def lab(subject, study, vals):
        cells = [""] * len(labs)
        for k, v in vals.items():
            cells[labs.index(k)] = v
        return f"{subject},{study}," + ",".join(cells) + "\n"

    _write(d / "mimic-cxr-2.0.0-chexpert.csv.gz", "subject_id,study_id," + ",".join(labs) + "\n"
           + lab("10000032", "50414267", {"No Finding": "1.0"})
           + lab("10000032", "53189527", {"Pleural Effusion": "-1.0", "Edema": "1.0", "Pneumonia": "0.0"}), gz=True)
    _write(d / "mimic-cxr-2.0.0-metadata.csv.gz",
           "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns\n"
           "d1,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544\n"
           "d2,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544\n"
           "d3,10000032,53189527,CHEST (PORTABLE AP),AP,3056,2544\n"
           "d4,10000032,59999999,CHEST (PORTABLE AP),,3056,2544\n", gz=True)  # a study without labels
    _write(d / "mimic-cxr-2.0.0-split.csv.gz", "dicom_id,study_id,subject_id,split\n"
           "d1,50414267,10000032,train\nd2,50414267,10000032,train\nd3,53189527,10000032,test\n"
           "d4,59999999,10000032,validate\n", gz=True)
    for k, (study, dicom) in enumerate([("50414267", "d1"), ("50414267", "d2"), ("53189527", "d3")]):
        _jpg(d / "files" / "p10" / "p10000032" / f"s{study}" / f"{dicom}.jpg", 50 + 50 * k)
    return d


def test_mimic_reader_and_cache(tmp_path):
    d = _mimic(tmp_path)
    ext = external.read_dataset("mimic", d, "ignore", "zeros")
    f = ext.frame
    assert f["ImageID"].tolist() == ["files/p10/p10000032/s50414267/d1.jpg", "files/p10/p10000032/s50414267/d2.jpg",
                                     "files/p10/p10000032/s53189527/d3.jpg"]
    assert ext.info["unlabelled_images"] == 1
    assert f["projection"].tolist() == ["PA", "L", "AP"] and f["official"].tolist() == ["train", "train", "test"]
    assert f["study"].tolist() == ["s50414267", "s50414267", "s53189527"] and set(f["patient"]) == {"p10000032"}
    y = f[ext.labels].astype("float32").to_numpy(dtype=np.float32, na_value=np.nan)
    j = {lab: k for k, lab in enumerate(ext.labels)}
    assert np.isnan(y[2, j["Pleural Effusion"]]) and y[2, j["Edema"]] == 1 and y[2, j["Fracture"]] == 0
    assert (y[0] == y[1]).all()  # labels are per study
    m = build_external_cache("mimic", d, tmp_path / "c" / "train", SIZE, uncertain="ignore", folds=2, workers=1)
    c = open_cache(tmp_path / "c" / "train")
    assert m["counts"]["images"] == 3 and np.isnan(c.targets(c.rows())).sum() == 1
    # unchanged inputs: reused as is; another policy: rebuilt, pixels reused
    assert build_external_cache("mimic", d, tmp_path / "c" / "train", SIZE, uncertain="ignore", folds=2,
                                workers=1)["key"] == m["key"]
    m2 = build_external_cache("mimic", d, tmp_path / "c" / "train", SIZE, uncertain="ones", folds=2, workers=1)
    assert m2["key"] != m["key"] and m2["decoded_this_run"] == 0


def test_small_chunks_give_the_same_rows(tmp_path, monkeypatch):
    d = _mimic(tmp_path)
    whole = external.read_dataset("mimic", d, "ones", "zeros").frame
    monkeypatch.setattr(external, "CHUNK_ROWS", 1)
    chunked = external.read_dataset("mimic", d, "ones", "zeros").frame
    assert whole.equals(chunked)


def test_missing_files_are_named(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    for ds, what in [("nih", "Data_Entry_2017"), ("chexpert", "train.csv"), ("mimic", "chexpert.csv.gz")]:
        with pytest.raises(InputError, match=what):
            external.read_dataset(ds, d)
    with pytest.raises(InputError, match="--uncertain"):
        external.read_dataset("nih", d, uncertain="maybe")


def test_preprocess_external_cli(tmp_path, capsys):
    from conftest import run_script_inprocess

    d = _chexpert(tmp_path)
    rc, _out, _err = run_script_inprocess(capsys, "preprocess.py", "external", "--dataset", "chexpert", "--data-dir",
                                          str(d), "--uncertain", "ignore", "--size", str(SIZE), "--folds", "2",
                                          "--workers", "1", "--out", str(tmp_path / "c" / "train"))
    assert rc == 0 and os.path.isfile(tmp_path / "c" / "train" / "manifest.json")


@pytest.mark.parametrize("kind", ["nih", "chexpert", "mimic"])
def test_synthetic_datasets_read_back(tmp_path, kind):
    from cxrlt.synth.external import write_external

    s = write_external(tmp_path / kind, kind, n=40, seed=5, workers=1)
    ext = external.read_dataset(kind, tmp_path / kind, "ignore", "ignore")
    assert len(ext.frame) == s["images"] == 40
    y = ext.frame[ext.labels].astype("float32").to_numpy(dtype=np.float32, na_value=np.nan)
    assert np.nansum(y) > 0
    if kind != "nih":
        assert np.isnan(y).any()  # blank / uncertain cells written as the labeller does
    m = build_external_cache(kind, tmp_path / kind, tmp_path / "c" / kind / "train", SIZE, folds=2, workers=1)
    assert m["counts"]["images"] == 40
    assert write_external(tmp_path / kind, kind, n=40, seed=5, workers=1)["skipped"]


def test_several_datasets_in_one_cache(tmp_path, capsys):
    from conftest import run_script_inprocess

    nih, chex = _nih(tmp_path), _chexpert(tmp_path)
    rc, _o, _e = run_script_inprocess(capsys, "preprocess.py", "external", "--dataset", "nih", "--data-dir", nih,
                                      "--dataset", "chexpert", "--data-dir", chex, "--uncertain", "zeros",
                                      "--uncertain", "ignore", "--size", SIZE, "--folds", "2", "--workers", "1",
                                      "--out", tmp_path / "c" / "train")
    assert rc == 0
    c = open_cache(tmp_path / "c" / "train")
    union = external.NIH_LABELS + [lab for lab in external.CHEXPERT_LABELS if lab not in external.NIH_LABELS]
    assert c.labels == union and len(c.index) == 9
    y = c.targets(c.rows())
    ids = c.ids(c.rows())
    from_nih = np.array([i.startswith("nih/") for i in ids])
    assert from_nih.sum() == 5 and all(i.startswith("CheXpert-v1.0-small/") for i in ids[~from_nih])
    j = {lab: k for k, lab in enumerate(c.labels)}
    assert np.isnan(y[from_nih, j["Support Devices"]]).all()  # not an NIH label: unannotated
    assert np.isnan(y[~from_nih, j["Effusion"]]).all()  # not a CheXpert label
    assert not np.isnan(y[:, j["No Finding"]]).any() and not np.isnan(y[:, j["Cardiomegaly"]]).any()
    assert np.isnan(y[~from_nih, j["Edema"]]).sum() == 2  # CheXpert's -1 under ignore
    pats = c.patient_keys(c.rows())
    assert {p.split(":")[0] for p in pats} == {"nih", "chexpert"}
    m = json.loads((tmp_path / "c" / "train" / "manifest.json").read_text())
    assert [d["dataset"] for d in m["datasets"]] == ["nih", "chexpert"]
    assert m["label_policy"][1] == {"uncertain": "ignore", "blank": "zeros"}
