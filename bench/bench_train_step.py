#!/usr/bin/env python
"""Training step time: train.py's Trainer vs a bare PyTorch loop on the same model and batch.

    python bench/bench_train_step.py [--model test_resnet] [--size 128] [--batch 32] [--steps 8]
        [--repeats 2] [--workers 1] [--json OUT.json]
    python bench/bench_train_step.py --gpu [--model convnext_large] [--size 512] ...   # GPU section

Trainer: cxrlt.training.trainer.Trainer on a synthetic cache (uint8 images, augmentation on, DataLoader with
--workers processes), timed through Trainer.train_epoch: an optimizer step post-hook stamps the time
of every step, so the steady-state ms/step is the median gap between consecutive steps and the
loader's per-epoch start-up (worker fork, first batch) is reported apart.
Bare loop: the same architecture (cxrlt.models.model.build_model), the same loss module and batch size,
AdamW, the batches pre-stacked in memory as float tensors already normalised; forward, backward,
step and nothing else. Trainer and bare loop alternate, `--repeats` times each, so background load
hits both alike. Target: Trainer / bare <= 1.10.

GPU section (--gpu, or run_gpu()): for each row of GPU_MATRIX (model + head, image size, batch,
channels_last, torch.compile, grad_checkpointing; --model/--size keep only the matching rows):
images/s of Trainer.train_epoch in bf16, the model FLOP utilisation (model FLOPs of one forward +
backward, counted by torch.utils.flop_counter.FlopCounterMode on the model without checkpointing,
so the recomputation of grad_checkpointing is cost, not credit; divided by the card's dense bf16
peak), the data wait fraction the Trainer reports (`data_wait_frac`), the peak GPU memory, and the
host syncs per step (torch.cuda.set_sync_debug_mode counts every op that waits for the GPU: the
Trainer's only one is the NaN/loss check every nan_check_steps batches). A row that does not fit
in memory is reported as OOM.

The synthetic cache: bench/common.py (write_synthetic_cache).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (add_json_flag, children_cpu_seconds, loader_worker_pids, pids_cpu_seconds, set_torch_threads,
                    write_result, write_synthetic_cache)

# Dense bf16 tensor-core peak (FLOP/s) by a substring of torch.cuda.get_device_name(); the first
# match wins, so the more specific names come first. Sources: the vendors' data sheets.
GPU_PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("V100", 125e12),
]


# ----------------------------------------------------------------------------------------------
# Trainer vs bare loop (CPU or GPU)
# ----------------------------------------------------------------------------------------------
def bench_cfg(model: str, size: int, batch: int, steps: int, workers: int, device: str, **kw) -> dict:
    """A resolved config for timing: random init, BCE + linear head, augmentation on (the default)."""
    from cxrlt.core import config

    over = dict(model=model, pretrained=False, head="linear", loss="bce", batch_size=batch, workers=workers,
                device=device, epochs=100, warmup_epochs=0.0, max_train_batches=steps, lr=1e-4)
    over.update(kw)
    return config.resolve([], over)


class StepClock:
    """Wall and process-CPU stamps taken right after each optimizer step (an optimizer post-hook)."""

    def __init__(self, optimizer, device):
        self.device = device
        self.stamps: list[float] = []
        self.cpu: list[float] = []
        self.handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, *_):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def gaps(self) -> list[float]:
        return list(np.diff(self.stamps))

    def cpu_gaps(self) -> list[float]:
        return list(np.diff(self.cpu))


def close_trainer_log() -> None:
    """Close the handlers the Trainer attached (its train.log lives in a folder we delete)."""
    import logging

    log = logging.getLogger("cxrlt.train")
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)


def _sync(device) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def measured_epoch(trainer, epoch: int) -> tuple[dict, int, float]:
    """trainer_epoch under CUDA's sync-debug mode -> (its stats, host syncs counted, steady-state
    images/s from the median step gap, else the epoch's own rate)."""
    import warnings

    import torch

    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            e = trainer_epoch(trainer, epoch)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    batch = trainer.cfg["batch_size"]
    img_s = batch / float(np.median(e["gaps"])) if e["gaps"] else e["images_per_s"]
    return e, syncs, img_s


