"""Backbone training: one epoch loop a reader can hold in their head.

    for epoch in range(start, epochs):
        seed RNGs from (seed, epoch, rank); sampler/dataset/loss learn the epoch
        for batch: uint8 -> device -> normalise -> forward (bf16 autocast on GPU) -> loss
                   -> backward -> (every accum_steps) clip, step, EMA update, LR from the step count
        validate on the held-out fold (EMA weights when EMA is on), all ranks' predictions gathered
        log one line to metrics.jsonl; write last.pt (full state) and best.pt (best val mAP)
    model.pt = the best weights (the file later stages read, written once at the very end)

Exact resume: every source of randomness is re-seeded from (seed, epoch) at the start of an
epoch, the sampler's order and the augmentations are pure functions of (seed, epoch, row) and the
LR is a pure function of the optimizer step. So last.pt only needs the model, optimizer, EMA, step
and epoch for a resumed run to end with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import config as config_mod
from . import distributed as D
from .checkpoint import load_checkpoint, state_dict_of
from .device import autocast_ctx
from .errors import InputError
from .fileio import append_jsonl, read_jsonl, torch_save
from .inference import predict_tta
from .metrics import score

log = logging.getLogger("cxrlt.train")

# Keys that may change between a run and its resume without changing what is computed
# (or that only extend it).
RESUME_SAFE_KEYS = {"epochs", "workers", "device", "patience", "max_train_batches", "compile"}
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "model.pt", "train.log")


# --------------------------------------------------------------------------------------------
# small pieces
# --------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the model weights (float tensors averaged, others copied).

    The decay ramps up as min(decay, (1 + step) / (10 + step)) so that early, random weights are
    forgotten quickly; with decay 0.9999 the horizon is ~10k optimizer steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            s = src[k].detach()
            if v.dtype.is_floating_point:
                v.mul_(d).add_(s.to(v.dtype), alpha=1.0 - d)
            else:
                v.copy_(s)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "module": self.module.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.steps = int(sd["steps"])
        self.module.load_state_dict(sd["module"])


def lr_multiplier(step: int, cfg: dict, steps_per_epoch: int) -> float:
    """LR factor at an optimizer step: linear warm-up, cosine decay to min_lr/lr, DRW drop."""
    total = max(1, cfg["epochs"] * steps_per_epoch)
    warm = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    floor = cfg["min_lr"] / cfg["lr"] if cfg["lr"] > 0 else 0.0
    if warm > 0 and step < warm:
        mult = (step + 1) / warm
    else:
        progress = min(1.0, (step - warm) / max(1, total - warm))
        mult = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg["drw_epoch"] >= 0 and step >= cfg["drw_epoch"] * steps_per_epoch:
        mult *= cfg["drw_lr_factor"]
    return mult


def param_groups(model, cfg: dict) -> list[dict]:
    """AdamW groups: backbone / head LR, and no weight decay on 1-D tensors (norms, biases)."""
    groups = []
    for name, params, lr in (
        ("backbone", list(model.backbone_parameters()), cfg["lr"]),
        ("head", list(model.head_parameters()), cfg["head_lr"] or cfg["lr"]),
    ):
        decay = [p for p in params if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in params if p.requires_grad and p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "base_lr": lr, "weight_decay": cfg["weight_decay"], "part": name})
        if no_decay:
            groups.append({"params": no_decay, "base_lr": lr, "weight_decay": 0.0, "part": name})
    return groups


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1009 + rank) % (2**31)
    torch.manual_seed(s)
    np.random.seed(s)


def setup_logging(out_dir: Path, is_main: bool) -> None:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    if is_main:
        fh = logging.FileHandler(out_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: dict, cache_dir: str, out_dir: str, resume: bool = False):
        from .cache import open_cache
        from .data import AugConfig, CacheDataset
        from .losses import build_loss
        from .models import build_model
        from .samplers import build_sampler

        self.cfg = cfg
        self.out = Path(out_dir)
        self.dist = D.setup(cfg["device"])
        self.device = self.dist.device
        self.amp = cfg["amp"] and self.device.type == "cuda"
        self.channels_last = cfg["channels_last"] and self.device.type == "cuda"
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        D.barrier(self.dist)
        setup_logging(self.out, self.dist.is_main)
        self._check_run_folder(resume)

        # ---- data ----
        self.cache_dir = cache_dir
        self.cache = open_cache(cache_dir)
        self.labels = list(self.cache.labels)
        folds = sorted(set(int(f) for f in self.cache.index.loc[self.cache.index["split"] == "train", "fold"]))
        if cfg["val_fold"] not in folds:
            raise InputError(f"{cache_dir}/index.csv: val_fold {cfg['val_fold']} not among the folds {folds}")
        self.train_rows = self.cache.rows("train", exclude_fold=cfg["val_fold"])
        self.val_rows = self.cache.rows("train", fold=cfg["val_fold"])
        y_train = self.cache.targets(self.train_rows)
        self.y_val = self.cache.targets(self.val_rows)
        self.class_counts = y_train.sum(0)
        images = Path(cache_dir) / "images.npy"
        aug = AugConfig.from_config(cfg)
        self.train_ds = CacheDataset(images, self.train_rows, y_train, aug=aug, seed=cfg["seed"])
        # validation: each rank a strided share of the val rows, no padding, gathered afterwards
        my_val = np.arange(self.dist.rank, len(self.val_rows), self.dist.world)
        self.val_ds = CacheDataset(images, self.val_rows[my_val], self.y_val[my_val])
        self.sampler = build_sampler(cfg["sampler"], y_train, cfg, seed=cfg["seed"],
                                     num_replicas=self.dist.world, rank=self.dist.rank)
        n_batches = len(self.sampler) // cfg["batch_size"]
        if n_batches == 0:
            raise InputError(
                f"batch_size {cfg['batch_size']} x {self.dist.world} process(es) is larger than the "
                f"{len(self.train_rows)} training images")
        if cfg["max_train_batches"]:
            n_batches = min(n_batches, cfg["max_train_batches"])
        self.batches_per_epoch = n_batches
        self.steps_per_epoch = max(1, n_batches // cfg["accum_steps"])

        # ---- model, loss, optimisation ----
        torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
        self.model = build_model(cfg, len(self.labels), labels=self.labels).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(cfg, self.class_counts, len(self.train_rows)).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg["lr"])
        self.ema = EMA(self.model, cfg["ema_decay"]) if cfg["ema"] else None
        self.ddp_model = self.model
        if self.dist.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.ddp_model) if cfg["compile"] else self.ddp_model

        self.start_epoch, self.step, self.best_map, self.best_epoch, self.bad_epochs = 0, 0, -1.0, -1, 0
        if resume and (self.out / "last.pt").exists():
            self._load_last()
        elif self.dist.is_main and not (self.out / "model.pt").exists():
            # a fresh start: lines left by a run killed before its first last.pt are stale
            (self.out / "metrics.jsonl").unlink(missing_ok=True)

    # ---- run folder ---------------------------------------------------------------------
    def _check_run_folder(self, resume: bool) -> None:
        cfg_path = self.out / "config.yaml"
        if cfg_path.exists() and (self.out / "last.pt").exists():
            if not resume:
                raise InputError(f"{self.out}: a run already exists here; pass --resume to continue it "
                                 f"or choose another --out")
            old = config_mod.load_yaml(cfg_path)
            changed = {k: (old.get(k), v) for k, v in self.cfg.items()
                       if k not in RESUME_SAFE_KEYS and old.get(k, config_mod.DEFAULTS[k]) != v}
            if changed:
                desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise InputError(f"{cfg_path}: the config changed since this run started ({desc}); "
                                 f"delete {self.out} to start over, or train into another --out")
        if self.dist.is_main:
            config_mod.save(self.cfg, cfg_path)

    def _load_last(self) -> None:
        ck = load_checkpoint(self.out / "last.pt")
        self.model.load_state_dict(state_dict_of({"model": ck["train_model"]}))
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.ema is not None and "ema" in ck:
            self.ema.load_state_dict(ck["ema"])
        self.start_epoch = int(ck["epoch"]) + 1
        self.step = int(ck["step"])
        self.best_map = float(ck["best_map"])
        self.best_epoch = int(ck["best_epoch"])
        self.bad_epochs = int(ck["bad_epochs"])
        # metrics.jsonl may hold a line for an epoch whose last.pt never landed: drop it
        if self.dist.is_main:
            kept = [r for r in read_jsonl(self.out / "metrics.jsonl") if r.get("epoch", 1e9) < self.start_epoch]
            from .fileio import write_text
            import json
            write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        log.info(f"resumed from {self.out / 'last.pt'} at epoch {self.start_epoch} (step {self.step}, "
                 f"best val mAP {self.best_map:.4f})")

    def _meta(self, epoch: int) -> dict:
        return {
            "config": dict(self.cfg), "labels": self.labels, "epoch": epoch, "step": self.step,
            "best_map": self.best_map, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "class_counts": [float(c) for c in self.class_counts],
            "cache": str(self.cache_dir), "image_size": int(self.cache.size),
        }

    def _eval_model(self):
        return self.ema.module if self.ema is not None else self.model

    # ---- one epoch ----------------------------------------------------------------------
    def _set_lr(self) -> float:
        mult = lr_multiplier(self.step, self.cfg, self.steps_per_epoch)
        epoch = self.step // self.steps_per_epoch
        head_only = epoch < self.cfg["head_warmup_epochs"]
        lr = 0.0
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0 if (head_only and g["part"] == "backbone") else g["base_lr"] * mult
            lr = max(lr, g["lr"])
        return lr

    def train_epoch(self, epoch: int) -> dict:
        from .data import make_loader

        cfg = self.cfg
        seed_everything(cfg["seed"], epoch, self.dist.rank)
        self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        self.loss_fn.set_epoch(epoch)
        loader = make_loader(self.train_ds, cfg["batch_size"], sampler=self.sampler, workers=cfg["workers"],
                             drop_last=True, pin_memory=self.device.type == "cuda")
        self.ddp_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, n_seen, t0, wait = 0.0, 0, time.perf_counter(), 0.0
        bar = tqdm(total=self.batches_per_epoch, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                   disable=not self.dist.is_main, dynamic_ncols=True, leave=False)
        t_wait = time.perf_counter()
        lr = self._set_lr()
        for i, (x, y, _) in enumerate(loader):
            if i >= self.batches_per_epoch:
                break
            wait += time.perf_counter() - t_wait
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            x = self.model.normalize(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last_micro = (i + 1) % cfg["accum_steps"] == 0
            sync = contextlib.nullcontext() if (last_micro or not self.dist.enabled) else self.ddp_model.no_sync()
            with sync:
                with autocast_ctx(self.device, self.amp):
                    logits = self.forward(x)
                loss = self.loss_fn(logits.float(), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at epoch {epoch}, batch {i}: lower the LR "
                                             f"or check the loss settings")
                (loss / cfg["accum_steps"]).backward()
            if last_micro:
                if cfg["grad_clip"] > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"])
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model)
                self.step += 1
                lr = self._set_lr()
            total_loss += float(loss.detach()) * len(x)
            n_seen += len(x)
            if self.dist.is_main:
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss / n_seen:.4f}",
                                img_s=f"{n_seen * self.dist.world / (time.perf_counter() - t0):.0f}")
            t_wait = time.perf_counter()
        bar.close()
        elapsed = time.perf_counter() - t0
        return {
            "lr": lr, "train_loss": D.mean_across(total_loss / max(1, n_seen), self.dist),
            "images_per_s": n_seen * self.dist.world / max(elapsed, 1e-9),
            "data_wait_frac": wait / max(elapsed, 1e-9), "train_time_s": elapsed,
        }

    def validate(self) -> dict:
        from .data import make_loader

        loader = make_loader(self.val_ds, self.cfg["batch_size"] * 2, workers=self.cfg["workers"])
        rows, probs = predict_tta(self._eval_model(), loader, self.device, "none", amp=self.amp,
                                  channels_last=self.channels_last, progress=False, desc="val")
        gathered = D.all_gather_objects((rows, probs), self.dist)
        gathered = [g for g in gathered if len(g[0])]  # a rank may hold no val row
        rows = np.concatenate([g[0] for g in gathered])
        probs = np.concatenate([g[1] for g in gathered])
        # put predictions back in val-row order; every val row exactly once
        order = {int(r): i for i, r in enumerate(self.val_rows)}
        pos = np.array([order[int(r)] for r in rows])
        if len(pos) != len(self.val_rows) or len(set(pos.tolist())) != len(pos):
            raise RuntimeError("validation predictions lost or duplicated rows across ranks")
        p = np.empty_like(probs)
        p[pos] = probs
        return score(self.y_val, p)

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        if (self.out / "model.pt").exists():
            log.info(f"{self.out / 'model.pt'} exists: training already finished")
            D.teardown(self.dist)
            return {"best_map": self.best_map, "best_epoch": self.best_epoch}
        pos = self.class_counts
        log.info(f"train {len(self.train_rows)} images, val {len(self.val_rows)} (fold {cfg['val_fold']}), "
                 f"{len(self.labels)} labels, rarest training label has {int(pos.min())} positives; "
                 f"device {self.device}, world {self.dist.world}, {self.batches_per_epoch} batches/epoch")
        # chance level of macro AP = mean prevalence of the labels that have val positives
        prev = self.y_val.mean(0)
        chance = float(prev[self.y_val.sum(0) > 0].mean()) if len(self.y_val) else float("nan")
        for epoch in range(self.start_epoch, cfg["epochs"]):
            stats = self.train_epoch(epoch)
            v = self.validate()
            improved = v["mAP"] > self.best_map
            if improved:
                self.best_map, self.best_epoch, self.bad_epochs = v["mAP"], epoch, 0
            else:
                self.bad_epochs += 1
            record = {"epoch": epoch, **stats, "val_mAP": v["mAP"], "val_mAUC": v["mAUC"],
                      "chance_mAP": chance,
                      "drw_active": bool(cfg["drw_epoch"] >= 0 and epoch >= cfg["drw_epoch"]),
                      "val_ap": {lab: (None if np.isnan(a) else float(a)) for lab, a in zip(self.labels, v["ap"])}}
            if self.dist.is_main:
                meta = self._meta(epoch)
                weights = self._eval_model().state_dict()
                if improved:
                    torch_save({**meta, "model": weights}, self.out / "best.pt")
                append_jsonl(self.out / "metrics.jsonl", record)
                last = {**meta, "model": weights, "train_model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict()}
                if self.ema is not None:
                    last["ema"] = self.ema.state_dict()
                torch_save(last, self.out / "last.pt")  # written after metrics: it marks the epoch done
                log.info(f"epoch {epoch + 1}/{cfg['epochs']}  loss {stats['train_loss']:.4f}  "
                         f"val mAP {v['mAP']:.4f} (chance {chance:.4f})  mAUC {v['mAUC']:.4f}  "
                         f"{stats['images_per_s']:.0f} img/s  lr {stats['lr']:.2e}" + ("  *best*" if improved else ""))
            D.barrier(self.dist)
            if cfg["patience"] and self.bad_epochs >= cfg["patience"]:
                log.info(f"early stop: no val mAP gain for {cfg['patience']} epochs")
                break
        if self.dist.is_main:
            best = load_checkpoint(self.out / "best.pt")
            torch_save({k: v for k, v in best.items()}, self.out / "model.pt")
            log.info(f"done: best val mAP {self.best_map:.4f} at epoch {self.best_epoch + 1}; "
                     f"weights in {self.out / 'model.pt'}")
        D.barrier(self.dist)
        D.teardown(self.dist)
        return {"best_map": self.best_map, "best_epoch": self.best_epoch}


def train(cfg: dict, cache_dir: str, out_dir: str, resume: bool = False) -> dict:
    return Trainer(cfg, cache_dir, out_dir, resume=resume).fit()
