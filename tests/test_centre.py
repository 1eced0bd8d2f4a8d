"""Multi-centre test lists (CXR-LT 2026 mixes PadChest and NIH images): the centre of an image
(cxrlt.data.identity.centre, the cache index's `centre` column), mAP per centre in evaluate.py and
the study report (cxrlt.evaluation.metrics.per_centre_map), and the demo's NIH-shaped images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, build_caches, run_script_inprocess, tiny_cfg
from cxrlt.core.errors import InputError
from cxrlt.data import identity
from cxrlt.data.cache import open_cache
from cxrlt.evaluation import metrics as M
from cxrlt.synth import META_NAME, TEST_LIST_NAME, generate
from cxrlt.synth.cohort import nih_folder

OFFICIAL = ROOT / "tests" / "data"


# ---- the rule ----------------------------------------------------------------------------------------

def test_centre_from_each_image_id_shape():
    real = pd.read_csv(OFFICIAL / "padchest_metadata_excerpt.csv", dtype=str).ImageID
    assert real.map(identity.centre).eq("padchest").all()  # PadChest's own IDs, every shape
    shapes = {
        "216840111366964013686042548532013208193054515_02-027-019.png": "padchest",  # DICOM-UID export
        "1275224313319801054337_00-115-166.png": "padchest",  # 22-digit UID
        "48052155640473455658566131082566938044_2_wqcl2j.png": "padchest",  # repeat study `_<n>`
        "48052155640473455658566131082566938044-3_-d1xq3.png": "padchest",  # `-<n>`, `-` suffix
        "00000001_000.png": "nih",
        "00030805_012.PNG": "nih",
        "images_001/images/00000001_000.png": "nih",  # NIH's download folders (external caches)
        "0000001_000.png": "unknown",  # 7 digits
        "00000001_00.png": "unknown",
        "00000001_000.jpg": "unknown",
        "syn0000001.png": "unknown",
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg": "unknown",
    }
    for image_id, want in shapes.items():
        assert identity.centre(image_id) == want, image_id
    # a metadata Centre overrides the shape (lowercased); a blank one does not
    assert identity.centre("00000001_000.png", " PadChest ") == "padchest"
    assert identity.centre("syn0000001.png", "mimic") == "mimic"
    assert identity.centre("00000001_000.png", "  ") == "nih"


def _tiny_world(root: Path, tmp_name="world") -> Path:
    """A mixed PadChest + NIH demo world: 80 train (8 NIH) / 24 test (6 NIH) images."""
    out = root / tmp_name
    generate(out, n_train=80, n_test=24, seed=3, min_side=64, max_side=96, workers=1, progress=False, nih=(8, 6))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return _tiny_world(tmp_path_factory.mktemp("centre"))


def test_cache_index_holds_the_centre_and_a_metadata_centre_column(world, tmp_path):
    train, test = build_caches(world, tmp_path / "cache", 32)
    for d, csv in ((train, "train.csv"), (test, TEST_LIST_NAME)):
        cache = open_cache(d)
        rows = cache.rows()
        got = dict(zip(cache.ids(rows), cache.centres(rows)))
        want = {i: ("nih" if i[:8].isdigit() and len(i) == 16 else "padchest")
                for i in pd.read_csv(world / csv, dtype=str).ImageID if i in got}
        assert got == want and set(got.values()) == {"padchest", "nih"}
    # a metadata `Centre` column wins over the shape; a value the index cannot hold is refused
    meta = pd.read_csv(world / META_NAME, dtype=str, keep_default_na=False)
    meta["Centre"] = ["Hospital_B" if k % 2 else "" for k in range(len(meta))]
    meta.to_csv(tmp_path / "meta.csv", index=False)
    from cxrlt.data.cache_build import build_test_cache

    out = build_test_cache(world / TEST_LIST_NAME, world / "images", tmp_path / "t2", 32,
                           meta_csv=tmp_path / "meta.csv", workers=1)
    assert out is not None
    cache = open_cache(tmp_path / "t2")
    centres = dict(zip(cache.ids(cache.rows()), cache.centres(cache.rows())))
    given = dict(zip(meta.ImageID, meta.Centre))
    for iid, c in centres.items():
        assert c == (given[iid].lower() if given.get(iid) else identity.centre(iid)), iid
    assert {"hospital_b", "padchest", "nih"} <= set(centres.values())
    k = int(np.flatnonzero(meta.ImageID.isin(set(centres)))[2])  # a row of a test image
    meta.loc[k, "Centre"] = "bad centre!"
    meta.to_csv(tmp_path / "meta_bad.csv", index=False)
    with pytest.raises(InputError, match=rf"meta_bad\.csv: row {k + 2}, column 'Centre': 'bad centre!' is not a "
                                         rf"centre name"):
        build_test_cache(world / TEST_LIST_NAME, world / "images", tmp_path / "t3", 32,
                         meta_csv=tmp_path / "meta_bad.csv", workers=1)


# ---- preprocess -> train -> predict -> submission -> per-centre scores ---------------------------------

@pytest.mark.slow
def test_a_mixed_test_list_goes_through_preprocess_predict_submission_and_is_scored_per_centre(
        world, tmp_path, capsys):
    from cxrlt.training.trainer import train

    cache = tmp_path / "cache"
    for args in (("train", "--train-csv", world / "train.csv", "--removal-csv", world / "Removal.csv",
                  "--meta-csv", world / META_NAME, "--folds", "4"),
                 ("test", "--test-csv", world / TEST_LIST_NAME, "--meta-csv", world / META_NAME)):
        code, _, err = run_script_inprocess(capsys, "preprocess.py", *args, "--image-dir", world / "images",
                                            "--size", "32", "--workers", "1", "--out", cache / args[0])
        assert code == 0, err
    test_ids = pd.read_csv(world / TEST_LIST_NAME, dtype=str).ImageID.tolist()
    nih_ids = [i for i in test_ids if identity.centre(i) == "nih"]
    assert len(nih_ids) == 6 and (world / "images" / nih_folder(nih_ids[0]) / nih_ids[0]).is_file()
    assert sorted(open_cache(cache / "test").centres(open_cache(cache / "test").rows())) == \
        sorted(identity.centre(i) for i in test_ids)

    train(tiny_cfg(epochs=1), str(cache / "train"), str(tmp_path / "run"))
    pred = tmp_path / "pred_test.csv"
    code, _, err = run_script_inprocess(capsys, "predict.py", "--checkpoint", tmp_path / "run" / "model.pt",
                                        "--cache", cache / "test", "--split", "test", "--out", pred)
    assert code == 0, err
    sub = tmp_path / "sub.csv"
    code, _, err = run_script_inprocess(capsys, "ensemble.py", "combine", "--test", pred,
                                        "--test-list", world / TEST_LIST_NAME, "--out", sub)
    assert code == 0, err
    code, out, err = run_script_inprocess(capsys, "ensemble.py", "check", sub, "--test-list", world / TEST_LIST_NAME)
    assert code == 0 and out.startswith("OK: 24 rows"), err
    assert pd.read_csv(sub, dtype={"ImageID": str}).ImageID.tolist() == test_ids  # NIH rows kept, in order

    code, out, err = run_script_inprocess(capsys, "evaluate.py", "--pred", sub, "--labels", world / "test_labels.csv",
                                          "--index", cache / "train" / "index.csv", "--out", tmp_path / "eval",
                                          "--n-boot", "50")
    assert code == 0, err
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    c = m["centres"]
    assert set(c) == {"padchest", "nih"}
    assert c["padchest"]["n_images"] == 18 and c["nih"]["n_images"] == 6
    assert c["padchest"]["scored"] and c["padchest"]["low"] <= c["padchest"]["mAP"] <= c["padchest"]["high"]
    assert not c["nih"]["scored"] and "mAP" not in c["nih"] and "too few" in c["nih"]["why"]  # 6 < 10 images
    assert "centre nih: 6 images, mAP not shown: too few to score (6 images" in out
    assert f"centre padchest: 18 images, mAP {c['padchest']['mAP']:.4f}" in out
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| macro mAP, centre nih (6 images) | too few to score |" in report
    # the PadChest number is the mAP of the PadChest rows alone
    y = pd.read_csv(world / "test_labels.csv", dtype={"ImageID": str}).set_index("ImageID")
    p = pd.read_csv(sub, dtype={"ImageID": str}).set_index("ImageID")[y.columns[2:]]
    pc = [i for i in test_ids if identity.centre(i) == "padchest"]
    assert c["padchest"]["mAP"] == pytest.approx(M.macro_map(y.loc[pc, p.columns].to_numpy(), p.loc[pc].to_numpy())[0])


# ---- the numbers ----------------------------------------------------------------------------------------

def _scores(n=120, c=5, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < [0.4, 0.3, 0.2, 0.1, 0.05]).astype(np.int8)
    p = np.clip(0.3 * y + rng.random((n, c)), 0, 1)
    return y, p


def test_per_centre_map_equals_the_map_of_each_centres_rows():
    y, p = _scores()
    centres = np.array(["padchest"] * 70 + ["nih"] * 42 + ["unknown"] * 8)[np.random.default_rng(1).permutation(120)]
    studies = np.array([f"s{k // 2}" for k in range(120)])
    out = M.per_centre_map(y, p, centres, studies, n_boot=200)
    assert list(out) == ["nih", "padchest", "unknown"]
    for name in ("padchest", "nih"):
        idx = centres == name
        by_hand = M.macro_map(y[idx], p[idx])[0]
        assert out[name]["scored"] and out[name]["mAP"] == pytest.approx(by_hand)
        assert out[name]["n_images"] == idx.sum() and out[name]["n_positives"] == y[idx].sum()
        assert out[name]["low"] <= by_hand <= out[name]["high"] < 1 and out[name]["unit"] == "studies"
        assert out[name]["n_units"] == len(set(studies[idx]))
        # and it is not the overall number
        assert out[name]["mAP"] != pytest.approx(M.macro_map(y, p)[0])
    assert not out["unknown"]["scored"] and "mAP" not in out["unknown"]
    assert out["unknown"]["why"].startswith("too few to score (8 images")
    # a centre with enough images but too few positives is not scored either
    y0 = y.copy()
    y0[centres == "nih"] = 0
    y0[np.flatnonzero(centres == "nih")[:2], 0] = 1
    few = M.per_centre_map(y0, p, centres, n_boot=20)["nih"]
    assert not few["scored"] and "2 positives" in few["why"]


def test_study_report_gives_mAP_per_centre_next_to_the_overall(tmp_path):
    """Two variants on one val fold of a mixed cache: each centre's columns are that centre's rows
    scored apart, and a centre with too few val images is written as such."""
    from cxrlt.data.cache_build import build_train_cache
    from cxrlt.studies import report as study_report
    from cxrlt.studies import spec

    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    labels = ["effusion", "nodule", "Normal"]
    rows = []
    for s in range(124):
        if s < 90:
            iid, pid = f"{10 ** 37 + s}_abcdef.png", f"P{s}"
        elif s < 120:
            iid, pid = f"{s:08d}_000.png", str(s)
        else:
            iid, pid = f"other{s}.png", f"Q{s}"
        cv2.imwrite(str(tmp_path / "images" / iid), rng.integers(0, 255, (16, 16), dtype=np.uint8))
        rows.append([iid, "20150101", pid, *(rng.random(3) < [0.4, 0.3, 0.3]).astype(int)])
    pd.DataFrame(rows, columns=["ImageID", "StudyDate_DICOM", "PatientID", *labels]).to_csv(
        tmp_path / "train.csv", index=False)
    build_train_cache(tmp_path / "train.csv", tmp_path / "images", tmp_path / "cache", 8, folds=2, seed=0, workers=1)
    (tmp_path / "s.yaml").write_text(f"base: {ROOT / 'configs' / 'demo.yaml'}\nname: cs\nbaseline: good\n"
                                     "variants: {good: {}, weak: {loss: bce}}\n")
    s = spec.expand(tmp_path / "s.yaml", tmp_path / "state")
    cache = open_cache(tmp_path / "cache")
    val = cache.rows("train", fold=0)
    ids, y, centres = cache.ids(val), cache.targets(val), cache.centres(val)
    runs = []
    for r, noise in zip(s.runs, (0.3, 0.9)):
        d = tmp_path / "runs" / r["stem"]
        d.mkdir(parents=True)
        p = np.clip(0.25 + 0.5 * y + noise * rng.standard_normal(y.shape), 0, 1)
        pd.DataFrame(p, columns=labels).assign(ImageID=ids)[["ImageID", *labels]].to_csv(d / "pred_val.csv", index=False)
        runs.append((r["stem"], str(d), str(tmp_path / "cache")))
    study_report.report(tmp_path / "state" / "studies" / "cs" / "study.json", runs, tmp_path / "report", n_boot=100)
    t = pd.read_csv(tmp_path / "report" / "table.csv")
    names = sorted(set(centres))
    assert "padchest" in names and "nih" in names
    for _, row in t.iterrows():
        pred = pd.read_csv(tmp_path / "runs" / row["stems"] / "pred_val.csv").set_index("ImageID").loc[ids]
        for name in names:
            idx = centres == name
            assert row[f"n_images_{name}"] == idx.sum()
            if row[f"scored_{name}"]:
                want = M.macro_map(y[idx], pred.to_numpy()[idx])[0]
                assert row[f"mAP_{name}"] == pytest.approx(want, abs=2e-6)
                assert row[f"mAP_{name}_low"] <= row[f"mAP_{name}"] <= row[f"mAP_{name}_high"]
            else:
                assert idx.sum() < M.CENTRE_MIN_IMAGES and np.isnan(row[f"mAP_{name}"])
    assert t["scored_padchest"].all() and t["scored_nih"].all() and not t["scored_unknown"].any()
    md = (tmp_path / "report" / "table.md").read_text()
    assert "padchest mAP [95% CI]" in md and "nih mAP [95% CI]" in md
    assert f"too few to score ({t['n_images_unknown'][0]} images)" in md


# ---- the demo's NIH-shaped images ----------------------------------------------------------------------

def test_the_demo_generator_writes_nih_shaped_8bit_images(world):
    summary = json.loads((world / "dataset.json").read_text())
    assert summary["n_nih_train"] == 8 and summary["n_nih_test"] == 6
    train = pd.read_csv(world / "train.csv", dtype=str, keep_default_na=False)
    test = pd.read_csv(world / TEST_LIST_NAME, dtype=str, keep_default_na=False)
    meta = pd.read_csv(world / META_NAME, dtype=str)
    nih_train = train[train.ImageID.map(identity.centre) == "nih"]
    nih_test = test[test.ImageID.map(identity.centre) == "nih"]
    assert len(nih_train) == 8 and len(nih_test) == 6 and len(train) == 80 and len(test) == 24
    assert (train.ImageID.map(identity.centre) != "unknown").all()
    assert not set(nih_train.PatientID) & set(nih_test.PatientID)  # de-duplicated at patient level
    assert all(pid == str(int(iid[:8])) for iid, pid in zip(nih_train.ImageID, nih_train.PatientID))
    assert not set(meta.ImageID) & (set(nih_train.ImageID) | set(nih_test.ImageID))  # not PadChest's metadata
    nih_stats, pc_stats = [], []
    for iid in list(nih_train.ImageID) + list(nih_test.ImageID):
        path = world / "images" / nih_folder(iid) / iid
        assert path.parent.parent.name.startswith("images_0") and path.parent.name == "images"
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and img.shape == (96, 96)  # 8-bit, square at --max-side
        assert not (world / "images" / iid).exists()
        nih_stats.append(np.percentile(img, [1, 99]) / 255)
    for iid in meta.ImageID[:30]:
        img = cv2.imread(str(world / "images" / iid), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint16 and img.shape[0] != img.shape[1]
        pc_stats.append(np.percentile(img, [1, 99]) / 65535)
    # another contrast: NIH's exports span their 8 bits; PadChest's use part of their 16
    assert np.mean([hi - lo for lo, hi in nih_stats]) > 0.7 > np.mean([hi - lo for lo, hi in pc_stats])
    # the PadChest facts still hold on the PadChest rows: frontal-only test list, laterals in training
    proj = meta.set_index("ImageID").Projection
    assert set(proj.loc[test.ImageID[test.ImageID.isin(proj.index)]]) <= set(identity.FRONTAL)
    assert (proj == "L").sum() > 5


def test_the_nih_share_flags_and_their_limits(tmp_path):
    from cxrlt.synth import dataset

    assert dataset.default_nih(1500, 300) == (30, 18)  # a few dozen in the default demo
    with pytest.raises(InputError, match=r"--n-nih-test must be in 0\.\.3"):
        generate(tmp_path / "x", n_train=40, n_test=12, nih=(0, 4), workers=1, progress=False)
    out = tmp_path / "none"
    s = generate(out, n_train=40, n_test=10, seed=1, min_side=64, max_side=96, workers=1, progress=False, nih=(0, 0))
    assert s["n_nih_train"] == s["n_nih_test"] == 0 and not list((out / "images").glob("images_*"))