def trainer_epoch(trainer, epoch: int) -> dict:
    """One Trainer.train_epoch -> per-step gaps (s) of the steady state, the epoch's wall time and
    the Trainer's own stats (images_per_s, data_wait_frac)."""
    clock = StepClock(trainer.optimizer, trainer.device)
    live0 = pids_cpu_seconds(loader_worker_pids(trainer.train_loader))
    c0, t0 = children_cpu_seconds(), time.perf_counter()
    stats = trainer.train_epoch(epoch)  # its loader's workers persist (counted live, from /proc)
    _sync(trainer.device)
    wall = time.perf_counter() - t0
    clock.handle.remove()
    live = pids_cpu_seconds(loader_worker_pids(trainer.train_loader)) - live0
    first = clock.stamps[0] - t0 if clock.stamps else wall  # loader start-up + first step
    return {"gaps": clock.gaps(), "cpu_gaps": clock.cpu_gaps(), "wall_s": wall, "first_step_s": first,
            "steps": len(clock.stamps), "worker_cpu_s": children_cpu_seconds() - c0 + live, **stats}


def bare_batches(model, cache_dir: Path, rows, targets, batch: int, steps: int, device):
    """The same images as the Trainer sees (no augmentation), as normalised float batches in memory."""
    import torch

    images = np.load(Path(cache_dir) / "images.npy", mmap_mode="r")
    out = []
    for s in range(steps):
        r = rows[s * batch:(s + 1) * batch]
        x = torch.from_numpy(np.ascontiguousarray(images[r]))[:, None].to(device)
        y = torch.from_numpy(np.asarray(targets[s * batch:(s + 1) * batch], dtype=np.float32)).to(device)
        with torch.no_grad():
            out.append((model.normalize(x).contiguous(), y))
    return out


def bare_epoch(model, loss_fn, optimizer, batches, device) -> dict:
    """forward, loss, backward, step over in-memory batches -> per-step gaps (s) and wall time."""
    model.train()
    clock = StepClock(optimizer, device)
    t0 = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    _sync(device)
    wall = time.perf_counter() - t0
    clock.handle.remove()
    return {"gaps": clock.gaps(), "cpu_gaps": clock.cpu_gaps(), "wall_s": wall, "steps": len(clock.stamps)}


