"""Fault injection: kill every long stage at chosen points, re-run it, compare with an uninterrupted run.

Each stage script runs in its own process through a small shim (forkserver.SHIM) that injects one pause
at a precise point: before a chosen function runs (`pause`), or in the middle of writing a chosen
file (`midwrite`: the shim writes the first half of the file's bytes to the temporary path the stage
is writing, then pauses). When the pause starts the shim creates a marker file; the test then kills
the process (SIGKILL, or SIGINT for Ctrl-C) and re-runs the same command, as a user or `make` would.

Stage processes come from the fork server of tests/forkserver.py (pre-imported interpreters).

While any stage process runs, a watcher thread keeps reading every file at a final path of the
output folders: a file that exists must be complete (a CSV that parses with the full row count, an
.npy that loads, a .pt that torch.load(weights_only=True) reads, JSON/YAML that parse, a zip that
tests clean). Temporary files (`.<name>.<random>.tmp<ext>`, `.done.npy.tmp`) are skipped.

Everything runs on a tiny dataset of its own (60 + 12 images, 4 labels, 32 px, timm's test_resnet,
2 epochs, no loader workers, OMP_NUM_THREADS=1), so that runs are bit-identical on the CPU.
"""

from __future__ import annotations

import json
import signal
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT
from forkserver import (CLIENT, SHIM, ForkServer, Stage, final_files, jsonl, make_env, one_thread,
                        run_script_inprocess, same_weights, temp_files, without_timing)

SIZE = 32
LABELS = ["Normal", "Atelectasis", "Cardiomegaly", "Effusion"]
CONFIG = """\
model: test_resnet
pretrained: false
head: cosine
loss: ldam
ldam_s: 30.0
drw_epoch: 1
epochs: 2
batch_size: 16
lr: 3.0e-3
warmup_epochs: 0.5
aug_hflip: 0.0
aug_rotate: 3.0
workers: 0
device: cpu
crt_epochs: 3
tta: none
"""

# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Tiny dataset, shim + client, config, the fork server and the reference cache (built by an
    uninterrupted preprocess.py)."""
    from cxrlt.synth import generate

    base = tmp_path_factory.mktemp("faults")
    data = base / "data"
    generate(data, n_train=60, n_test=12, seed=3, min_side=40, max_side=64, labels=LABELS, workers=1,
             progress=False)
    shim, client = base / "shim.py", base / "client.py"
    shim.write_text(SHIM)
    client.write_text(CLIENT)
    cfg = base / "tiny.yaml"
    cfg.write_text(CONFIG)
    f = dict(base=base, data=data, shim=shim, client=client, cfg=cfg, train_csv=data / "train.csv",
             images=data / "images", test_csv=data / "CXRLT_2026_TEST_ALL_TASK1.csv", removal=data / "Removal.csv")
    f["server"] = ForkServer(shim, base)
    removed = set(pd.read_csv(f["removal"], dtype=str)["ImageID"])
    f["n_train"] = int((~pd.read_csv(f["train_csv"], dtype=str)["ImageID"].isin(removed)).sum())
    f["cache"] = base / "cache" / "train"
    preprocess_stage(f, f["cache"]).run()
    yield f
    f["server"].close()


def preprocess_args(f, out) -> list:
    return ["preprocess.py", "train", "--train-csv", f["train_csv"], "--image-dir", f["images"],
            "--removal-csv", f["removal"], "--size", SIZE, "--folds", 3, "--out", out, "--workers", 1]


def preprocess_stage(f, out: Path) -> Stage:
    """The train cache (the training rows minus Removal.csv)."""
    return Stage(f["server"], f["base"], preprocess_args(f, out), [out], rows={"index.csv": f["n_train"]})


@pytest.fixture(scope="module")
def ref_run(fx):
    """The uninterrupted training run (in this process)."""
    from cxrlt.core import config
    from cxrlt.training.trainer import train

    out = fx["base"] / "ref_run"
    with one_thread():
        train(config.resolve([fx["cfg"]]), str(fx["cache"]), str(out))
    return out


@pytest.fixture(scope="module")
def ref_crt(fx, ref_run):
    from cxrlt.post.retrain_head import run

    out = fx["base"] / "ref_crt"
    with one_thread():
        run(ref_run, fx["cache"], out, {}, device_name="cpu", log=lambda *_: None)
    return out


def train_stage(fx, out: Path) -> Stage:
    return Stage(fx["server"], fx["base"], ["train.py", "--config", fx["cfg"], "--cache", fx["cache"], "--out", out],
                 [out])


# ---- preprocess.py ----------------------------------------------------------------------------------

PREPROCESS_FAULTS = {  # point -> (fault, what the re-run says)
    # early: the partial folder exists but its plan.json (written last when setting up) does not
    "setup": ({"mode": "pause", "target": "cxrlt.data.cache_build:write_json", "match": "plan.json"},
              "incomplete set-up from an earlier run; starting over"),
    # mid-write: index.csv half written inside the partial folder, every image decoded
    "index_midwrite": ({"mode": "midwrite", "target": "pathlib:Path.write_text", "match": "index.csv"},
                       "{n} of {n} images already done"),
    # late: the finished folder was renamed into place, its bookkeeping files not yet removed
    "after_rename": ({"mode": "pause", "target": "pathlib:Path.unlink", "match": "done.npy"},
                     "cache up to date"),
}


@pytest.mark.parametrize("point", list(PREPROCESS_FAULTS))
def test_preprocess_killed_then_rerun_equals_uninterrupted(fx, tmp_path, point):
    out = tmp_path / "cache"
    stage = preprocess_stage(fx, out)
    fault, says = PREPROCESS_FAULTS[point]
    stage.interrupt(fault)
    if point == "after_rename":
        assert (out / "manifest.json").exists()
    else:
        assert not out.exists(), "nothing may appear at the final path before the cache is complete"
    rerun = stage.run()
    assert says.format(n=fx["n_train"]) in rerun.stdout, rerun.stdout
    assert final_files(out) == final_files(fx["cache"]) == ["images.npy", "index.csv", "labels.txt", "manifest.json",
                                                             "sources.csv"]
    for name in ("images.npy", "index.csv", "labels.txt"):
        assert (out / name).read_bytes() == (fx["cache"] / name).read_bytes(), name
    ref, got = (json.loads((d / "manifest.json").read_text()) for d in (fx["cache"], out))
    assert got["key"] == ref["key"] and got["counts"] == ref["counts"]
    assert not out.with_name("cache.partial").exists() and temp_files(tmp_path) == []


def test_preprocess_ctrl_c_exits_130_with_hint_and_resumes(fx, tmp_path):
    out = tmp_path / "cache"
    stage = preprocess_stage(fx, out)
    # Ctrl-C while the 20th image decodes (19 are finished)
    p = stage.interrupt({"mode": "pause", "target": "cxrlt.data.decode_worker:load_for_cache", "nth": 20}, sig=signal.SIGINT)
    assert p.returncode == 130, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last == "interrupted: re-run the same command to continue where it stopped"
    assert "Traceback" not in p.stderr and not out.exists()
    rerun = stage.run()
    m = json.loads((out / "manifest.json").read_text())
    n = fx["n_train"]
    assert 0 < m["resumed_rows"] < n and m["decoded_this_run"] == n - m["resumed_rows"]
    assert f"{m['resumed_rows']} of {n} images already done" in rerun.stdout
    assert (out / "images.npy").read_bytes() == (fx["cache"] / "images.npy").read_bytes()


# ---- train.py ---------------------------------------------------------------------------------------


def test_train_killed_interrupted_killed_then_resumed_equals_uninterrupted(fx, ref_run, tmp_path):
    """One run hit by three faults in turn: SIGKILL while last.pt of epoch 1 is half written,
    Ctrl-C during the second epoch's validation, SIGKILL while model.pt is half written."""
    out = tmp_path / "run"
    stage = train_stage(fx, out)

    stage.interrupt({"mode": "midwrite", "target": "torch:save", "match": "last.pt"})
    assert not (out / "last.pt").exists() and not (out / "model.pt").exists()
    assert len(temp_files(out)) == 1  # the half-written last.pt, under its temp name only
    # last.pt is written in the background while the next epoch trains: that epoch's line may have
    # landed too (a resume drops the lines of epochs whose last.pt never did)
    assert [r["epoch"] for r in jsonl(out / "metrics.jsonl")] in ([0], [0, 1])

    p = stage.interrupt({"mode": "pause", "target": "cxrlt.training.trainer:Trainer.validate", "nth": 2},
                        sig=signal.SIGINT, extra=["--resume"])
    assert p.returncode == 130, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        "interrupted: run the same command with --resume (make re-runs do) to continue from the last "
        "finished epoch")
    assert "Traceback" not in p.stderr
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0

    p = stage.interrupt({"mode": "midwrite", "target": "torch:save", "match": "model.pt"}, extra=["--resume"])
    assert f"resumed from {out / 'last.pt'} at epoch 1" in p.stderr
    assert not (out / "model.pt").exists()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1

    stage.run(extra=["--resume"])
    same_weights(out / "model.pt", ref_run / "model.pt")
    same_weights(out / "best.pt", ref_run / "best.pt")
    assert without_timing(jsonl(out / "metrics.jsonl")) == without_timing(jsonl(ref_run / "metrics.jsonl"))
    assert set(final_files(out)) == set(final_files(ref_run))


