#!/usr/bin/env python
"""cRT (classifier re-training) on cached features vs re-running the frozen backbone every epoch.

    python bench/bench_crt.py [--model test_resnet] [--size 128] [--train 256] [--val 64] [--epochs 5]
        [--batch 32] [--workers 1] [--threads 1] [--json OUT.json]

Cached (what retrain_head.py does): cxrlt.crt.extract_features once for the train and val rows,
then cxrlt.crt.train_head for E epochs (class-aware batches, head forward/backward/step, val mAP
from the cached val features after each epoch).
Uncached baseline: the same head, loss, optimizer, LR schedule and sampler batches, but every
batch's images are read from the cache and run through the frozen backbone (no_grad) each epoch,
and the val rows go through the backbone after each epoch too. Images are read straight from the
memmap in this process (no DataLoader), which if anything flatters the baseline.
Reported: seconds for both, the speed-up of the head epochs alone and including the one-off
feature extraction (ideal: about E x, one backbone pass instead of E), and the same without the val
scoring after each epoch (sklearn AP/AUC per label: identical work in both loops, timed apart by
wrapping cxrlt.metrics.score; on a tiny val set it is a large share of the cached run).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train_step import write_synthetic_cache  # noqa: E402


class ScoreTimer:
    """Patches cxrlt.metrics.score (the val mAP/mAUC both loops compute after every epoch, with
    sklearn) to add up the seconds spent in it: the same work in both loops, reported apart."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self):
        import cxrlt.metrics as T

        self._orig = T.score

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return self._orig(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        T.score = timed
        return self

    def __exit__(self, *exc):
        import cxrlt.metrics as T

        T.score = self._orig


def backbone_epochs(model, images, tr_rows, y_tr, va_rows, y_va, cfg: dict, device) -> float:
    """The uncached cRT loop, mirroring cxrlt.crt.train_head step for step -> seconds."""
    import torch

    import cxrlt.metrics as T
    from cxrlt.losses import build_loss
    from cxrlt.samplers import build_sampler

    t0 = time.perf_counter()
    head = copy.deepcopy(model.head).to(device)
    for p in head.parameters():
        p.requires_grad_(True)
    torch.manual_seed(cfg["seed"])
    for m in head.modules():
        if hasattr(m, "reset_parameters") and m is not head:
            m.reset_parameters()
    loss_fn = build_loss({**cfg, "drw_epoch": -1}, y_tr.sum(0), len(y_tr), name=cfg["crt_loss"]).to(device)
    sampler = build_sampler(cfg["crt_sampler"], y_tr, cfg, seed=cfg["seed"])
    bs = min(cfg["crt_batch_size"], len(y_tr))
    steps = max(1, len(sampler) // bs)
    total = steps * cfg["crt_epochs"]
    opt = torch.optim.AdamW(head.parameters(), lr=cfg["crt_lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    y_t = torch.from_numpy(y_tr.astype(np.float32))
    model.eval()

    def feats(rows):
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images[np.asarray(rows)]))[:, None].to(device)
            return model.head_input(model.normalize(x))

    for epoch in range(cfg["crt_epochs"]):
        sampler.set_epoch(epoch)
        idx = np.fromiter(iter(sampler), dtype=np.int64)
        head.train()
        for s in range(steps):
            b = idx[s * bs:(s + 1) * bs]
            loss = loss_fn(head.classify(feats(tr_rows[b])).float(), y_t[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        head.eval()
        with torch.no_grad():
            p = np.concatenate([torch.sigmoid(head.classify(feats(va_rows[i:i + bs])).float()).cpu().numpy()
                                for i in range(0, len(va_rows), bs)])
        T.score(y_va, p)
    return time.perf_counter() - t0


def run(model: str = "test_resnet", size: int = 128, n_train: int = 256, n_val: int = 64, epochs: int = 5,
        batch: int = 32, workers: int = 1, threads: int = 1, workdir=None) -> dict:
    """Time cached cRT (extraction + head epochs) and the uncached loop on the same data."""
    import torch

    import cxrlt.metrics as T
    from cxrlt import config
    from cxrlt.cache import open_cache
    from cxrlt.crt import extract_features, train_head
    from cxrlt.models import build_model

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cpu")
    cfg = config.resolve([], dict(model=model, pretrained=False, head="linear", crt_epochs=epochs,
                                  crt_batch_size=batch, workers=workers, device="cpu"))
    with tempfile.TemporaryDirectory(prefix="bench_crt_", dir=workdir) as tmp:
        tmp = Path(tmp)
        cache_dir = write_synthetic_cache(tmp / "cache", n_train=n_train, size=size, n_val=n_val)
        cache = open_cache(cache_dir)
        tr_rows, va_rows = cache.rows("train", exclude_fold=0), cache.rows("train", fold=0)
        y_tr, y_va = cache.targets(tr_rows), cache.targets(va_rows)
        torch.manual_seed(0)
        net = build_model(cfg, len(cache.labels)).to(device)
        for p in net.parameters():
            p.requires_grad_(False)
        images = cache_dir / "images.npy"
        T.score(y_va, np.random.default_rng(0).random(y_va.shape))  # warm-up: imports sklearn

        t0 = time.perf_counter()
        f_tr = extract_features(net, images, tr_rows, device, batch_size=batch, workers=workers, amp=False)
        f_va = extract_features(net, images, va_rows, device, batch_size=batch, workers=workers, amp=False)
        t_extract = time.perf_counter() - t0
        (tmp / "crt").mkdir()
        with ScoreTimer() as sc_head:
            t0 = time.perf_counter()
            train_head(net, f_tr, y_tr, f_va, y_va, cfg, device, tmp / "crt", log=lambda *_: None)
            t_head = time.perf_counter() - t0
        with ScoreTimer() as sc_base:
            t_base = backbone_epochs(net, cache.images, tr_rows, y_tr, va_rows, y_va, cfg, device)
    # without the val scoring (sklearn AP/AUC per label, the same in both loops): what caching changes
    base_ex, cached_ex = t_base - sc_base.seconds, t_extract + t_head - sc_head.seconds
    return {"model": model, "size": size, "train_images": int(len(tr_rows)), "val_images": int(len(va_rows)),
            "epochs": epochs, "batch": batch, "workers": workers, "torch_threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0],
            "extract_s": t_extract, "head_epochs_s": t_head, "cached_total_s": t_extract + t_head,
            "backbone_every_epoch_s": t_base, "speedup_head_only": t_base / t_head,
            "speedup_incl_extract": t_base / (t_extract + t_head),
            "val_scoring_s_cached": sc_head.seconds, "val_scoring_calls_cached": sc_head.calls,
            "val_scoring_s_uncached": sc_base.seconds, "val_scoring_calls_uncached": sc_base.calls,
            "cached_total_excl_scoring_s": cached_ex, "uncached_excl_scoring_s": base_ex,
            "speedup_excl_scoring": base_ex / cached_ex}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train", type=int, default=256, help="training images")
    ap.add_argument("--val", type=int, default=64, help="val images")
    ap.add_argument("--epochs", type=int, default=5, help="head epochs E")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = ap.parse_args()
    r = run(a.model, a.size, a.train, a.val, a.epochs, a.batch, a.workers, a.threads)
    print(f"cRT, {r['model']} @ {r['size']} px, {r['train_images']}+{r['val_images']} images, {r['epochs']} epochs: "
          f"cached {r['extract_s']:.1f} s extraction + {r['head_epochs_s']:.2f} s head epochs; backbone every "
          f"epoch {r['backbone_every_epoch_s']:.1f} s -> {r['speedup_incl_extract']:.1f}x incl. extraction, "
          f"{r['speedup_head_only']:.1f}x head epochs alone; without the val scoring (sklearn, "
          f"{r['val_scoring_s_uncached'] / max(1, r['val_scoring_calls_uncached']):.2f} s/epoch in both) "
          f"{r['speedup_excl_scoring']:.1f}x")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
