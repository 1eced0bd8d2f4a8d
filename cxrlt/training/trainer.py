"""Backbone training: one epoch loop a reader can hold in their head.

    for epoch in range(start, epochs):
        seed RNGs from (seed, epoch, rank); sampler/dataset/loss learn the epoch
        for batch: uint8 -> device -> normalise -> (mixup/cutmix) -> forward (bf16 autocast on GPU) -> loss
                   -> backward -> (every accum_steps) clip, step, EMA update, LR from the step count
        validate on the held-out fold (EMA weights when EMA is on), all ranks' predictions gathered
        score them on the val subsets; rank 0 chooses the best epoch so far on the selection set
        log one line to metrics.jsonl; write last.pt (full state) and best.pt (the chosen epoch)
        (swa_epochs: the epoch's weights join the SWA mean when it is one of the last swa_epochs)
    swa.pt (swa_epochs > 0) = the SWA mean, BatchNorm statistics recomputed, scored on val
    model.pt = the chosen epoch's weights (the file later stages read, written at the end of the run),
               or swa.pt's (swa_model: swa, or compare when SWA scores at least the chosen epoch)

Best epoch (cxrlt/evaluation/selection.py): every epoch's val predictions are scored on the full val fold,
the test-like proxy subset and the two patient halves of the selection set (config select_on:
the proxy when the cache knows projections, else full). The best epoch (best.pt, model.pt,
patience) is the one with the highest selection-set mAP; ties keep the earlier epoch. The honest
number of that choice is cross-fitted over the epochs so far: the epoch chosen on half A scored
on half B and vice versa, added as a gain to the last epoch's selection-set mAP (the last epoch
is the no-choice default: what training for a fixed number of epochs would keep).
select_on and proxy_require_finding are post keys (editing them never retrains): a run chooses
its epochs with the values it STARTED with (recorded in last.pt; a resume or an extension keeps
them and says so when the config now differs). Changing them later changes cRT, predict and the
ensemble, not a trained run's best epoch: that needs a retrain (another --out). Re-deriving
model.pt for another select_on would need every epoch's weights kept (or one best.pt per subset,
and patience would still have stopped on the old subset), so it is not done.

metrics.jsonl (one line per epoch), last.pt / best.pt / model.pt / swa.pt and run.json: docs/formats.md
("Run folder").

Exact resume: every source of randomness is re-seeded from (seed, epoch) at the start of an
epoch, the sampler's order and the augmentations are pure functions of (seed, epoch, row), mixup /
cutmix of (seed, epoch, batch, rank), and the LR is a pure function of the optimizer step. So last.pt
only needs the model, optimizer, EMA, the SWA mean, step and epoch for a resumed run to end with the same numbers as an uninterrupted one, plus what the
epoch choice needs: the selection keys the run started with and the score table of the epochs so
far ("val_table": per epoch the macro mAPs and the per-label APs of the two halves, 2 x C floats,
which the cross-fitted honest number needs).

No host stall per step: the running loss and a count of non-finite losses stay on the device;
the count is read (one sync) every cfg nan_check_steps batches and at the end of the epoch, and
a non-zero count stops the run (all ranks agree: the count is summed across them). EMA updates
are one fused foreach lerp over all tensors.

Run folder, its keys, moved-aside runs and world-size resume: cxrlt/training/run_folder.py; the
LR schedule in optimizer steps and the global batch: cxrlt/training/schedule.py; the files:
docs/formats.md ("Run folder").

Checkpoints: at the end of an epoch rank 0 copies best.pt's and last.pt's tensors to CPU memory
(pinned buffers on a GPU, reused every epoch) and a thread writes them (models/checkpoint.py
BackgroundSaver: temporary file, fsync, rename; best.pt, then last.pt, then run.json) while the next
epoch trains; the barrier after an epoch waits for that copy only. A save waits for the one before
it, and the end of fit() (also after an error) waits for the last one, as does the interpreter at
exit; a kill during a write keeps the previous file.

"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cxrlt.core import progress, provenance
from cxrlt.training import distributed as D
from cxrlt.models.checkpoint import CHECKPOINT_FORMAT, BackgroundSaver, load_checkpoint, state_dict_of
from cxrlt.training.device import (autocast_ctx, choose_grad_checkpointing, compile_on, enable_cuda_fast_paths,
                                   maybe_compile, optimizer_kwargs, probe_step_memory)
from cxrlt.core.errors import InputError
from cxrlt.training import tracking
from cxrlt.training.ema import EMA
from cxrlt.training.run_folder import prepare_run_folder, read_run_json, resume_accum_steps, run_keys
from cxrlt.training.schedule import epoch_shape, lr_multiplier, lr_scale_factor, param_groups
from cxrlt.core.fileio import append_jsonl, read_jsonl, torch_save, write_json, write_text
from cxrlt.pipeline.fingerprints import touch
from cxrlt.post.inference import predict_tta
from cxrlt.evaluation.metrics import score
from cxrlt.evaluation.selection import choose, json_float, named_scores, score_row, selection_part, set_sizes, val_sets

log = logging.getLogger("cxrlt.train")


# --------------------------------------------------------------------------------------------
# small pieces
# --------------------------------------------------------------------------------------------
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
        from cxrlt.data.cache import open_cache

        self.cfg = cfg
        self.out = Path(out_dir)
        self.dist = D.setup(cfg["device"])
        self.device = self.dist.device
        enable_cuda_fast_paths(self.device)
        self.amp = cfg["amp"] and self.device.type == "cuda"
        self.channels_last = cfg["channels_last"] and self.device.type == "cuda"
        self.cache_dir = cache_dir
        self.cache = open_cache(cache_dir)
        if cfg["img_size"] and cfg["img_size"] != self.cache.size:
            raise InputError(f"{cache_dir}: images are {self.cache.size} px but the config wants img_size "
                             f"{cfg['img_size']}; use the cache of that size (IMG_SIZE={cfg['img_size']})")
        if cfg["init_from"] and not cfg["init_checkpoint"]:
            raise InputError(f"the config starts from the run '{cfg['init_from']}' (init_from) but no "
                             f"init_checkpoint is given: pass --init_checkpoint <that run>/model.pt (make does)")
        self.keys = run_keys(cfg, self.cache)
        said = []
        if self.dist.is_main:
            said = prepare_run_folder(self.out, cfg, self.keys, self.cache.size, resume)
        D.barrier(self.dist)
        setup_logging(self.out, self.dist.is_main)
        for line in said:
            log.info(line)
        state = read_run_json(self.out) or {}
        self.selection = state.get("selection")
        self.start_epoch = int(state.get("epochs_done", 0))
        self.best_map, self.best_epoch = float(state.get("best_map", -1.0)), int(state.get("best_epoch", -1))
        self.bad_epochs = int(state.get("bad_epochs", 0))
        if (resume and self._finished() and (self.out / "last.pt").exists() and state.get("tag") == self.keys["tag"]
                and not self._swa_pending()):
            self.up_to_date = True  # nothing to build: fit() only settles model.pt
            return
        self.up_to_date = False
        self._build(resume)

    def _build(self, resume: bool) -> None:
        from cxrlt.data.dataset import AugConfig, CacheDataset
        from cxrlt.models.losses import build_loss
        from cxrlt.models.model import build_model
        from cxrlt.data.samplers import build_sampler
        from cxrlt.data.labelmask import annotated_counts, has_unannotated
        from cxrlt.data.external import dataset_of_rows
        from cxrlt.training.mixing import Mixer
        from cxrlt.training.swa import SWA

        cfg = self.cfg
        # ---- data ----
        self.labels = list(self.cache.labels)
        self.train_rows, self.val_rows = self.cache.training_rows(cfg)
        if len(self.val_rows) == 0:
            raise InputError(f"{self.cache_dir}/index.csv: no training rows in val_fold {cfg['val_fold']} "
                             f"(folds are numbered from 0, FOLDS of them)")
        y_train = self.cache.targets(self.train_rows)
        self.y_val = self.cache.targets(self.val_rows)
        # positives / annotated images per label, over annotated entries only (NaN = unannotated)
        self.class_counts, self.annotated = annotated_counts(y_train)
        self.masked = has_unannotated(y_train)
        images = self.cache.images_path
        self.train_ds = CacheDataset(images, self.train_rows, y_train, aug=AugConfig.from_config(cfg), seed=cfg["seed"])
        self.pseudo = bool(cfg["pseudo_labels"])
        if self.pseudo:  # soft labels of another cache's images beside the real ones (cxrlt/post/pseudo.py)
            y_train = self._add_pseudo(y_train)
        # validation: each rank a strided share of the val rows, no padding, gathered afterwards
        my_val = np.arange(self.dist.rank, len(self.val_rows), self.dist.world)
        self.val_ds = CacheDataset(images, self.val_rows[my_val], self.y_val[my_val])
        self.sampler = build_sampler(cfg["sampler"], y_train, cfg, seed=cfg["seed"],
                                     num_replicas=self.dist.world, rank=self.dist.rank)

        last = load_checkpoint(self.out / "last.pt", ours=True) if resume and (self.out / "last.pt").exists() else None
        self.accum = self._accum_steps(last)
        self.global_batch = cfg["batch_size"] * self.dist.world * self.accum
        n_batches, self.steps_per_epoch = epoch_shape(self.sampler.num_rows, cfg["batch_size"], self.dist.world,
                                                      self.accum, cfg["max_train_batches"])
        if n_batches == 0:
            raise InputError(
                f"the global batch of {self.global_batch} images (batch_size {cfg['batch_size']} x "
                f"{self.dist.world} process(es) x accum_steps {self.accum}) is larger than the "
                f"{self.sampler.num_rows} training images")
        self.batches_per_epoch = n_batches
        self.lr_factor = lr_scale_factor(cfg, self.global_batch)

        # ---- model, loss, optimisation ----
        torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
        self.model = build_model(cfg, len(self.labels), labels=self.labels).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._grad_checkpointing()
        self.loss_fn = build_loss(cfg, self.class_counts, self.annotated, nan_mask=self.masked).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg, self.lr_factor), lr=cfg["lr"],
                                           **optimizer_kwargs(self.device))
        self.ema = EMA(self.model, cfg["ema_decay"]) if cfg["ema"] else None
        self.mixer = Mixer.from_config(cfg, self.dist.rank)
        self.swa = SWA(cfg["swa_epochs"]) if cfg["swa_epochs"] > 0 else None
        self.swa_record = None
        self.saver = BackgroundSaver()  # last.pt / best.pt off the critical path (rank 0 uses it)
        self.barrier_wait_s = 0.0
        self.ddp_model = self.model
        self.train_loader = self.val_loader = None  # made on first use, kept (persistent workers)
        self.head_only_no_grad = True  # head warm-up epochs: backbone forward only (False: the full backward)
        if self.dist.enabled:
            # gradients live in the all-reduce buckets (no copy per step); buffers are broadcast from
            # rank 0 at every forward only where there are any (BatchNorm statistics; ConvNeXt has none)
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True, broadcast_buffers=any(True for _ in self.model.buffers()))
        self.compiled = compile_on(cfg["compile"], self.device)
        log.info(f"torch.compile {'on' if self.compiled else 'off'} (compile: {cfg['compile']}, {self.device.type})")
        self.forward = maybe_compile(self.ddp_model, self.compiled, "training model", log.warning)
        self.eval_forward = maybe_compile(self._eval_model(), self.compiled, "eval model", log.warning)

        self.start_epoch, self.step, self.best_map, self.best_epoch, self.bad_epochs = 0, 0, -1.0, -1, 0
        self.table: list[dict] = []  # score_row of every epoch so far (index = epoch): the epoch choice
        self.selection_keys = self._selection_keys(last)
        self.sets = val_sets(self.cache, self.val_rows, self.selection_keys)
        self.val_datasets = dataset_of_rows(self.cache, self.val_rows)  # a multi-dataset cache: mAP per dataset
        if last is not None:
            self._load_last(last)
        self.selection = self._selection()
        self._write_run_json()

    def _grad_checkpointing(self) -> None:
        """Config grad_checkpointing: true/false as set; auto from the step's memory estimate against
        the free GPU memory (device.choose_grad_checkpointing). Every rank takes it when any needs it."""
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        on, why = choose_grad_checkpointing(
            cfg["grad_checkpointing"], self.device, batch=cfg["batch_size"], n_params=n_params, ema=cfg["ema"],
            probe=lambda: probe_step_memory(self.model, self.cache.size, cfg["in_chans"], self.device, self.amp))
        if cfg["grad_checkpointing"] == "auto":
            votes = D.all_gather_objects(on, self.dist)
            if any(votes) and not on:
                on, why = True, f"{why}; on because another rank needs it"
            if on:
                from cxrlt.models.model import set_grad_checkpointing

                set_grad_checkpointing(self.model, cfg["model"])
        self.grad_checkpointing = on
        log.info(f"grad_checkpointing {'on' if on else 'off'} ({why})")

    def _add_pseudo(self, y_real: np.ndarray) -> np.ndarray:
        """Train on pseudo_cache's images with the soft labels of pseudo_labels too, weighted by
        pseudo_weight in the loss and in the class counts -> the sampler's targets (real, then soft)."""
        from cxrlt.data.cache import open_cache
        from cxrlt.data.dataset import AugConfig, CacheDataset, WeightedConcat
        from cxrlt.post.pseudo import read_soft_labels

        cfg = self.cfg
        if not cfg["pseudo_cache"]:
            raise InputError(f"pseudo_labels {cfg['pseudo_labels']}: pseudo_cache (the cache of its images) is not set")
        cache = open_cache(cfg["pseudo_cache"])
        if cache.size != self.cache.size:
            raise InputError(f"{cfg['pseudo_cache']}: images are {cache.size} px, the training cache's {self.cache.size} px")
        rows, y_soft = read_soft_labels(cfg["pseudo_labels"], cache, self.labels)
        w = float(cfg["pseudo_weight"])
        soft_ds = CacheDataset(cache.images_path, rows, y_soft, aug=AugConfig.from_config(cfg), seed=cfg["seed"])
        self.train_ds = WeightedConcat([(self.train_ds, 1.0), (soft_ds, w)])
        self.class_counts = self.class_counts + w * y_soft.sum(0)
        self.annotated = self.annotated + w * len(y_soft)
        log.info(f"pseudo-labels: {len(rows)} images of {cfg['pseudo_cache']} with soft labels "
                 f"({cfg['pseudo_labels']}), weight {w}")
        return np.concatenate([y_real, y_soft])

    # ---- the epoch choice (module doc "Best epoch") --------------------------------------------
    def _selection_keys(self, last: dict | None) -> dict:
        """select_on / proxy_require_finding of this run: those it started with (in last.pt), else
        the config's. A resume never changes the subsets its earlier epochs were scored on."""
        now = selection_part(self.cfg)
        then = (last or {}).get("selection_keys")
        if then is None:
            return now
        if then != now:
            log.info(f"this run chooses its best epoch with {then} (as it started); the config's {now} applies "
                     f"to cRT, predict and the ensemble; retrain (another --out) to choose the epoch with it")
        return dict(then)

    def _load_table(self, ck: dict, n_epochs: int) -> list[dict]:
        """The score table of last.pt (NaN rows for epochs it lacks: a run saved before tables)."""
        rows = [{k: (np.asarray(v, dtype=np.float64) if k.startswith("ap_") else float(v)) for k, v in r.items()}
                for r in ck.get("val_table", [])][:n_epochs]
        if len(rows) < n_epochs:
            log.info(f"last.pt holds no val scores of epochs {len(rows) + 1}-{n_epochs} (saved by an older "
                     f"version): they no longer compete for the best epoch")
            c = len(self.labels)
            nan = {"full": np.nan, "proxy": np.nan, "half_a": np.nan, "half_b": np.nan, "halves": np.nan,
                   "ap_half_a": np.full(c, np.nan), "ap_half_b": np.full(c, np.nan)}
            rows += [dict(nan) for _ in range(n_epochs - len(rows))]
        return rows

    def _choose(self) -> dict:
        """choose() over the epochs so far; the reference (no-choice default) is the last epoch."""
        return choose(self.table, self.sets["select_on"], reference=len(self.table) - 1)

    def _select(self, epoch: int, p: np.ndarray) -> dict:
        """Score epoch's val predictions p (val-row order), add them to the table and update the
        best epoch (rank 0 only: the caller broadcasts the decision)."""
        v = score(self.y_val, p)
        row = score_row(self.y_val, self.sets, lambda idx: p[idx])
        self.table.append(row)
        sel = self._choose()
        improved = sel["choice"] == epoch
        if improved:
            self.best_map, self.best_epoch, self.bad_epochs = v["mAP"], epoch, 0
        else:
            self.bad_epochs += 1
        self.selection = self._selection(sel)
        so = self.sets["select_on"]
        return {"improved": improved, "best_map": self.best_map, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "selection": self.selection, "v": v,
                "record": {"val_mAP": json_float(v["mAP"]), "val_mAUC": json_float(v["mAUC"]),
                           "val_proxy_mAP": json_float(row["proxy"]), "val_select_mAP": json_float(row[so]),
                           "select_on": so, "val_honest_mAP": json_float(sel["honest"]), "best_epoch": self.best_epoch,
                           **self._by_dataset(p)}}

    def _by_dataset(self, p: np.ndarray) -> dict:
        """{"val_mAP_by_dataset": {dataset: mAP on its val images and the labels it annotates}} of a
        multi-dataset cache; {} otherwise."""
        if self.val_datasets is None:
            return {}
        return {"val_mAP_by_dataset": {d: json_float(score(self.y_val[self.val_datasets == d],
                                                           p[self.val_datasets == d], auc=False)["mAP"])
                                       for d in dict.fromkeys(self.val_datasets)}}

    def _selection(self, sel: dict | None = None) -> dict:
        """The run's "selection" summary (module doc): the best epoch's scores and the honest number."""
        so = self.sets["select_on"]
        if sel is None and self.table:
            sel = self._choose()
        best = self.table[self.best_epoch] if 0 <= self.best_epoch < len(self.table) else None
        return {**self.selection_keys, "select_on": so, "best_epoch": self.best_epoch,
                **(named_scores(best, so) if best else dict.fromkeys(("val_mAP", "val_proxy_mAP", "val_select_mAP"))),
                "val_honest_mAP": json_float(sel["honest"]) if sel else None,
                "sets": set_sizes(self.sets), "describe": self.sets["describe"]}

    # ---- run folder ---------------------------------------------------------------------
    def _accum_steps(self, last: dict | None) -> int:
        """accum_steps for this run: the config's, or what last.pt ran with (see resume_accum_steps)."""
        if last is None or "world_size" not in last:
            return self.cfg["accum_steps"]
        old_world, world = int(last["world_size"]), self.dist.world
        accum = resume_accum_steps(int(last["global_batch"]), old_world, self.cfg["batch_size"], world, self.out)
        if world != old_world:
            log.info(f"resuming with {world} processes instead of {old_world}: {accum} micro-batches of "
                     f"{self.cfg['batch_size']} per process and step keep the global batch of {last['global_batch']}")
        return accum

    def _load_last(self, ck: dict) -> None:
        self.model.load_state_dict(state_dict_of({"model": ck["train_model"]}))
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.ema is not None and "ema" in ck:
            self.ema.load_state_dict(ck["ema"])
        if self.swa is not None and "swa" in ck:
            self.swa.load_state_dict(ck["swa"])
        self.start_epoch = int(ck["epoch"]) + 1
        self.step = int(ck["step"])
        self.best_map = float(ck["best_map"])
        self.best_epoch = int(ck["best_epoch"])
        self.bad_epochs = int(ck["bad_epochs"])
        self.table = self._load_table(ck, self.start_epoch)
        # metrics.jsonl may hold a line for an epoch whose last.pt never landed: drop it
        if self.dist.is_main:
            kept = [r for r in read_jsonl(self.out / "metrics.jsonl") if r.get("epoch", 1e9) < self.start_epoch]
            write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        log.info(f"resumed from {self.out / 'last.pt'} at epoch {self.start_epoch} (step {self.step}, "
                 f"best val mAP {self.best_map:.4f})")

    def _finished(self) -> bool:
        """The run reached its epochs, or early stopping ended it (under the current config)."""
        patience = self.cfg["patience"]
        return self.start_epoch >= self.cfg["epochs"] or bool(patience and self.bad_epochs >= patience)

    def _run_state(self) -> dict:
        return {**self.keys, "image_size": int(self.cache.size), "world_size": self.dist.world,
                "global_batch": self.global_batch, "accum_steps": self.accum,
                "steps_per_epoch": self.steps_per_epoch, "lr_factor": self.lr_factor,
                "effective_lr": self.cfg["lr"] * self.lr_factor}

    def _run_json(self) -> dict:
        return {**self._run_state(), "epochs_done": self.start_epoch, "best_map": self.best_map,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "selection": self.selection,
                **({"swa": self.swa_record} if self.swa_record else {})}

    def _write_run_json(self) -> None:
        if self.dist.is_main:
            write_json(self.out / "run.json", self._run_json())

    def _meta(self, epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "config": dict(self.cfg), "labels": self.labels, "epoch": epoch,
            "step": self.step,
            "best_map": self.best_map, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "class_counts": [float(c) for c in self.class_counts], "cache": str(self.cache_dir),
            "selection": self.selection, "init": dict(getattr(self.model, "init_info", {}) or {}),
            **self._run_state(),
        }

    def _last_state(self, meta: dict, weights: dict) -> dict:
        """What last.pt holds (module doc "Exact resume"); `weights` = the eval model's state_dict."""
        last = {**meta, "model": weights, "train_model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "selection_keys": self.selection_keys,
                "val_table": [_plain_row(t) for t in self.table]}
        if self.ema is not None:
            last["ema"] = self.ema.state_dict()
        if self.swa is not None:
            last["swa"] = self.swa.state_dict()
        return last

    def _lr_line(self) -> str:
        """The log line of the recipe's scale: global batch, steps per epoch, effective LRs."""
        cfg, f = self.cfg, self.lr_factor
        g = self.global_batch
        why = ("as given" if not cfg["lr_ref_batch"] or cfg["lr_scale"] == "none" else
               f"x {f:.4g} = {cfg['lr_scale']} scale of global batch {g} / lr_ref_batch {cfg['lr_ref_batch']}")
        warm = int(round(cfg["warmup_epochs"] * self.steps_per_epoch))
        return (f"global batch {g} = batch_size {cfg['batch_size']} x {self.dist.world} process(es) x accum_steps "
                f"{self.accum}; {self.steps_per_epoch} optimizer steps/epoch, warm-up {warm} steps; effective lr "
                f"{cfg['lr'] * f:.3e}, head_lr {(cfg['head_lr'] or cfg['lr']) * f:.3e}, min_lr {cfg['min_lr'] * f:.3e} "
                f"({why})")

    def _eval_model(self):
        return self.ema.module if self.ema is not None else self.model

    # ---- one epoch ----------------------------------------------------------------------
    def _set_lr(self) -> float:
        mult = lr_multiplier(self.step, self.cfg, self.steps_per_epoch)
        epoch = self.step // self.steps_per_epoch
        head_only = epoch < self.cfg["head_warmup_epochs"]
        # > 0: the separate head phase, its LR scaled like the others (lr_scale)
        phase_lr = self.cfg["head_warmup_lr"] * self.lr_factor if head_only else 0.0
        lr = 0.0
        for g in self.optimizer.param_groups:
            if head_only and g["part"] == "backbone":
                g["lr"] = 0.0
            else:
                g["lr"] = phase_lr or g["base_lr"] * mult
            lr = max(lr, g["lr"])
        return lr

    def _check_finite(self, bad: torch.Tensor, epoch: int, first: int, last: int) -> None:
        """Stop (on every rank) when a loss since the last check was NaN/inf: one host sync."""
        bad = bad.clone()
        D.sum_(bad, self.dist)
        if int(bad.item()):
            raise InputError(f"{self.out}: non-finite training loss in epoch {epoch + 1}, between batches "
                             f"{first + 1} and {last + 1}: lower the LR (lr, head_lr) or check the loss settings")

    def train_epoch(self, epoch: int) -> dict:
        from cxrlt.data.dataset import EpochTagged, make_loader

        cfg, dev = self.cfg, self.device
        seed_everything(cfg["seed"], epoch, self.dist.rank)
        self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)  # (workers=0; persistent workers get the epoch from the sampler)
        self.loss_fn.set_epoch(epoch)
        if self.train_loader is None:  # one loader, its workers kept from epoch to epoch
            self.train_loader = make_loader(self.train_ds, cfg["batch_size"], sampler=EpochTagged(self.sampler),
                                            workers=cfg["workers"], drop_last=True, pin_memory=dev.type == "cuda",
                                            persistent=True)
        loader = self.train_loader
        head_only = epoch < cfg["head_warmup_epochs"] and self.head_only_no_grad
        self.ddp_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # stays on the device
        n_bad = torch.zeros((), dtype=torch.int64, device=dev)
        n_seen, t0, wait, checked = 0, time.perf_counter(), 0.0, 0
        every = max(1, cfg["nan_check_steps"])
        bar = progress.bar(total=self.batches_per_epoch, unit="batch", desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                   disable=not self.dist.is_main, leave=False)
        t_wait = time.perf_counter()
        lr = self._set_lr()
        i = -1
        # zip takes the batch count first: the loader is never asked for a batch past the cap
        for i, (x, y, extra) in zip(range(self.batches_per_epoch), loader):
            wait += time.perf_counter() - t_wait
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            x = self.model.normalize(x)
            if self.mixer is not None:  # mixup / cutmix, drawn from (seed, epoch, batch, rank)
                x, y = self.mixer(x, y, epoch, i)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last_micro = (i + 1) % self.accum == 0
            sync = contextlib.nullcontext() if (last_micro or not self.dist.enabled) else self.ddp_model.no_sync()
            with sync:
                with autocast_ctx(dev, self.amp):
                    if head_only:  # the backbone's LR is 0: forward only, no backward, all-reduce or Adam step
                        with torch.no_grad():
                            h = self.model.head_input(x)
                        logits = self.model.head.classify(h)
                    else:
                        logits = self.forward(x)
                if self.pseudo:  # per-sample weights (real 1, soft pseudo_weight) through the loss mask
                    loss = self.loss_fn(logits.float(), y, mask=extra.to(dev, non_blocking=True)[:, None].expand_as(y))
                else:
                    loss = self.loss_fn(logits.float(), y)
                (loss / self.accum).backward()
            loss = loss.detach()
            n_bad += ~torch.isfinite(loss)
            loss_sum += loss * len(x)
            if last_micro:
                if head_only:  # DDP's hooks did not run: average the head's gradients across ranks
                    D.average_grads(self.model.head_parameters(), self.dist)
                if cfg["grad_clip"] > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"])
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update()
                self.step += 1
                lr = self._set_lr()
            n_seen += len(x)
            if (i + 1) % every == 0:
                self._check_finite(n_bad, epoch, checked, i)
                checked = i + 1
                if self.dist.is_main:  # the one sync of these `every` batches already happened
                    bar.set_postfix(loss=f"{float(loss_sum) / n_seen:.4f}",
                                    img_s=f"{n_seen * self.dist.world / (time.perf_counter() - t0):.0f}")
            if self.dist.is_main:
                bar.update(1)
            t_wait = time.perf_counter()
        bar.close()
        self._check_finite(n_bad, epoch, checked, max(i, checked))
        elapsed = time.perf_counter() - t0
        return {
            "lr": lr, "train_loss": D.mean_across(float(loss_sum) / max(1, n_seen), self.dist),
            "images_per_s": n_seen * self.dist.world / max(elapsed, 1e-9),
            "data_wait_frac": wait / max(elapsed, 1e-9), "train_time_s": elapsed,
        }

    def validate(self, model=None) -> np.ndarray:
        """(n_val, C) val probabilities in val-row order, on every rank (of the eval model, or `model`)."""
        from cxrlt.data.dataset import make_loader

        if self.val_loader is None:
            self.val_loader = make_loader(self.val_ds, self.cfg["batch_size"] * 2, workers=self.cfg["workers"],
                                          pin_memory=self.device.type == "cuda", persistent=True)
        rows, probs = predict_tta(self.eval_forward if model is None else model, self.val_loader, self.device, "none", amp=self.amp,
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
        return p

    # ---- SWA (cxrlt/training/swa.py) ----------------------------------------------------------
    def _bn_batches(self, epoch: int):
        """The training batches of `epoch` (its order and augmentations), normalised on the device."""
        from cxrlt.data.dataset import make_loader

        cfg, dev = self.cfg, self.device
        seed_everything(cfg["seed"], epoch, self.dist.rank)
        self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        loader = make_loader(self.train_ds, cfg["batch_size"], sampler=self.sampler, workers=cfg["workers"],
                             drop_last=True, pin_memory=dev.type == "cuda")
        for _, (x, _y, _extra) in zip(range(self.batches_per_epoch), loader):
            x = self.model.normalize(x.to(dev, non_blocking=True))
            yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _finish_swa(self) -> None:
        """The SWA weights: BatchNorm statistics recomputed, scored on val like an epoch, written
        to swa.pt with their record ("swa"); "chosen" says whether model.pt takes them: always
        (swa_model swa), never (best), or (compare) when their selection-set mAP is at least the
        best epoch's."""
        from cxrlt.training.swa import batchnorms, recompute_bn, window

        cfg, swa = self.cfg, self.swa
        if not swa.epochs:
            win = window(cfg["epochs"], swa.k)
            log.info(f"SWA: the run stopped before its window (epochs {win.start + 1}-{win.stop}): no swa.pt")
            return
        model = swa.averaged(self.model)
        n_bn = 0
        if batchnorms(model):
            with autocast_ctx(self.device, self.amp):
                n_bn = recompute_bn(model, self._bn_batches(swa.epochs[-1]))
            for bn in batchnorms(model):  # each rank saw its share: the mean of the ranks' statistics
                for t in (bn.running_mean, bn.running_var):
                    D.sum_(t, self.dist).div_(self.dist.world)
        p = self.validate(model)
        if self.dist.is_main:
            v = score(self.y_val, p)
            row = score_row(self.y_val, self.sets, lambda idx: p[idx])
            so = self.sets["select_on"]
            best = self.table[self.best_epoch][so] if 0 <= self.best_epoch < len(self.table) else float("nan")
            chosen = cfg["swa_model"] == "swa" or (cfg["swa_model"] == "compare" and bool(row[so] >= best))
            self.swa_record = {
                "epochs": list(swa.epochs), "bn_batches": n_bn, "swa_model": cfg["swa_model"], "chosen": chosen,
                "select_on": so, "val_mAP": json_float(v["mAP"]), "val_mAUC": json_float(v["mAUC"]),
                "val_proxy_mAP": json_float(row["proxy"]), "val_select_mAP": json_float(row[so]),
                "best_epoch_select_mAP": json_float(best)}
            torch_save({**self._meta(swa.epochs[-1]), "model": model.state_dict(), "swa": self.swa_record},
                       self.out / "swa.pt")
            self._write_run_json()
            log.info(f"SWA of epochs {swa.epochs[0] + 1}-{swa.epochs[-1] + 1}"
                     + (f" (BatchNorm statistics recomputed on {n_bn} batches)" if n_bn else "")
                     + f": val mAP {_fmt(v['mAP'])}, {so} {_fmt(row[so])} (best epoch {_fmt(best)}); "
                     f"model.pt holds the {'SWA' if chosen else 'best epoch'} weights (swa_model {cfg['swa_model']})")
        D.barrier(self.dist)

    # ---- the loop -----------------------------------------------------------------------
    def _settle(self) -> dict:
        """A finished run: model.pt from best.pt when missing, else touched (so Make settles)."""
        model_pt = self.out / "model.pt"
        if self.dist.is_main:
            if model_pt.exists():
                touch(model_pt)
                log.info(f"{self.out}: up to date ({self.start_epoch} epochs done, best epoch "
                         f"{self.best_epoch + 1}); nothing to train")
            else:
                self._write_model_pt()
        D.barrier(self.dist)
        D.teardown(self.dist)
        return self._result()

    def _result(self) -> dict:
        return {"best_map": self.best_map, "best_epoch": self.best_epoch, "selection": self.selection}

    def _write_model_pt(self) -> None:
        """model.pt = best.pt's weights, described by the current config (an extended run's
        best epoch may date from before its epochs/patience were raised); swa.pt's when it was
        chosen (cfg swa_model, _finish_swa)."""
        best = load_checkpoint(self.out / "best.pt", ours=True)
        best["config"] = dict(self.cfg)
        if self.selection is not None:  # the honest number of the whole run's choice, not best.pt's
            best["selection"] = self.selection
        swa_pt = self.out / "swa.pt"
        swa = load_checkpoint(swa_pt, ours=True) if self.cfg["swa_epochs"] > 0 and swa_pt.exists() else None
        if swa is not None and swa["swa"]["chosen"]:
            r = swa["swa"]
            best = {**best, "model": swa["model"], "best_map": r["val_mAP"], "swa": r}
            best["selection"] = {**(best.get("selection") or {}), "weights": "swa",
                                 **{k: r[k] for k in ("val_mAP", "val_proxy_mAP", "val_select_mAP")}}
        torch_save(best, self.out / "model.pt")
        log.info(f"done: {_selection_text(best.get('selection'), int(best['best_epoch']))}; "
                 f"weights in {self.out / 'model.pt'}")

    def _swa_pending(self) -> bool:
        """A finished run stopped before its end wrote swa.pt and model.pt (killed in between)."""
        return self.cfg["swa_epochs"] > 0 and not (self.out / "model.pt").exists() and not (self.out / "swa.pt").exists()

    def fit(self) -> dict:
        cfg = self.cfg
        if self.up_to_date or self._finished():
            if not self.up_to_date and self.swa is not None and self._swa_pending():
                self._finish_swa()  # the SWA mean is in last.pt: finish what the killed end did not
            return self._settle()
        pos = self.class_counts
        log.info(f"train {len(self.train_rows)} images, val {len(self.val_rows)} (fold {cfg['val_fold']}), "
                 f"{len(self.labels)} labels, rarest training label has {int(pos.min())} positives; "
                 f"device {self.device}, world {self.dist.world}, {self.batches_per_epoch} batches/epoch")
        log.info(self._lr_line())
        # chance level of macro AP = mean prevalence of the labels that have val positives
        prev = np.nanmean(self.y_val, 0)
        chance = float(prev[np.nansum(self.y_val, 0) > 0].mean()) if len(self.y_val) else float("nan")
        log.info(f"best epoch chosen on {self.sets['select_on']}: {self.sets['describe']}")
        if self.dist.is_main:  # what code, packages and machine train this (an earlier start's kept in "earlier")
            provenance.write(self.out / "provenance.json")
        tracker = tracking.start(self.out, cfg, self.dist.is_main)
        if self.dist.is_main:  # an earlier end's SWA (before epochs were raised) is not this run's
            (self.out / "swa.pt").unlink(missing_ok=True)
        try:
            return self._epochs(tracker, chance)
        finally:  # an error or a stop: the write in flight still lands (its own error only if none is raised)
            self.saver.wait(raise_error=sys.exc_info()[0] is None)

    def _epochs(self, tracker, chance: float) -> dict:
        cfg, so = self.cfg, self.sets["select_on"]
        for epoch in range(self.start_epoch, cfg["epochs"]):
            if self.ema is not None and cfg["head_warmup_lr"] > 0 and epoch == cfg["head_warmup_epochs"] > 0:
                self.ema.restart()  # the separate head phase is over: the EMA averages the full training only
                log.info(f"epoch {epoch + 1}: head-only phase over, EMA restarted from the current weights")
            stats = self.train_epoch(epoch)
            if self.swa is not None:
                self.swa.add(self.model, epoch, cfg["epochs"])
            p = self.validate()
            # rank 0 decides; every rank takes its decision (patience must stop all of them together)
            d = D.broadcast_object(self._select(epoch, p) if self.dist.is_main else None, self.dist)
            self.best_map, self.best_epoch, self.bad_epochs = d["best_map"], d["best_epoch"], d["bad_epochs"]
            self.selection = d["selection"]
            self.start_epoch = epoch + 1
            if self.dist.is_main:
                v, r = d["v"], d["record"]
                record = {"epoch": epoch, **stats, **r, "chance_mAP": chance,
                          "drw_active": bool(cfg["drw_epoch"] >= 0 and epoch >= cfg["drw_epoch"]),
                          "val_ap": {lab: json_float(a) for lab, a in zip(self.labels, v["ap"])}}
                meta = self._meta(epoch)
                weights = self._eval_model().state_dict()
                append_jsonl(self.out / "metrics.jsonl", record)
                # trackers show epochs as the console does, from 1 (metrics.jsonl keeps the 0-based index)
                tracker.log_metrics(epoch + 1, {**record, "epoch": epoch + 1, "best_epoch": self.best_epoch + 1})
                last = self._last_state(meta, weights)
                # copied to CPU now, written by a thread while the next epoch trains (module doc
                # "Checkpoints"): best.pt, then last.pt (after metrics: it marks the epoch done), then run.json
                items = ([({**meta, "model": weights}, self.out / "best.pt")] if d["improved"] else [])
                items.append((last, self.out / "last.pt"))
                run_json = self._run_json()
                self.saver.save(items, then=lambda: write_json(self.out / "run.json", run_json))
                log.info(f"epoch {epoch + 1}/{cfg['epochs']}  loss {stats['train_loss']:.4f}  "
                         f"val mAP {_fmt(r['val_mAP'])} (chance {chance:.4f})  proxy {_fmt(r['val_proxy_mAP'])}  "
                         f"honest {_fmt(r['val_honest_mAP'])} ({so})  mAUC {_fmt(r['val_mAUC'])}  "
                         f"{stats['images_per_s']:.0f} img/s  lr {stats['lr']:.2e}"
                         + ("  *best*" if d["improved"] else "")
                         + f"  (checkpoint copy {self.saver.last_copy_s:.2f} s, previous write "
                           f"{self.saver.last_write_s:.2f} s in the background)")
            t_barrier = time.perf_counter()
            D.barrier(self.dist)  # the other ranks wait for rank 0's copy only, not for its write
            self.barrier_wait_s = time.perf_counter() - t_barrier
            if cfg["patience"] and self.bad_epochs >= cfg["patience"]:
                log.info(f"early stop: no val mAP gain on {so} for {cfg['patience']} epochs")
                break
        self.saver.wait()  # best.pt and last.pt are on disk before model.pt is made from best.pt
        if self.swa is not None:
            self._finish_swa()
        if self.dist.is_main:
            self._write_model_pt()
        tracker.finish()
        D.barrier(self.dist)
        D.teardown(self.dist)
        return self._result()


def _fmt(x) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{x:.4f}"


def _plain_row(row: dict) -> dict:
    """A score-table row as plain floats and lists (checkpoints load with weights_only=True)."""
    return {k: ([float(a) for a in v] if k.startswith("ap_") else float(v)) for k, v in row.items()}


def _selection_text(sel: dict | None, best_epoch: int) -> str:
    """'epoch N chosen on proxy: val mAP full X, proxy Y, honest Z' (the run's final line)."""
    if not sel:
        return f"best epoch {best_epoch + 1}"
    return (f"epoch {best_epoch + 1} chosen on {sel['select_on']}: val mAP full {_fmt(sel['val_mAP'])}, proxy "
            f"{_fmt(sel['val_proxy_mAP'])}, honest {_fmt(sel['val_honest_mAP'])} (cross-fitted over the epochs)")


def train(cfg: dict, cache_dir: str, out_dir: str, resume: bool = False) -> dict:
    return Trainer(cfg, cache_dir, out_dir, resume=resume).fit()