def _bare_setup(trainer, cfg: dict, steps: int):
    """A second model of the same architecture with the same loss, AdamW and batches."""
    import torch

    from cxrlt.models.losses import build_loss
    from cxrlt.models.model import build_model

    dev = trainer.device
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, len(trainer.labels)).to(dev)
    loss_fn = build_loss(cfg, trainer.class_counts, len(trainer.train_rows)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    y = trainer.cache.targets(trainer.train_rows)
    batches = bare_batches(model, trainer.cache_dir, trainer.train_rows, y, cfg["batch_size"], steps, dev)
    return model, loss_fn, opt, batches


def run(model: str = "test_resnet", size: int = 128, batch: int = 32, steps: int = 6, repeats: int = 5,
        workers: int = 1, device: str = "cpu", threads: int = 1, workdir=None) -> dict:
    """Trainer vs bare loop, alternating, `repeats` epochs of `steps` steps each -> numbers (ms).
    threads: torch intra-op threads for both (see common.set_torch_threads)."""
    threads = set_torch_threads(threads)
    from cxrlt.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench_train_", dir=workdir) as tmp:
        tmp = Path(tmp)
        cache = write_synthetic_cache(tmp / "cache", n_train=batch * steps, size=size, n_val=8)
        cfg = bench_cfg(model, size, batch, steps, workers, device)
        trainer = Trainer(cfg, str(cache), str(tmp / "run"))
        bare = _bare_setup(trainer, cfg, steps)
        tr, ba = [], []
        bare_epoch(*bare, trainer.device)  # warm-up both (allocator, first-call dispatch)
        trainer_epoch(trainer, 0)
        for r in range(repeats):
            ba.append(bare_epoch(*bare, trainer.device))
            tr.append(trainer_epoch(trainer, r + 1))
        close_trainer_log()
    return _summarise(tr, ba, dict(model=model, size=size, batch=batch, steps=steps, repeats=repeats,
                                   workers=workers, device=str(device), torch_threads=threads,
                                   load_avg_1min=os.getloadavg()[0]))


def _summarise(tr: list[dict], ba: list[dict], settings: dict) -> dict:
    """Medians of the steady-state step gaps. The ratio is the median over repeats of the
    per-repeat ratio: each trainer epoch is compared with the bare epoch run just before it, so
    slow changes in the machine's load cancel out."""
    med = lambda key, es: [float(np.median(e[key])) for e in es]  # noqa: E731
    t_gap, b_gap = med("gaps", tr), med("gaps", ba)
    ratios = [t / b for t, b in zip(t_gap, b_gap)]
    # CPU per step: main process (steady state) + its loader worker's CPU spread over the epoch
    t_cpu = [c + e["worker_cpu_s"] / e["steps"] for c, e in zip(med("cpu_gaps", tr), tr)]
    b_cpu = med("cpu_gaps", ba)
    cpu_ratios = [t / b for t, b in zip(t_cpu, b_cpu)]
    t_epoch = [e["wall_s"] / e["steps"] for e in tr]
    b_epoch = [e["wall_s"] / e["steps"] for e in ba]
    m = lambda v: float(np.median(v))  # noqa: E731
    return {**settings,
            "trainer_ms_per_step": 1000 * m(t_gap), "bare_ms_per_step": 1000 * m(b_gap), "ratio": m(ratios),
            "ratio_per_repeat": ratios,
            "trainer_cpu_ms_per_step": 1000 * m(t_cpu), "bare_cpu_ms_per_step": 1000 * m(b_cpu),
            "trainer_worker_cpu_ms_per_step": 1000 * m([e["worker_cpu_s"] / e["steps"] for e in tr]),
            "cpu_ratio": m(cpu_ratios),
            "trainer_epoch_ms_per_step": 1000 * m(t_epoch), "bare_epoch_ms_per_step": 1000 * m(b_epoch),
            "epoch_ratio": m([t / b for t, b in zip(t_epoch, b_epoch)]),
            "trainer_first_step_s": m([e["first_step_s"] for e in tr]),
            "data_wait_frac": m([e["data_wait_frac"] for e in tr]),
            "trainer_images_per_s": m([e["images_per_s"] for e in tr]),
            "target_ratio": 1.10}


# ----------------------------------------------------------------------------------------------
# GPU section
# ----------------------------------------------------------------------------------------------
def flops_per_image(model, size: int, in_chans: int, device, amp: bool, batch: int = 2) -> float:
    """FLOPs of one forward + backward per image (FlopCounterMode counts matmuls/convs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cxrlt.training.device import autocast_ctx

    model.train()
    x = torch.randn(batch, in_chans, size, size, device=device)
    with FlopCounterMode(display=False) as fc:
        with autocast_ctx(device, amp):
            out = model(x)
        out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / batch


def peak_flops(device) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s or None, device name)."""
    import torch

    if getattr(device, "type", "cpu") != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAK_BF16:
        if key in name:
            return peak, name
    return None, name


def _matrix() -> list[dict]:
    """The issue-11 rows: each model at 512 px with channels_last / compile / grad_checkpointing
    on and off, then 768 and 1024 px with all three on (batch 16 at 1024: see the README recipes)."""
    rows = []
    for model, head in (("convnext_large", "linear"), ("convnextv2_base", "csra")):
        for cl, comp, gc in ((False, False, False), (True, False, False), (True, True, False),
                             (True, False, True), (True, True, True)):
            rows.append(dict(model=model, head=head, size=512, batch=32, channels_last=cl, compile=comp,
                             grad_checkpointing=gc))
        rows += [dict(model=model, head=head, size=s, batch=b, channels_last=True, compile=True,
                      grad_checkpointing=True) for s, b in ((768, 32), (1024, 16))]
    return rows


GPU_MATRIX = _matrix()


def run_gpu(rows=None, steps: int = 20, workers: int = 0, device: str = "cuda", peak_tflops: float = 0.0,
            nan_check_steps: int = 50, workdir=None) -> dict:
    """Trainer images/s, MFU, data wait, peak memory and host syncs per step for each row
    (dicts with the keys of GPU_MATRIX's rows; default: all of GPU_MATRIX).

    Each row: a fresh Trainer, one warm-up epoch (compilation, cuDNN autotuning), one timed epoch
    of `steps` steps. One synthetic cache per image size. workers=0 picks min(8, CPU count).
    """
    import torch

    workers = workers or min(8, os.cpu_count() or 1)
    out, fpi = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_", dir=workdir) as tmp:
        tmp = Path(tmp)
        caches = {}
        for i, row in enumerate(GPU_MATRIX if rows is None else rows):
            size, batch = row["size"], row["batch"]
            if size not in caches:
                caches[size] = write_synthetic_cache(tmp / f"cache{size}", n_train=batch * steps, size=size, n_val=8)
            cfg = bench_cfg(row["model"], size, batch, steps, workers, device, amp=True, head=row["head"],
                            channels_last=row["channels_last"], compile=row["compile"],
                            grad_checkpointing=row["grad_checkpointing"], nan_check_steps=nan_check_steps)
            key = (row["model"], row["head"], size)
            try:
                if key not in fpi:
                    fpi[key] = _model_flops(cfg, size, device)
                res = _gpu_row(cfg, caches[size], tmp / f"run{i}", fpi[key], peak_tflops)
            except torch.cuda.OutOfMemoryError:
                res = {"oom": True}
            out.append({**row, **res})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        close_trainer_log()
    return {"steps": steps, "workers": workers, "nan_check_steps": nan_check_steps, "rows": out}


def _model_flops(cfg: dict, size: int, device) -> float:
    """Model FLOPs per image (forward + backward) of cfg's model without checkpointing."""
    import torch

    from cxrlt.models.model import build_model

    dev = torch.device(device)
    m = build_model({**cfg, "grad_checkpointing": False}, 30).to(dev)
    f = flops_per_image(m, size, cfg["in_chans"], dev, cfg["amp"] and dev.type == "cuda")
    del m
    return f


def select_rows(model: str | None = None, size: int | None = None, batch: int | None = None) -> list[dict]:
    """GPU_MATRIX rows for the CLI: `model` keeps its rows (a model outside the matrix, e.g. for a
    smoke run, takes convnext_large's); `size` keeps the rows of that size (another size takes the
    512 px rows at that size); `batch` sets every row's batch."""
    rows = GPU_MATRIX
    if model:
        mine = [r for r in rows if r["model"] == model]
        rows = mine or [{**r, "model": model} for r in rows if r["model"] == "convnext_large"]
    if size:
        mine = [r for r in rows if r["size"] == size]
        rows = mine or [{**r, "size": size} for r in rows if r["size"] == 512]
    return [{**r, "batch": batch} for r in rows] if batch else list(rows)


def _gpu_row(cfg: dict, cache: Path, out: Path, fpi: float, peak_tflops: float) -> dict:
    import torch

    from cxrlt.training.trainer import Trainer

    trainer = Trainer(cfg, str(cache), str(out))
    cuda = trainer.device.type == "cuda"
    trainer_epoch(trainer, 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    e, syncs, img_s = measured_epoch(trainer, 1)
    peak, name = peak_flops(trainer.device)
    peak = peak_tflops * 1e12 if peak_tflops else peak
    return {"images_per_s": img_s, "epoch_images_per_s": e["images_per_s"], "data_wait_frac": e["data_wait_frac"],
            "flops_per_image": fpi, "mfu": (img_s * fpi / peak) if peak else None, "device_name": name,
            "peak_flops": peak, "host_syncs_per_step": (syncs / max(1, e["steps"])) if cuda else None,
            "max_mem_gb": torch.cuda.max_memory_allocated(trainer.device) / 1e9 if cuda else None, "oom": False}


def gpu_lines(res: dict) -> list[str]:
    """The GPU rows as a markdown table (bench/results.md and the CLI print the same)."""
    name = next((r["device_name"] for r in res["rows"] if not r["oom"]), "?")
    out = [f"device: {name}; bf16 autocast, {res['workers']} loader workers, {res['steps']} timed steps per row, "
           f"NaN/loss check every {res['nan_check_steps']} batches; MFU counts model FLOPs (FlopCounterMode, "
           f"forward + backward, no recomputation)", "",
           "| model | px | batch | channels_last | compile | grad ckpt | images/s | MFU | data wait | peak memory "
           "| host syncs/step |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        head = f"| {r['model']}{' + CSRA' if r['head'] == 'csra' else ''} | {r['size']} | {r['batch']} | " \
               f"{r['channels_last']} | {r['compile']} | {r['grad_checkpointing']} |"
        if r["oom"]:
            out.append(head + " OOM | - | - | - | - |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['max_mem_gb']:.1f} GB" if r["max_mem_gb"] is not None else "-"
        syncs = f"{r['host_syncs_per_step']:.2f}" if r["host_syncs_per_step"] is not None else "-"
        out.append(head + f" {r['images_per_s']:.1f} | {mfu} | {100 * r['data_wait_frac']:.1f}% | {mem} | {syncs} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="timm model (default test_resnet; --gpu: only its GPU_MATRIX rows)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 128; --gpu: only rows of this size)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 32; --gpu: the matrix's)")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed epoch (default 6; --gpu: 20)")
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs of each (CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0 = torch's default)")
    ap.add_argument("--workers", type=int, default=None, help="loader processes (default 1; --gpu: min(8, cores))")
    ap.add_argument("--device", default=None, help="cpu (default) | cuda")
    ap.add_argument("--gpu", action="store_true", help="the GPU section (GPU_MATRIX rows, bf16)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="GPU dense bf16 peak if the card is not known")
    add_json_flag(ap)
    a = ap.parse_args()
    if a.gpu:
        res = run_gpu(select_rows(a.model, a.size, a.batch), a.steps or 20, a.workers or 0, a.device or "cuda", peak_tflops=a.peak_tflops)
        print("\n".join(gpu_lines(res)))
    else:
        res = run(a.model or "test_resnet", a.size or 128, a.batch or 32, a.steps or 6, a.repeats,
                  1 if a.workers is None else a.workers, a.device or "cpu", a.threads)
        print(f"train step, {res['model']} @ {res['size']} px, batch {res['batch']}: Trainer "
              f"{res['trainer_ms_per_step']:.0f} ms/step, bare loop {res['bare_ms_per_step']:.0f} ms/step -> "
              f"{res['ratio']:.3f}x (target <= 1.10); CPU time {res['trainer_cpu_ms_per_step']:.0f} vs "
              f"{res['bare_cpu_ms_per_step']:.0f} ms/step -> {res['cpu_ratio']:.3f}x; whole epoch incl. loader "
              f"start-up {res['epoch_ratio']:.3f}x; data wait {100 * res['data_wait_frac']:.1f}%")
    write_result(a.json, res)


if __name__ == "__main__":
    main()
