"""The Makefile end to end, on a 14-label NIH-style dataset (not the CXR-LT label set).

The repo is mirrored into a temp folder with symlinks (scripts, package, configs, .venv) so
that the data, cache, runs and submission the test makes stay out of the working tree.
"""

import json
import os
import subprocess

import pandas as pd
import pytest

from conftest import ROOT

NIH_LABELS = ["No Finding", "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
              "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Hernia"]


def _mirror(tmp):
    for p in ROOT.iterdir():
        if p.name not in {"data", "runs", "submissions", ".git", ".pytest_cache"}:
            (tmp / p.name).symlink_to(p)
    for d in ("data", "runs", "submissions"):
        (tmp / d).mkdir()


def _make(tmp, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(["make", "--no-print-directory", *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow  # an end-to-end run: make test runs it, make test-fast skips it
def test_make_all_on_a_14_label_dataset_then_nothing_to_redo(tmp_path):
    from cxrlt.synth import generate

    _mirror(tmp_path)
    (tmp_path / "nih.txt").write_text("\n".join(NIH_LABELS) + "\n")
    d = tmp_path / "data" / "nih"
    generate(d, n_train=120, n_test=20, seed=3, min_side=48, max_side=80, labels=NIH_LABELS, progress=False)
    vars_ = ["DATASET=nih", f"TRAIN_CSV={d}/train.csv", f"IMAGE_DIR={d}/images",
             f"TEST_CSV={d}/CXRLT_2026_TEST_ALL_TASK1.csv", f"REMOVAL_CSV={d}/Removal.csv",
             f"TEST_LABELS={d}/test_labels.csv", "IMG_SIZE=32", "FOLDS=3", "NAME=nih",
             "CONFIGS=configs/demo.yaml", "TRAIN_ARGS=--epochs 1 --workers 0 --batch_size 16",
             "PREDICT_ARGS=--workers 0"]
    p = _make(tmp_path, "all", *vars_)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sub = pd.read_csv(tmp_path / "submissions" / "nih.csv")
    assert list(sub.columns) == ["ImageID", *NIH_LABELS]
    assert len(sub) == 20
    score = json.loads((tmp_path / "submissions" / "nih.score.json").read_text())
    assert 0 <= score["mAP"] <= 1 and "test mAP" in p.stdout
    assert (tmp_path / "submissions" / "nih.zip").exists()
    # every stage is a real file target: a second run has nothing to do
    q = _make(tmp_path, "all", *vars_, "--dry-run")
    assert q.returncode == 0, q.stdout + q.stderr
    for script in ("preprocess.py", "train.py", "retrain_head.py", "predict.py", "evaluate.py", "ensemble.py"):
        assert script not in q.stdout, q.stdout
    # a touch on any input, the test labels included, re-runs nothing; new test labels re-score only
    for f in ("train.csv", "CXRLT_2026_TEST_ALL_TASK1.csv", "Removal.csv", "test_labels.csv"):
        os.utime(d / f)
    q = _make(tmp_path, "all", *vars_, "--dry-run")
    assert q.returncode == 0 and ".py" not in q.stdout, q.stdout
    labels = pd.read_csv(d / "test_labels.csv")
    labels.iloc[0, 1:] = 1 - labels.iloc[0, 1:]
    labels.to_csv(d / "test_labels.csv", index=False)
    q = _make(tmp_path, "all", *vars_, "--dry-run")
    ran = [x for x in q.stdout.splitlines() if ".py" in x]
    assert q.returncode == 0 and len(ran) == 1 and "evaluate.py --pred submissions/nih.csv" in ran[0], q.stdout
