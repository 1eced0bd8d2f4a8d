#!/usr/bin/env python
"""Inference time per TTA view: cxrlt.post.inference.predict_tta vs a bare forward pass.

    python bench/bench_predict.py [--model test_resnet] [--size 128] [--batch 32] [--batches 8]
        [--repeats 3] [--workers 1] [--threads 1] [--json OUT.json]

predict_tta (what predict.py runs) reads a synthetic cache through the DataLoader (uint8 batches),
applies each TTA view on the device, normalises, runs the model and merges the views. The bare
baseline runs `model(x)` under no_grad on the same images, pre-normalised float batches in memory.
Both: ms per view per image. A forward hook stamps the end of every forward pass, so the
steady state (median gap between consecutive batches, divided by views x batch) is separated from
the loader's start-up at each call (worker fork + first batch: a fixed cost per predict.py run,
reported apart). tta "none" (1 view) and "flip_scale" (4 views) alternate with the bare loop
`--repeats` times. Target: predict_tta per view <= 1.10 x bare.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import add_json_flag, children_cpu_seconds, set_torch_threads, write_result, write_synthetic_cache


class ForwardClock:
    """Wall and process-CPU stamps at the end of every forward pass of `model` (a forward hook)."""

    def __init__(self, model):
        self.stamps: list[float] = []
        self.cpu: list[float] = []
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def batch_gaps(self, views: int, cpu: bool = False) -> list[float]:
        """Seconds (wall, or CPU of this process) between the last views of consecutive batches."""
        ends = (self.cpu if cpu else self.stamps)[views - 1::views]
        return list(np.diff(ends))


def tta_pass(model, images_path, rows, num_classes, batch, workers, tta: str) -> dict:
    """One predict_tta call over `rows` -> steady-state seconds per batch, wall, start-up."""
    import torch

    from cxrlt.data.dataset import CacheDataset, make_loader
    from cxrlt.post.inference import TTA_VIEWS, predict_tta

    views = len(TTA_VIEWS[tta])
    loader = make_loader(CacheDataset(images_path, rows, num_classes=num_classes), batch, workers=workers)
    clock = ForwardClock(model)
    c0, t0 = children_cpu_seconds(), time.perf_counter()
    got, probs = predict_tta(model, loader, torch.device("cpu"), tta=tta, amp=False, progress=False)
    wall = time.perf_counter() - t0
    del loader  # joins the worker, so its CPU time is counted below
    worker_cpu = children_cpu_seconds() - c0
    clock.handle.remove()
    assert len(got) == len(rows) and probs.shape == (len(rows), num_classes)
    first = clock.stamps[views - 1] - t0  # loader start-up + the first batch's views
    return {"gaps": clock.batch_gaps(views), "cpu_gaps": clock.batch_gaps(views, cpu=True), "wall_s": wall,
            "first_batch_s": first, "views": views, "worker_cpu_per_batch": worker_cpu / max(1, len(rows) / batch)}


def bare_pass(model, batches) -> dict:
    """model(x) under no_grad over in-memory normalised batches -> seconds per batch."""
    import torch

    clock = ForwardClock(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            torch.sigmoid(model(x))
    wall = time.perf_counter() - t0
    clock.handle.remove()
    return {"gaps": list(np.diff(clock.stamps)), "cpu_gaps": list(np.diff(clock.cpu)), "wall_s": wall, "views": 1,
            "worker_cpu_per_batch": 0.0}


def run(model: str = "test_resnet", size: int = 128, batch: int = 32, batches: int = 8, repeats: int = 3,
        workers: int = 1, threads: int = 1, workdir=None) -> dict:
    """predict_tta(tta none / flip_scale) vs bare forward -> ms per view per image and ratios.
    threads: torch threads (see common.set_torch_threads)."""
    import torch

    from cxrlt.core import config
    from cxrlt.models.model import build_model

    threads = set_torch_threads(threads)
    n = batch * batches
    with tempfile.TemporaryDirectory(prefix="bench_predict_", dir=workdir) as tmp:
        cache = write_synthetic_cache(Path(tmp) / "cache", n_train=0, size=size, n_test=n)
        images = cache / "images.npy"
        rows = np.arange(n)
        torch.manual_seed(0)
        net = build_model(config.resolve([], dict(model=model, pretrained=False)), 30).eval()
        arr = np.load(images, mmap_mode="r")
        with torch.no_grad():
            mem = [net.normalize(torch.from_numpy(np.array(arr[i:i + batch]))[:, None]).contiguous()
                   for i in range(0, n, batch)]
        del arr
        bare_pass(net, mem[:2])  # warm-up
        tta_pass(net, images, rows[:batch * 2], 30, batch, workers, "flip_scale")
        res = {"bare": [], "none": [], "flip_scale": []}
        for _ in range(repeats):
            res["bare"].append(bare_pass(net, mem))
            res["none"].append(tta_pass(net, images, rows, 30, batch, workers, "none"))
            res["flip_scale"].append(tta_pass(net, images, rows, 30, batch, workers, "flip_scale"))
    return _summarise(res, batch, dict(model=model, size=size, batch=batch, images=n, repeats=repeats,
                                       workers=workers, torch_threads=threads,
                                       load_avg_1min=os.getloadavg()[0]))


def _summarise(res: dict, batch: int, settings: dict) -> dict:
    """ms per view per image (steady state) and per-repeat paired ratios against the bare pass.
    CPU figures: this process's CPU per batch plus the loader worker's, per view per image."""
    per_view = {k: [float(np.median(e["gaps"])) / (e["views"] * batch) for e in v] for k, v in res.items()}
    cpu = {k: [(float(np.median(e["cpu_gaps"])) + e["worker_cpu_per_batch"]) / (e["views"] * batch) for e in v]
           for k, v in res.items()}
    out = dict(settings)
    out["bare_ms_per_image"] = 1000 * float(np.median(per_view["bare"]))
    out["bare_cpu_ms_per_image"] = 1000 * float(np.median(cpu["bare"]))
    for k in ("none", "flip_scale"):
        ratios = [t / b for t, b in zip(per_view[k], per_view["bare"])]
        out[f"{k}_ms_per_view_image"] = 1000 * float(np.median(per_view[k]))
        out[f"{k}_ratio"] = float(np.median(ratios))
        out[f"{k}_ratio_per_repeat"] = ratios
        out[f"{k}_cpu_ms_per_view_image"] = 1000 * float(np.median(cpu[k]))
        out[f"{k}_cpu_ratio"] = float(np.median([t / b for t, b in zip(cpu[k], cpu["bare"])]))
        out[f"{k}_startup_s"] = float(np.median([e["first_batch_s"] - e["views"] * g * batch
                                                 for e, g in zip(res[k], per_view[k])]))
        walls = [e["wall_s"] / (e["views"] * settings["images"]) for e in res[k]]
        out[f"{k}_call_ms_per_view_image"] = 1000 * float(np.median(walls))  # incl. start-up
    out["target_ratio"] = 1.10
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="batches per pass (images = batch x batches)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    add_json_flag(ap)
    a = ap.parse_args()
    r = run(a.model, a.size, a.batch, a.batches, a.repeats, a.workers, a.threads)
    print(f"predict, {r['model']} @ {r['size']} px, batch {r['batch']}: bare forward {r['bare_ms_per_image']:.2f} "
          f"ms/image; predict_tta none {r['none_ms_per_view_image']:.2f} ms/view/image ({r['none_ratio']:.3f}x), "
          f"flip_scale {r['flip_scale_ms_per_view_image']:.2f} ms/view/image ({r['flip_scale_ratio']:.3f}x) "
          f"(target <= 1.10); CPU-time ratios {r['none_cpu_ratio']:.3f}x / {r['flip_scale_cpu_ratio']:.3f}x; "
          f"loader start-up per call {r['none_startup_s']:.2f} s")
    write_result(a.json, r)


if __name__ == "__main__":
    main()
