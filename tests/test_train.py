"""Trainer integration tests on the small demo cache (tiny timm model, CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script, tiny_cfg
from cxrlt.checkpoint import load_checkpoint
from cxrlt.fileio import read_jsonl
from cxrlt.inference import load_trained
from cxrlt.trainer import lr_multiplier, train


def _train_args(cache, out, *extra):
    return ["train.py", "--config", "configs/demo.yaml", "--cache", cache, "--out", out, "--model", "test_convnext",
            "--epochs", "3", "--batch_size", "16", "--workers", "0", "--device", "cpu", "--drw_epoch", "1", *extra]


def test_run_folder_and_learning(demo_cache, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(epochs=4, loss="ldam", head="cosine", drw_epoch=2, ema=True, ema_decay=0.9)
    res = train(cfg, str(demo_cache), str(out))
    for f in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "model.pt", "train.log"):
        assert (out / f).exists(), f
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3]
    assert [r["drw_active"] for r in recs] == [False, False, True, True]
    assert all(set(r["val_ap"]) == set(load_checkpoint(out / "model.pt")["labels"]) for r in recs)
    ck = load_checkpoint(out / "model.pt")
    assert ck["best_map"] == pytest.approx(res["best_map"])
    assert load_trained(out / "model.pt")[0].logit_scale == 30.0  # LDAM's s, inside the model
    assert res["best_map"] == max(r["val_mAP"] for r in recs)
    # train loss goes down
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]


def test_existing_run_needs_resume_and_same_config(demo_cache, tmp_path):
    from cxrlt.errors import InputError

    out = tmp_path / "run"
    train(tiny_cfg(epochs=1), str(demo_cache), str(out))
    with pytest.raises(InputError, match="--resume"):
        train(tiny_cfg(epochs=1), str(demo_cache), str(out))
    with pytest.raises(InputError, match="config changed.*lr"):
        train(tiny_cfg(epochs=1, lr=0.5), str(demo_cache), str(out), resume=True)


def test_lr_schedule_warmup_cosine_and_drw_drop():
    cfg = tiny_cfg(epochs=10, lr=1.0, min_lr=0.0, warmup_epochs=1, drw_epoch=5, drw_lr_factor=0.1)
    m = [lr_multiplier(s, cfg, 10) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(m[10:49], m[11:50]))  # cosine decreases
    assert m[50] == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 40 / 90)))


def _kill_after_first_epoch(cmd, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:
        if len(read_jsonl(out / "metrics.jsonl")) >= 1 and (out / "last.pt").exists():
            time.sleep(0.5)  # into the second epoch
            break
        if p.poll() is not None:
            raise AssertionError(p.stderr.read().decode()[-2000:])
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_resume_after_kill_matches_uninterrupted(demo_cache, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_script(*_train_args(demo_cache, a), env={"OMP_NUM_THREADS": "1"})
    _kill_after_first_epoch(_train_args(demo_cache, b), b)
    assert not (b / "model.pt").exists()
    run_script(*_train_args(demo_cache, b, "--resume"), env={"OMP_NUM_THREADS": "1"})
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [0, 1, 2]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_mAP"] == pytest.approx(y["val_mAP"], rel=1e-5)
    wa, wb = load_checkpoint(a / "model.pt")["model"], load_checkpoint(b / "model.pt")["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)


def test_ddp_two_processes_match_single_process(demo_cache, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--epochs", "2", "--aug_hflip", "0.5", "--drop_path", "0"]
    run_script(*_train_args(demo_cache, single, *common), env={"OMP_NUM_THREADS": "1"})
    args = _train_args(demo_cache, ddp, *common)
    args[args.index("--batch_size") + 1] = "8"  # 2 processes x 8 = the single run's 16
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
               env={"OMP_NUM_THREADS": "1"})
    rs, rd = read_jsonl(single / "metrics.jsonl"), read_jsonl(ddp / "metrics.jsonl")
    assert len(rs) == len(rd) == 2
    for x, y in zip(rs, rd):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-3)
        assert x["val_mAP"] == pytest.approx(y["val_mAP"], abs=2e-3)
    ws, wd = load_checkpoint(single / "model.pt")["model"], load_checkpoint(ddp / "model.pt")["model"]
    assert all(torch.allclose(ws[k].float(), wd[k].float(), atol=1e-3) for k in ws)