# ---- retrain_head.py --------------------------------------------------------------------------------


def test_crt_killed_twice_then_rerun_equals_uninterrupted(fx, ref_run, ref_crt, tmp_path):
    out = tmp_path / "crt"
    stage = Stage(fx["server"], fx["base"], ["retrain_head.py", "--run", ref_run, "--cache", fx["cache"], "--out", out],
                  [out])
    # early: the val features being written (under their temporary name; the train features are complete)
    stage.interrupt({"mode": "pause", "target": "numpy.lib.format:open_memmap", "match": "features_val", "nth": 2})
    assert (out / "features_train.npy").exists() and not (out / "features_val.npy").exists()
    # late: every head epoch done, summary.json half written; then model.pt (make's target) half written
    stage.interrupt({"mode": "midwrite", "target": "pathlib:Path.write_text", "match": "summary.json"})
    assert not (out / "summary.json").exists() and not (out / "model.pt").exists()
    stage.interrupt({"mode": "midwrite", "target": "torch:save", "match": "model.pt"})
    assert (out / "summary.json").exists() and not (out / "model.pt").exists()
    stage.run()
    same_weights(out / "model.pt", ref_crt / "model.pt")
    for name in ("features_train.npy", "features_val.npy"):
        assert np.array_equal(np.load(out / name), np.load(ref_crt / name)), name
    assert without_timing(jsonl(out / "metrics.jsonl")) == without_timing(jsonl(ref_crt / "metrics.jsonl"))
    s_ref, s_got = (json.loads((d / "summary.json").read_text()) for d in (ref_crt, out))
    assert without_timing([s_got]) == without_timing([s_ref])
    assert final_files(out) == final_files(ref_crt)


# ---- predict.py -------------------------------------------------------------------------------------


def test_predict_killed_mid_write_then_rerun_equals_uninterrupted(fx, ref_crt, tmp_path):
    args = ["--checkpoint", ref_crt / "model.pt", "--cache", fx["cache"], "--split", "val"]
    ref = tmp_path / "ref" / "pred_val.csv"
    run_script_inprocess("predict.py", *args, "--out", ref)
    out = tmp_path / "run" / "pred_val.csv"
    n_val = len(pd.read_csv(ref))
    stage = Stage(fx["server"], fx["base"], ["predict.py", *args, "--out", out], [out.parent],
                  rows={"pred_val.csv": n_val})
    stage.interrupt({"mode": "midwrite", "target": "pandas:DataFrame.to_csv", "match": "pred_val.csv"})
    assert not out.exists() and Path(f"{out}.postproc.json").exists()
    stage.run()
    assert out.read_bytes() == ref.read_bytes()
    assert Path(f"{out}.postproc.json").read_bytes() == Path(f"{ref}.postproc.json").read_bytes()


# ---- ensemble.py combine ----------------------------------------------------------------------------


def write_predictions(path: Path, ids, seed: int) -> Path:
    p = np.random.default_rng(seed).random((len(ids), len(LABELS)))
    df = pd.DataFrame(p, columns=LABELS)
    df.insert(0, "ImageID", ids)
    df.to_csv(path, index=False, float_format="%.6f")
    return path


ENSEMBLE_FAULTS = {
    "csv_midwrite": {"mode": "midwrite", "target": "pandas:DataFrame.to_csv", "match": "sub.csv"},
    "zip_midwrite": {"mode": "pause", "target": "zipfile:ZipFile.write", "nth": 4},
}


