#!/usr/bin/env python
"""cRT (classifier re-training) on cached head inputs vs the frozen backbone every epoch.

    python bench/bench_crt.py [--model test_resnet] [--head linear] [--size 128] [--train 256] [--val 64]
        [--epochs 5] [--batch 32] [--workers 1] [--threads 1] [--json OUT.json]

Both sides are the library's own cRT (cxrlt.post.retrain_head.run, what retrain_head.py runs) on the same run and
cache, differing only in crt_feature_cache:
  cached    float32: the backbone runs once over the train and val rows (features written to disk as
            row files), then E head epochs read batches of features back by index;
  uncached  off: the backbone runs on every batch of every head epoch, and on the val rows after
            each epoch (and for the original head's and the final score).
The run is a synthetic cache (bench/common.py) and a backbone trained for one batch (the
weights do not matter for the timing). Reported: wall seconds of each cRT call, the speed-up of
the head epochs alone (summary head_train_seconds) and of the whole call (ideal: about E x, one
backbone pass instead of E), and the same without the val scoring: cRT scores the val rows
(cxrlt.evaluation.metrics.score, sklearn AP/AUC per label) for the original head, after every epoch and for
the final head, identical work in both that a tiny val set makes a large share of the cached
run. That share is measured from outside: one metrics.score call on the same val labels, timed
SCORE_REPEATS times, times the E + 2 calls.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import add_json_flag, set_torch_threads, write_result, write_synthetic_cache

SCORE_REPEATS = 5  # metrics.score timings per measurement (median)


def timed_crt(run_dir, cache_dir, out, overrides: dict) -> tuple[float, dict]:
    """One cxrlt.post.retrain_head.run call -> (wall seconds, its summary)."""
    from cxrlt.post.retrain_head import run as run_crt

    t0 = time.perf_counter()
    summary = run_crt(run_dir, cache_dir, out, overrides, log=lambda *_: None)
    return time.perf_counter() - t0, summary


def score_seconds(y_val: np.ndarray, repeats: int = SCORE_REPEATS) -> float:
    """Seconds of one metrics.score call on these labels (median of `repeats`; random scores)."""
    from cxrlt.evaluation.metrics import score

    p = np.random.default_rng(0).random(y_val.shape)
    score(y_val, p)  # warm-up: imports sklearn
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score(y_val, p)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(model: str = "test_resnet", size: int = 128, n_train: int = 256, n_val: int = 64, epochs: int = 5,
        batch: int = 32, workers: int = 1, threads: int = 1, head: str = "linear", workdir=None) -> dict:
    """Time cRT with the feature cache (float32) and without it (off) on the same run and data."""
    from cxrlt.core import config
    from cxrlt.data.cache import open_cache
    from cxrlt.training.trainer import train

    threads = set_torch_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench_crt_", dir=workdir) as tmp:
        tmp = Path(tmp)
        cache_dir = write_synthetic_cache(tmp / "cache", n_train=n_train, size=size, n_val=n_val)
        cfg = config.resolve([], dict(model=model, pretrained=False, head=head, epochs=1, max_train_batches=1,
                                      batch_size=batch, workers=0, device="cpu"))
        train(cfg, str(cache_dir), str(tmp / "run"))
        cache = open_cache(cache_dir)
        per_call = score_seconds(cache.targets(cache.rows("train", fold=cfg["val_fold"])))
        same = {"crt_epochs": epochs, "crt_batch_size": batch, "workers": workers, "device": "cpu"}
        t_cached, s_cached = timed_crt(tmp / "run", cache_dir, tmp / "crt_cached",
                                       {**same, "crt_feature_cache": "float32"})
        t_base, s_base = timed_crt(tmp / "run", cache_dir, tmp / "crt_off", {**same, "crt_feature_cache": "off"})
    assert s_cached["feature_cache"] == "float32" and s_base["feature_cache"] == "off"
    t_extract, t_head = s_cached["feature_seconds"], s_cached["head_train_seconds"]
    scoring = per_call * (epochs + 2)  # the original head, every epoch, the final head
    base_ex, cached_ex = t_base - scoring, t_cached - scoring
    return {"model": model, "head": head, "size": size, "train_images": n_train, "val_images": n_val,
            "epochs": epochs, "batch": batch, "workers": workers, "torch_threads": threads,
            "load_avg_1min": os.getloadavg()[0],
            "extract_s": t_extract, "head_epochs_s": t_head, "cached_total_s": t_cached,
            "backbone_every_epoch_s": t_base, "uncached_head_epochs_s": s_base["head_train_seconds"],
            "speedup_head_only": s_base["head_train_seconds"] / t_head, "speedup_incl_extract": t_base / t_cached,
            "val_scoring_s_per_call": per_call, "val_scoring_calls": epochs + 2, "val_scoring_s": scoring,
            "cached_total_excl_scoring_s": cached_ex, "uncached_excl_scoring_s": base_ex,
            "speedup_excl_scoring": base_ex / cached_ex,
            "val_mAP_cached": s_cached["val_mAP"], "val_mAP_uncached": s_base["val_mAP"]}


def main() -> None:
    from cxrlt.core.config import HEAD_NAMES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--head", default="linear", choices=HEAD_NAMES)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train", type=int, default=256, help="training images")
    ap.add_argument("--val", type=int, default=64, help="val images")
    ap.add_argument("--epochs", type=int, default=5, help="head epochs E")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    add_json_flag(ap)
    a = ap.parse_args()
    r = run(a.model, a.size, a.train, a.val, a.epochs, a.batch, a.workers, a.threads, a.head)
    print(f"cRT, {r['model']} + {r['head']} head @ {r['size']} px, {r['train_images']}+{r['val_images']} images, "
          f"{r['epochs']} epochs: cached {r['cached_total_s']:.1f} s ({r['extract_s']:.1f} s extraction + "
          f"{r['head_epochs_s']:.2f} s head epochs); backbone every epoch {r['backbone_every_epoch_s']:.1f} s -> "
          f"{r['speedup_incl_extract']:.1f}x the whole call, {r['speedup_head_only']:.1f}x head epochs alone; "
          f"without the val scoring (sklearn, "
          f"{r['val_scoring_s_per_call']:.2f} s/call, {r['val_scoring_calls']} calls in both) "
          f"{r['speedup_excl_scoring']:.1f}x")
    write_result(a.json, r)


if __name__ == "__main__":
    main()
