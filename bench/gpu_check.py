#!/usr/bin/env python
"""The 5-minute GPU check (`make gpu-check`): one JSON line per measurement, written the moment it is
measured, so a row that runs out of memory, times out or fails keeps every other row.

    python bench/gpu_check.py [--out bench/gpu_check.jsonl] [--rows NAME ...] [--row-timeout 120]
    python bench/gpu_check.py --dry-run   # every row on the CPU: tiny model, 32 px, a few steps (the suite runs it)

Rows (the line's "row"; the model sizes are those of the real runs, --dry-run swaps in timm's
test_convnext at 32 px, batch 4, and the eager "compile" backend):
  bare_step_{eager,compiled}      ConvNeXt-L@512 bf16, batch 32: a bare forward/loss/backward/fused-AdamW
                                  loop on in-memory batches -> images/s, FLOPs per image (forward +
                                  backward, torch.utils.flop_counter), MFU against the card's dense
                                  bf16 peak (bench_train_step.GPU_PEAK_BF16)
  trainer_step_{eager,compiled}   the same model through Trainer.train_epoch (8 loader workers, augmentation,
                                  normalisation, channels_last, EMA off, NaN check) -> images/s, MFU,
                                  data_wait_frac, host syncs per step, peak memory
  trainer_step_v2b_csra           ConvNeXt-V2-B@512 with the CSRA head, compile auto
  data_wait_workers_{2,8}         the ConvNeXt-L Trainer step (eager, to stay in the budget) with 2 / 8
                                  loader workers: data-wait fraction and host syncs per step
  checkpoint_save                 last.pt of the ConvNeXt-L Trainer (weights + train weights + AdamW):
                                  size, a synchronous torch_save's seconds, BackgroundSaver's copy
                                  seconds (what the epoch-end barrier waits for) and write seconds,
                                  the stall as a fraction of a 143K-image epoch at the measured rate
  predict_bs{64,256}              predict_tta (flip) images/s, eval model bf16 channels_last
  crt_extract_csra                cRT feature extraction of ConvNeXt-V2-B CSRA maps as float16 row
                                  files (device conversion, pinned copies, writer thread): images/s
  res768_gc_{off,on}              ConvNeXt-L@768 batch 16 Trainer step (eager) with grad_checkpointing
                                  false / true: images/s, peak memory (OOM is a result), and what `auto`
                                  chooses at a run's start (its memory probe against the free memory)
  head_bf16_vs_fp32               the same backbone features scored by the head in fp32 (the head's
                                  rule) and in bf16 (the old path): distinct values per label and mAP

Budget: --budget-s (300) for all rows, --row-timeout (120) for one; a row past either is
"timeout", rows after the budget "skipped". Every line: {"row", "status": ok | oom | timeout |
error | skipped, "wall_s", "device", ...numbers}; the first
line is {"row": "meta", torch, device name, peak FLOP/s, dry_run}. bench/results.md says what has
been measured on which device.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import add_json_flag, write_result, write_synthetic_cache

EPOCH_IMAGES = 143_000  # CXR-LT 2026 training images: the epoch a checkpoint stall is compared with


class RowTimeout(Exception):
    pass


# ---- settings: the real sizes, or the dry run's ---------------------------------------------------
def settings(dry: bool) -> dict:
    if dry:
        return dict(device="cpu", large="test_convnext", v2b="test_convnext", size=32, size_hi=48, batch=4,
                    batch_hi=4, steps=3, n_val=8, predict_n=16, predict_batches=(4, 8), crt_n=16, head_n=64,
                    workers=(0, 1))
    return dict(device="cuda", large="convnext_large.fb_in22k_ft_in1k", v2b="convnextv2_base.fcmae_ft_in22k_in1k",
                size=512, size_hi=768, batch=32, batch_hi=16, steps=12, n_val=64, predict_n=1024,
                predict_batches=(64, 256), crt_n=512, head_n=4096, workers=(2, 8))


def train_cfg(s: dict, model: str, size: int, batch: int, **kw) -> dict:
    from bench_train_step import bench_cfg

    over = dict(amp=True, channels_last=True, compile="false", grad_checkpointing="false", nan_check_steps=50)
    over.update(kw)
    return bench_cfg(model, size, batch, s["steps"], over.pop("workers", s["workers"][0]), s["device"], **over)


# ---- the rows -------------------------------------------------------------------------------------------
class Context:
    """What rows share: the settings, a scratch folder with one synthetic cache per size, the FLOPs
    per image of each (model, head, size), the last trainer step rate (for the checkpoint row)."""

    def __init__(self, s: dict, tmp: Path):
        self.s, self.tmp = s, tmp
        self.caches: dict = {}
        self.fpi: dict = {}
        self.rate: float | None = None
        self.n = 0

    def cache(self, size: int, n_train: int) -> Path:
        key = (size, n_train)
        if key not in self.caches:
            self.caches[key] = write_synthetic_cache(self.tmp / f"cache{size}_{n_train}", n_train=n_train, size=size,
                                                     n_val=self.s["n_val"])
        return self.caches[key]

    def out(self) -> Path:
        self.n += 1
        return self.tmp / f"run{self.n}"

    def flops(self, cfg: dict, size: int) -> float:
        from bench_train_step import _model_flops

        key = (cfg["model"], cfg["head"], size)
        if key not in self.fpi:
            self.fpi[key] = _model_flops(cfg, size, self.s["device"])
        return self.fpi[key]


def _peak(device) -> float | None:
    from bench_train_step import peak_flops

    return peak_flops(device)[0]


def _mfu(img_s: float, fpi: float, device) -> float | None:
    peak = _peak(device)
    return img_s * fpi / peak if peak else None


def _mem(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _reset_mem(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bare_step(ctx: Context, compiled: bool) -> dict:
    import torch

    from bench_train_step import bare_epoch
    from cxrlt.models.losses import build_loss
    from cxrlt.models.model import build_model
    from cxrlt.training.device import autocast_ctx, enable_cuda_fast_paths, maybe_compile, optimizer_kwargs

    s = ctx.s
    dev = torch.device(s["device"])
    enable_cuda_fast_paths(dev)
    cfg = train_cfg(s, s["large"], s["size"], s["batch"])
    fpi = ctx.flops(cfg, s["size"])
    torch.manual_seed(0)
    model = build_model(cfg, 30).to(dev).to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg, np.full(30, 10.0), 100).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **optimizer_kwargs(dev))
    fwd = maybe_compile(model, compiled, "bare model")
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=dev).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(s["batch"], 30, device=dev) < 0.1).float()

    class Amp(torch.nn.Module):  # bare_epoch calls model(x): the step under bf16 autocast
        def forward(self, x):
            with autocast_ctx(dev, True):
                return fwd(x).float()

    _reset_mem(dev)
    bare_epoch(Amp(), loss_fn, opt, [(x, y)] * 2, dev)  # warm-up: compilation, cuDNN autotuning
    e = bare_epoch(Amp(), loss_fn, opt, [(x, y)] * s["steps"], dev)
    img_s = s["batch"] / float(np.median(e["gaps"]))
    return {"model": cfg["model"], "size": s["size"], "batch": s["batch"], "compiled": compiled, "images_per_s": img_s,
            "flops_per_image": fpi, "mfu": _mfu(img_s, fpi, dev), "max_mem_gb": _mem(dev)}


def _trainer_row(ctx: Context, cfg: dict, size: int) -> dict:
    from bench_train_step import measured_epoch, trainer_epoch
    from cxrlt.training.trainer import Trainer

    fpi = ctx.flops(cfg, size)
    cache = ctx.cache(size, cfg["batch_size"] * ctx.s["steps"])
    tr = Trainer(cfg, str(cache), str(ctx.out()))
    cuda = tr.device.type == "cuda"
    trainer_epoch(tr, 0)  # warm-up epoch: compilation, autotuning, worker start
    _reset_mem(tr.device)
    e, syncs, img_s = measured_epoch(tr, 1)
    row = {"model": cfg["model"], "head": cfg["head"], "size": size, "batch": cfg["batch_size"],
           "compile": cfg["compile"], "compiled": tr.compiled, "grad_checkpointing": tr.grad_checkpointing,
           "workers": cfg["workers"], "images_per_s": img_s, "flops_per_image": fpi, "mfu": _mfu(img_s, fpi, tr.device),
           "data_wait_frac": e["data_wait_frac"], "host_syncs_per_step": syncs / max(1, e["steps"]) if cuda else None,
           "max_mem_gb": _mem(tr.device)}
    return row


def trainer_step(ctx: Context, compiled: bool) -> dict:
    s = ctx.s
    row = _trainer_row(ctx, train_cfg(s, s["large"], s["size"], s["batch"], compile="true" if compiled else "false",
                                      workers=s["workers"][1]), s["size"])
    ctx.rate = row["images_per_s"]
    return row


def trainer_step_v2b_csra(ctx: Context) -> dict:
    s = ctx.s
    return _trainer_row(ctx, train_cfg(s, s["v2b"], s["size"], s["batch"], head="csra", compile="auto",
                                       workers=s["workers"][1]), s["size"])


def data_wait(ctx: Context, workers: int) -> dict:
    s = ctx.s
    cfg = train_cfg(s, s["large"], s["size"], s["batch"], compile="false", workers=workers)  # eager: the budget
    row = _trainer_row(ctx, cfg, s["size"])
    return {k: row[k] for k in ("model", "size", "batch", "workers", "compiled", "data_wait_frac",
                                "host_syncs_per_step", "images_per_s")}


def checkpoint_save(ctx: Context) -> dict:
    from bench_train_step import trainer_epoch
    from cxrlt.core.fileio import torch_save
    from cxrlt.models.checkpoint import BackgroundSaver
    from cxrlt.training.trainer import Trainer

    s = ctx.s
    cfg = train_cfg(s, s["large"], s["size"], s["batch"], compile="false")
    tr = Trainer(cfg, str(ctx.cache(s["size"], s["batch"] * s["steps"])), str(ctx.out()))
    trainer_epoch(tr, 0)  # AdamW state exists: last.pt at its real size
    state = tr._last_state(tr._meta(0), tr._eval_model().state_dict())
    t0 = time.perf_counter()
    torch_save(state, tr.out / "sync.pt")
    sync_s = time.perf_counter() - t0
    size_gb = (tr.out / "sync.pt").stat().st_size / 1e9
    saver = BackgroundSaver()
    saver.save([(state, tr.out / "last.pt")])  # first save: allocates the pinned buffers
    saver.wait()
    first_copy = saver.last_copy_s
    saver.save([(state, tr.out / "last.pt")])  # steady state: buffers reused
    copy_s = saver.last_copy_s
    saver.wait()
    rate = ctx.rate or 1.0
    epoch_s = EPOCH_IMAGES / rate
    return {"model": cfg["model"], "last_pt_gb": size_gb, "sync_save_s": sync_s, "first_copy_s": first_copy,
            "copy_s": copy_s, "write_s": saver.last_write_s, "barrier_wait_s": copy_s,
            "epoch_s_at_measured_rate": epoch_s if ctx.rate else None,
            "stall_frac_of_epoch": copy_s / epoch_s if ctx.rate else None,
            "sync_stall_frac_of_epoch": sync_s / epoch_s if ctx.rate else None}


def _eval_model(s: dict, name: str, head: str = "linear"):
    import torch

    from cxrlt.models.model import build_model

    cfg = train_cfg(s, name, s["size"], s["batch"], head=head)
    dev = torch.device(s["device"])
    torch.manual_seed(0)
    m = build_model(cfg, 30).to(dev).eval()
    if dev.type == "cuda":
        m = m.to(memory_format=torch.channels_last)
    return m, dev


def predict(ctx: Context, batch: int) -> dict:
    from bench_train_step import _sync
    from cxrlt.data.cache import open_cache
    from cxrlt.data.dataset import CacheDataset, make_loader
    from cxrlt.post.inference import predict_tta

    s = ctx.s
    model, dev = _eval_model(s, s["large"])
    cache = open_cache(ctx.cache(s["size"], s["predict_n"]))
    rows = cache.rows("train")
    ds = CacheDataset(cache.images_path, rows, num_classes=30)
    loader = make_loader(ds, batch, workers=s["workers"][-1], pin_memory=dev.type == "cuda", persistent=True)
    cl = dev.type == "cuda"
    predict_tta(model, loader, dev, "flip", amp=True, channels_last=cl, progress=False)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    predict_tta(model, loader, dev, "flip", amp=True, channels_last=cl, progress=False)
    _sync(dev)
    wall = time.perf_counter() - t0
    return {"model": s["large"], "size": s["size"], "batch": batch, "tta": "flip", "images": len(rows),
            "images_per_s": len(rows) / wall}


def crt_extract(ctx: Context) -> dict:
    from cxrlt.data.cache import open_cache
    from cxrlt.post.features import extract_features

    s = ctx.s
    model, dev = _eval_model(s, s["v2b"], head="csra")
    cache = open_cache(ctx.cache(s["size"], s["crt_n"]))
    rows = cache.rows("train")
    extract_features(model, cache.images_path, rows[:s["batch"]], dev, ctx.tmp / "warm.npy", np.float16,
                     workers=s["workers"][-1], amp=True)
    t0 = time.perf_counter()
    extract_features(model, cache.images_path, rows, dev, ctx.tmp / "features.npy", np.float16,
                     workers=s["workers"][-1], amp=True, desc="crt")
    wall = time.perf_counter() - t0
    return {"model": s["v2b"], "head": "csra", "size": s["size"], "images": len(rows), "dtype": "float16",
            "images_per_s": len(rows) / wall}


def res_hi(ctx: Context, gc: bool) -> dict:
    import torch

    from cxrlt.models.model import build_model
    from cxrlt.training.device import choose_grad_checkpointing, probe_step_memory

    s = ctx.s
    cfg = train_cfg(s, s["large"], s["size_hi"], s["batch_hi"], grad_checkpointing="true" if gc else "false")
    # what `auto` chooses at a run's start (weights on the device, nothing else yet)
    dev = torch.device(s["device"])
    model = build_model({**cfg, "grad_checkpointing": "false"}, 30).to(dev)
    n_params = sum(p.numel() for p in model.parameters())

    probe = functools.partial(probe_step_memory, model, s["size_hi"], 3, dev, True)
    on, why = choose_grad_checkpointing("auto", dev, probe, s["batch_hi"], n_params, False)
    del model, probe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    row = _trainer_row(ctx, cfg, s["size_hi"])
    return {**row, "auto_would_choose": on, "auto_reason": why}


def head_bf16_vs_fp32(ctx: Context) -> dict:
    import torch
    import torch.nn.functional as F

    from cxrlt.data.cache import open_cache
    from cxrlt.data.dataset import CacheDataset, make_loader
    from cxrlt.evaluation.metrics import score
    from cxrlt.post.inference import batched_forward, model_input

    s = ctx.s
    model, dev = _eval_model(s, s["large"], head="cosine")
    model.logit_scale = 30.0  # LDAM's s: the case the issue measured
    cache = open_cache(ctx.cache(s["size"], s["head_n"]))
    rows = cache.rows("train")
    loader = make_loader(CacheDataset(cache.images_path, rows, num_classes=30), s["batch"],
                         workers=s["workers"][-1], pin_memory=dev.type == "cuda")
    _, feats = batched_forward(model, loader, lambda x: model.head_input(model_input(model, x, dev.type == "cuda")),
                               dev, amp=True)
    f = torch.from_numpy(feats).to(dev)
    head = model.head
    with torch.no_grad():
        fp32 = head.classify(f).float()
        w = F.normalize(head.weight.float(), dim=1).to(torch.bfloat16)
        bf16 = (F.normalize(f, dim=1).to(torch.bfloat16) @ w.t()).float() * head.logit_scale * head.scale  # old path
    fp32, bf16 = fp32.cpu().numpy(), bf16.cpu().numpy()
    # labels that depend on the fp32 scores (random weights: no real labels to score against)
    rng = np.random.default_rng(0)
    z = (fp32 - fp32.mean(0)) / (fp32.std(0) + 1e-12)
    y = (z + rng.normal(0, 1.0, z.shape) > 1.0).astype(np.float32)
    distinct = lambda a: float(np.mean([len(np.unique(a[:, j])) / len(a) for j in range(a.shape[1])]))  # noqa: E731
    m32, m16 = score(y, fp32, auc=False)["mAP"], score(y, bf16, auc=False)["mAP"]
    return {"model": s["large"], "images": len(rows), "distinct_frac_fp32": distinct(fp32),
            "distinct_frac_bf16": distinct(bf16), "mAP_fp32": m32, "mAP_bf16": m16, "mAP_drop": m32 - m16}


ROWS = {
    "bare_step_eager": lambda c: bare_step(c, False),
    "bare_step_compiled": lambda c: bare_step(c, True),
    "trainer_step_eager": lambda c: trainer_step(c, False),
    "trainer_step_compiled": lambda c: trainer_step(c, True),
    "trainer_step_v2b_csra": trainer_step_v2b_csra,
    "data_wait_workers_2": lambda c: data_wait(c, c.s["workers"][0]),
    "data_wait_workers_8": lambda c: data_wait(c, c.s["workers"][1]),
    "checkpoint_save": checkpoint_save,
    "predict_bs64": lambda c: predict(c, c.s["predict_batches"][0]),
    "predict_bs256": lambda c: predict(c, c.s["predict_batches"][1]),
    "crt_extract_csra": crt_extract,
    "res768_gc_off": lambda c: res_hi(c, False),
    "res768_gc_on": lambda c: res_hi(c, True),
    "head_bf16_vs_fp32": head_bf16_vs_fp32,
}


# ---- running: one line per row, as it comes --------------------------------------------------------
@contextlib.contextmanager
def time_limit(seconds: float):
    """RowTimeout in the main thread after `seconds` (SIGALRM; 0 = none)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def alarm(*_):
        raise RowTimeout(f"over {seconds:g} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _emit(out: Path, record: dict) -> None:
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
    print(json.dumps(record, default=float), flush=True)


def run(out: Path, names: list[str], dry: bool, row_timeout: float, rows=None, workdir=None,
        budget_s: float = 0.0) -> list[dict]:
    """Each row of `names` (of `rows`, default ROWS) in turn; a line for each in `out` as soon as it
    is measured -> the records. budget_s (0 = none): rows that would start after it are
    "skipped"; a row never runs past the budget's end (its timeout is cut to what is left)."""
    import torch

    from bench_train_step import close_trainer_log, peak_flops

    rows = ROWS if rows is None else rows
    s = settings(dry)
    if dry:
        os.environ.setdefault("CXRLT_COMPILE_BACKEND", "eager")  # the compile path without a compiler
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); --dry-run runs the "
                         "rows on the CPU with a tiny model")
    dev = torch.device(s["device"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    peak, name = peak_flops(dev)
    _emit(out, {"row": "meta", "status": "ok", "dry_run": dry, "device": name, "peak_bf16_flops": peak,
                "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    records = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_", dir=workdir) as tmp:
        ctx = Context(s, Path(tmp))
        end = time.perf_counter() + budget_s if budget_s else None
        for row in names:
            t0 = time.perf_counter()
            limit = row_timeout
            if end is not None:
                left = end - t0
                if left <= 1:
                    rec = {"row": row, "status": "skipped", "error": f"the {budget_s:g} s budget is spent"}
                    rec.update(device=name, wall_s=0.0)
                    _emit(out, rec)
                    records.append(rec)
                    continue
                limit = min(limit, left) if limit else left
            try:
                with time_limit(limit):
                    rec = {"row": row, "status": "ok", **rows[row](ctx)}
            except torch.cuda.OutOfMemoryError as e:
                rec = {"row": row, "status": "oom", "error": str(e).splitlines()[0][:300]}
            except RowTimeout as e:
                rec = {"row": row, "status": "timeout", "error": str(e)}
            except Exception as e:  # noqa: BLE001 - a failed row is a result; the others go on
                rec = {"row": row, "status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rec.update(device=name, wall_s=time.perf_counter() - t0)
            _emit(out, rec)
            records.append(rec)
            close_trainer_log()
            gc.collect()  # a row's Trainer (model, optimizer, loader workers) is freed before the next row
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON lines file (default bench/gpu_check.jsonl, "
                                                "bench/gpu_check_dry.jsonl with --dry-run)")
    ap.add_argument("--rows", nargs="*", default=None, choices=list(ROWS), help="only these rows (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="every row on the CPU: tiny model, 32 px, a few steps")
    ap.add_argument("--row-timeout", type=float, default=120.0, help="seconds one row may take (0 = no limit)")
    add_json_flag(ap)
    ap.add_argument("--budget-s", type=float, default=300.0, help="seconds for all rows; later rows are skipped "
                                                                  "(0 = no limit; --dry-run: none)")
    a = ap.parse_args(argv)
    here = Path(__file__).resolve().parent
    out = Path(a.out) if a.out else here / ("gpu_check_dry.jsonl" if a.dry_run else "gpu_check.jsonl")
    recs = run(out, a.rows or list(ROWS), a.dry_run, a.row_timeout, budget_s=0.0 if a.dry_run else a.budget_s)
    write_result(a.json, {"rows": recs, "jsonl": str(out)})
    bad = [r["row"] for r in recs if r["status"] != "ok"]
    print(f"gpu_check: {len(recs) - len(bad)}/{len(recs)} rows measured -> {out}"
          + (f"; not measured: {', '.join(bad)}" if bad else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