@pytest.mark.parametrize("point", list(ENSEMBLE_FAULTS))
def test_ensemble_killed_then_rerun_equals_uninterrupted(fx, tmp_path, point):
    from cxrlt.data.tables import read_id_list

    ids = read_id_list(fx["test_csv"])["ImageID"].tolist()
    preds = [write_predictions(tmp_path / f"test{k}.csv", ids[::-1], k) for k in range(2)]

    def args(d: Path):
        return ["combine", "--method", "rank", "--test", *preds, "--test-list", fx["test_csv"],
                "--out", d / "sub.csv", "--zip", d / "sub.zip"]

    ref = tmp_path / "ref"
    run_script_inprocess("ensemble.py", *args(ref))
    out = tmp_path / "sub"
    stage = Stage(fx["server"], fx["base"], ["ensemble.py", *args(out)], [out], rows={"sub.csv": len(ids)})
    stage.interrupt(ENSEMBLE_FAULTS[point])
    # the CSV is the make target: it must not exist unless the zip beside it is complete too
    assert not (out / "sub.csv").exists() and not (out / "sub.zip").exists()
    stage.run()
    assert (out / "sub.csv").read_bytes() == (ref / "sub.csv").read_bytes()
    za, zb = zipfile.ZipFile(ref / "sub.zip"), zipfile.ZipFile(out / "sub.zip")
    # every member equal but the record (sub.json), which names the folder it was written to
    assert [(i.filename, i.CRC) for i in za.infolist() if i.filename != "sub.json"] == \
        [(i.filename, i.CRC) for i in zb.infolist() if i.filename != "sub.json"]
    assert "sub.json" in zb.namelist()
    assert final_files(out) == final_files(ref) == ["sub.csv", "sub.json", "sub.zip"]


# ---- make ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # an end-to-end run: make test runs it, make test-fast skips it
def test_make_all_killed_mid_training_then_rerun_finishes(fx, ref_run, tmp_path):
    """`make all` on the tiny dataset, the whole process group killed while train.py writes the
    second epoch's last.pt; a second `make all` resumes training from the first epoch and finishes
    every stage; after that the submission is up to date."""
    roots = {"CACHE_ROOT": tmp_path / "cache", "RUNS_ROOT": tmp_path / "runs", "SUB_DIR": tmp_path / "sub",
             "STATE": tmp_path / "state"}
    cache, runs, sub = roots["CACHE_ROOT"] / f"tiny_{SIZE}", roots["RUNS_ROOT"] / f"tiny_{SIZE}", roots["SUB_DIR"] / "tiny"
    variables = ["DATASET=tiny", f"TRAIN_CSV={fx['train_csv']}", f"IMAGE_DIR={fx['images']}",
                 f"TEST_CSV={fx['test_csv']}", f"REMOVAL_CSV={fx['removal']}", "TEST_LABELS=",
                 f"IMG_SIZE={SIZE}", "FOLDS=3", f"CONFIGS={fx['cfg']}", "NAME=tiny", "PREDICT_ARGS=--workers 0",
                 *(f"{k}={v}" for k, v in roots.items())]
    # every stage goes through the fork server's client; FAULT_SPEC (first make only) picks the fault
    py = f"PY={fx['server'].client_command(fx['client'])}"
    make = ["make", "--no-print-directory", "-o", ".venv/.installed", "all", py, *variables]
    run = runs / "tiny"
    stage = Stage(None, fx["base"], make, [cache, run, sub.parent],
                  rows={"pred_test.csv": 12, "tiny.csv": 12})
    stage.interrupt({"mode": "midwrite", "target": "torch:save", "match": "last.pt", "nth": 2,
                     "script": "train.py"})
    assert (cache / "train/manifest.json").exists() and not (run / "model.pt").exists()
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0

    rerun = stage.run()
    assert f"resumed from {run / 'last.pt'} at epoch 1" in rerun.stderr
    same_weights(run / "model.pt", ref_run / "model.pt")
    for name in ("index.csv", "images.npy"):
        assert (cache / "train" / name).read_bytes() == (fx["cache"] / name).read_bytes()
    from cxrlt.evaluation.submission import validate_submission

    assert len(validate_submission(f"{sub}.csv", fx["test_csv"], LABELS)) == 12
    assert zipfile.ZipFile(f"{sub}.zip").testzip() is None
    q = subprocess.run([*make[:4], "-q", f"{sub}.csv", py, *variables], cwd=ROOT, capture_output=True, text=True,
                       env=make_env())
    assert q.returncode == 0, "a second make would redo work: " + q.stdout + q.stderr
