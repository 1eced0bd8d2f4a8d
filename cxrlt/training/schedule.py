"""The optimizer's side of a run: AdamW parameter groups, the LR at every optimizer step, and the
shape of an epoch for a given global batch.

Learning rate and global batch: an epoch is N // G optimizer steps (N sampled rows, G =
batch_size x processes x accum_steps), and warm-up, cosine and DRW are counted in optimizer steps,
so 1 GPU x accum_steps 8 and 8 GPUs x 1 run the same schedule at the same LR step by step
(epoch_shape). The configured lr, head_lr and min_lr are for the global batch lr_ref_batch (0 =
whatever G the run has: used as given, the old rule); lr_scale linear / sqrt multiplies them by
G / lr_ref_batch or its square root (timm's rule), none uses them as given. The first log line
of a run says G, the steps per epoch, the warm-up steps and the effective LRs; run.json records
global_batch, steps_per_epoch, lr_factor and effective_lr.
"""

from __future__ import annotations

import math


def head_phase_steps(cfg: dict, steps_per_epoch: int) -> int:
    """Optimizer steps of the separate head-only phase (head_warmup_lr > 0), else 0."""
    return cfg["head_warmup_epochs"] * steps_per_epoch if cfg["head_warmup_lr"] > 0 else 0


def lr_multiplier(step: int, cfg: dict, steps_per_epoch: int) -> float:
    """LR factor at an optimizer step: linear warm-up, cosine decay to min_lr/lr, DRW drop.

    With a separate head phase (head_warmup_lr > 0) the schedule starts after its steps (the
    phase's own LR is set by Trainer._set_lr)."""
    phase = head_phase_steps(cfg, steps_per_epoch)
    step = max(0, step - phase)
    total = max(1, cfg["epochs"] * steps_per_epoch - phase)
    warm = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    floor = cfg["min_lr"] / cfg["lr"] if cfg["lr"] > 0 else 0.0
    if warm > 0 and step < warm:
        mult = (step + 1) / warm
    else:
        frac = min(1.0, (step - warm) / max(1, total - warm))
        mult = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if cfg["drw_epoch"] >= 0 and step + phase >= cfg["drw_epoch"] * steps_per_epoch:
        mult *= cfg["drw_lr_factor"]
    return mult


def lr_scale_factor(cfg: dict, global_batch: int) -> float:
    """The factor the configured LRs are multiplied by for a run of `global_batch` images per
    optimizer step (module doc "Learning rate and global batch"): 1 when lr_ref_batch is 0 or
    lr_scale is none, else G / ref (linear) or sqrt(G / ref) (sqrt)."""
    ref, rule = int(cfg["lr_ref_batch"]), cfg["lr_scale"]
    if not ref or rule == "none":
        return 1.0
    ratio = global_batch / ref
    return ratio if rule == "linear" else math.sqrt(ratio)


def epoch_shape(num_rows: int, batch_size: int, world: int, accum: int, max_batches: int = 0) -> tuple[int, int]:
    """(micro-batches per process, optimizer steps) of one epoch over `num_rows` sampled rows.

    An epoch is num_rows // G optimizer steps, G = batch_size x world x accum the global batch, so
    any layout of the same G (1 process x accum 8, 8 processes x accum 1) has the same number of
    steps and, the schedule being counted in steps, the same LR at every step; each process runs
    accum micro-batches per step (none left over whose gradient would be thrown away).
    max_batches (debug) caps the micro-batches; the steps follow (at least 1 for the schedule)."""
    steps = num_rows // (batch_size * world * accum)
    batches = steps * accum
    if max_batches:
        batches = min(batches, max_batches)
    return batches, max(1, batches // accum)


def param_groups(model, cfg: dict, scale: float = 1.0) -> list[dict]:
    """AdamW groups: backbone / head LR (x scale, see lr_scale_factor) and weight decay
    (head_weight_decay, -1 = weight_decay), no weight decay on 1-D tensors (norms, biases)."""
    groups = []
    head_wd = cfg["weight_decay"] if cfg["head_weight_decay"] < 0 else cfg["head_weight_decay"]
    for name, params, lr, wd in (
        ("backbone", list(model.backbone_parameters()), cfg["lr"] * scale, cfg["weight_decay"]),
        ("head", list(model.head_parameters()), (cfg["head_lr"] or cfg["lr"]) * scale, head_wd),
    ):
        decay = [p for p in params if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in params if p.requires_grad and p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "base_lr": lr, "weight_decay": wd, "part": name})
        if no_decay:
            groups.append({"params": no_decay, "base_lr": lr, "weight_decay": 0.0, "part": name})
    return groups
