"""Run configuration: defaults, YAML files, CLI overrides, validation.

A config is a flat dict (timm style): the defaults below, updated by each YAML file in turn,
then by command-line flags (`--lr 3e-4`, `--ema true`). Every key is known, typed and, when
numeric, range-checked (RANGES) wherever a value enters: a YAML file, a flag, a checkpoint's
copy. An unknown key, a wrong type, a value out of range, a duplicated YAML key or a pair of keys
that contradict each other (RELATIONS) is a one-line ConfigError naming the file (or "command
line") and key, raised before any stage writes anything. The resolved config is saved as
`config.yaml` in the run folder so a run can always be reproduced.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import shlex
from pathlib import Path

from cxrlt.core.errors import ConfigError
from cxrlt.core.hashing import json_key

# key -> (default, type, help). `type` is bool, int, float or str.
SCHEMA: dict[str, tuple[object, type, str]] = {
    # --- model -----------------------------------------------------------------------
    "model": ("convnext_large.fb_in22k_ft_in1k", str, "timm model name"),
    "pretrained": (True, bool, "load timm's pretrained weights (hub, or pretrained_file)"),
    "pretrained_file": ("", str, "local weights file for the timm model (no network needed)"),
    "init_checkpoint": ("", str, "initialise from one of our own checkpoints (model.pt/best.pt)"),
    "init_from": ("", str, "Make: start from the model.pt of the run of this config stem (sets init_checkpoint)"),
    "pseudo_cache": ("", str, "a cache whose images train with soft labels (pseudo_labels; e.g. a public dataset's)"),
    "pseudo_labels": ("", str, "soft-label CSV of pseudo_cache's images (pseudo_label.py), trained beside the real labels"),
    "pseudo_weight": (0.5, float, "weight of a soft (pseudo) label in the loss, relative to a real label"),
    "img_size": (0, int, "the cache image size this config needs (0 = the Make default IMG_SIZE)"),
    "in_chans": (3, int, "3: replicate grayscale to RGB; 1: timm sums the first conv's weights"),
    "head": ("linear", str, "classifier head (cxrlt/models/model.py)"),
    "cosine_scale": (1.0, float, "cosine head output scale (keep 1 with LDAM, whose s scales)"),
    "csra_lambda": (0.1, float, "CSRA: weight of the class-specific attention term"),
    "csra_temperature": (1.0, float, "CSRA: softmax temperature of the spatial attention"),
    "csra_normalize": (True, bool, "CSRA: divide each class's score map by the norm of its weight before the "
                                   "temperature (the official CSRA code); false: raw scores (runs saved before "
                                   "this key read as false)"),
    "mld_queries": (100, int, "ml_decoder: fixed random queries (capped at the label count; fewer than the "
                              "labels: group FC, ceil(labels / queries) outputs per query)"),
    "mld_layers": (1, int, "ml_decoder: decoder layers"),
    "mld_dim": (768, int, "ml_decoder: embedding width (a multiple of 8, its attention heads)"),
    "seed_dropout": (0.5, float, "seed_linear: dropout between its LayerNorm and linear layer"),
    "drop_path": (0.0, float, "stochastic depth rate"),
    # --- loss --------------------------------------------------------------------------
    "loss": ("bce", str, "training loss (cxrlt/models/losses.py)"),
    "focal_gamma": (2.0, float, "focal loss gamma"),
    "asl_gamma_neg": (4.0, float, "asymmetric loss gamma for negatives"),
    "asl_gamma_pos": (1.0, float, "asymmetric loss gamma for positives"),
    "asl_clip": (0.05, float, "asymmetric loss probability margin for negatives"),
    "cb_beta": (0.9999, float, "class-balanced effective-number beta"),
    "ldam_max_m": (0.5, float, "LDAM margin of the rarest label"),
    "ldam_s": (30.0, float, "LDAM logit scale s (30 with a cosine head, ~1-5 with linear)"),
    "drw_epoch": (-1, int, "deferred re-weighting from this epoch (0-based); -1 = off"),
    "drw_beta": (0.9999, float, "DRW effective-number beta"),
    "drw_lr_factor": (1.0, float, "multiply the LR by this from drw_epoch on"),
    "db_alpha": (0.1, float, "DB loss: re-balancing weight floor"),
    "db_beta": (10.0, float, "DB loss: re-balancing smoothing slope"),
    "db_mu": (0.3, float, "DB loss: re-balancing smoothing centre"),
    "db_neg_scale": (2.0, float, "DB loss: negative-tolerant lambda"),
    "db_init_bias": (0.05, float, "DB loss: kappa (bias init scale)"),
    "db_focal_gamma": (2.0, float, "DB loss: focal gamma (0 = off)"),
    "margin_bce_max_m": (0.2, float, "margin_bce: positive-logit margin of the most frequent label"),
    "margin_bce_power": (0.5, float, "margin_bce: exponent of the effective-number weight (cb_beta) on both terms"),
    # --- sampling ----------------------------------------------------------------------
    "sampler": ("instance", str, "training sampler (cxrlt/data/samplers.py)"),
    "rfs_threshold": (0.001, float, "repeat-factor sampling threshold t"),
    "rfs_cap": (0.0, float, "repeat-factor sampling: cap on an image's repeat factor (0 = none; the 2026 winner: 10)"),
    "rfs_frequency": ("image", str, "repeat-factor f_c: image (fraction of images with the label, LVIS) | "
                                    "label_share (n_c / sum of all labels' n, the 2026 winner's code)"),
    "rfs_rounding": ("stochastic", str, "repeat-factor rounding: stochastic (floor + Bernoulli of the fraction, "
                                        "new each epoch) | round (round(r), as the 2026 winner's code)"),
    "rfs_epoch": ("fixed", str, "repeat-factor epoch: fixed (N images) | expanded (every repeat: sum of r images)"),
    "train_projections": ("all", str, "train on all images | frontal ones only (needs META_CSV; the test set is frontal)"),
    # --- optimisation ------------------------------------------------------------------
    "epochs": (15, int, "training epochs"),
    "batch_size": (32, int, "batch size per process"),
    "lr": (1e-4, float, "peak learning rate (backbone)"),
    "head_lr": (0.0, float, "head learning rate (0 = same as lr)"),
    "weight_decay": (1e-5, float, "AdamW weight decay"),
    "head_weight_decay": (-1.0, float, "AdamW weight decay of the head (-1 = weight_decay)"),
    "warmup_epochs": (1.0, float, "linear warm-up length in epochs"),
    "min_lr": (1e-6, float, "cosine schedule floor"),
    "grad_clip": (0.0, float, "clip gradient norm (0 = off)"),
    "accum_steps": (1, int, "gradient accumulation steps"),
    "lr_ref_batch": (0, int, "the global batch (batch_size x processes x accum_steps) lr, head_lr and min_lr are for; "
                             "0 = the run's own global batch (the LRs are used as given)"),
    "lr_scale": ("none", str, "LRs for a global batch G other than lr_ref_batch: none (as given) | linear "
                              "(x G / lr_ref_batch) | sqrt (x sqrt(G / lr_ref_batch))"),
    "head_warmup_epochs": (0, int, "first epochs train the head only (backbone frozen)"),
    "head_warmup_lr": (0.0, float, "> 0: the head-only epochs are a phase of their own at this constant head LR; "
                                   "warm-up, cosine and EMA start after them (the 2026 winner's code). 0: one schedule"),
    "amp": (True, bool, "mixed precision (bf16) on GPU; always fp32 on CPU"),
    "channels_last": (True, bool, "channels_last memory format on GPU"),
    "compile": ("auto", str, "torch.compile the model (and the eval/EMA model): auto (on a GPU; off on the CPU) | "
                             "true | false; a compile failure runs eagerly, said in one warning line"),
    "grad_checkpointing": ("false", str, "recompute block activations in backward (less memory, ~1/3 more compute): "
                                         "false | true | auto (on when the step's estimated memory does not fit "
                                         "the free GPU memory; the log says which and why)"),
    "nan_check_steps": (50, int, "check the loss for NaN/inf every this many batches (and at epoch end)"),
    "logger": ("none", str, "experiment trackers, comma-separated (none, tensorboard, wandb, mlflow): "
                            "offline, files under the run folder (docs/tracking.md)"),
    "ema": (False, bool, "keep an EMA of the weights; evaluate and keep the EMA"),
    "ema_decay": (0.9999, float, "EMA decay per optimizer step"),
    "swa_epochs": (0, int, "SWA: also average the weights at the end of each of the last this many epochs "
                           "(BatchNorm statistics recomputed) into swa.pt (0 = off)"),
    "swa_model": ("compare", str, "SWA: what model.pt holds: compare (the SWA weights when they score at least "
                                  "the best epoch on the selection set) | swa | best (the best epoch)"),
    "patience": (0, int, "early stopping: epochs without val mAP gain (0 = off)"),
    # --- augmentation ------------------------------------------------------------------
    "aug_hflip": (0.5, float, "probability of a horizontal flip"),
    "aug_rotate": (5.0, float, "max rotation (degrees)"),
    "aug_scale": (0.1, float, "max zoom in/out fraction"),
    "aug_translate": (0.05, float, "max shift as a fraction of the image size"),
    "aug_brightness": (0.1, float, "max brightness change (fraction of 255)"),
    "aug_contrast": (0.1, float, "max contrast change (fraction)"),
    "aug_affine_p": (1.0, float, "probability of the rotate/zoom/shift warp (the flip has aug_hflip)"),
    "aug_color_p": (1.0, float, "probability of the brightness/contrast change"),
    "aug_clahe_p": (0.0, float, "probability of CLAHE (OpenCV; 0 = off)"),
    "aug_clahe_clip": (2.0, float, "CLAHE clip limit, drawn uniformly from [1, this] (as albumentations)"),
    "aug_clahe_tiles": (8, int, "CLAHE tile grid: tiles x tiles"),
    "aug_noise_p": (0.0, float, "probability of additive Gaussian noise (0 = off)"),
    "aug_noise_var_min": (1.0, float, "Gaussian noise variance, lowest (grey levels^2, 0-255 scale)"),
    "aug_noise_var_max": (5.0, float, "Gaussian noise variance, highest (grey levels^2, 0-255 scale)"),
    "aug_dropout_p": (0.0, float, "probability of coarse dropout (cutout; 0 = off)"),
    "aug_dropout_holes": (6, int, "coarse dropout: holes (squares set to 0) per image"),
    "aug_dropout_size": (0.046875, float, "coarse dropout: hole side, fraction of the image side (24 px at 512)"),
    "mixup_alpha": (0.0, float, "mixup: Beta(alpha, alpha) mixing weight of images and labels (0 = off)"),
    "cutmix_alpha": (0.0, float, "cutmix: Beta(alpha, alpha) area weight of images and labels (0 = off)"),
    "mix_prob": (1.0, float, "probability that a batch is mixed when mixup/cutmix is on (both on: one of "
                             "them at random, half each)"),
    # --- data / run --------------------------------------------------------------------
    "val_fold": (0, int, "fold of the index held out for validation"),
    "seed": (0, int, "random seed"),
    "workers": (2, int, "data loader worker processes per GPU/process"),
    "device": ("auto", str, "auto | cpu | cuda | cuda:N"),
    "max_train_batches": (0, int, "debug: cap batches per epoch (0 = all)"),
    # --- post-training (retrain_head.py / predict.py) --------------------------------------
    "crt_method": ("crt", str, "post-training of the head: crt (re-train it on the frozen backbone) | tau "
                               "(tau-normalise it) | none (keep the trained head)"),
    "crt_epochs": (10, int, "cRT: head re-training epochs"),
    "crt_lr": (1e-3, float, "cRT: learning rate"),
    "crt_batch_size": (256, int, "cRT: batch size over cached features"),
    "crt_reinit": (True, bool, "cRT: re-initialise the head (else fine-tune it)"),
    "crt_sampler": ("class_aware", str, "cRT: sampler"),
    "crt_loss": ("bce", str, "cRT: loss"),
    "crt_feature_cache": ("auto", str, "cRT: head inputs cached on disk: float32 | float16 | off (backbone every "
                                       "cRT epoch) | auto (pooled heads float32, map heads' (csra, "
                                       "bn_attention, ml_decoder) float16, off when the disk lacks room)"),
    "tta": ("flip", str, "test-time augmentation views (cxrlt/post/inference.py)"),
    "tta_merge": ("prob", str, "average the views' probabilities (prob) or logits (logit)"),
    "normal_gating_alpha": (0.0, float, "p_k *= (1 - p_Normal)^alpha for findings; 0 = off"),
    "study_pool_weight": (0.0, float, "blend with the mean over the same study (exact study key); 0 = off"),
    "patient_context_weight": (0.0, float, "blend with the training labels of the patient's other studies; 0 = off "
                                           "(needs allow_patient_linking)"),
    "allow_patient_linking": (False, bool, "let post-processing link an image to the training labels of 'the same "
                                           "patient' (patient_context_weight, and its place in POSTPROC=auto's grid); "
                                           "off: CXR-LT 2026 forbids re-identifying evaluation images (docs/rules.md)"),
    # --- selection on the val fold (cxrlt/evaluation/selection.py) ------------------------------------
    "select_on": ("auto", str, "val subset choices are made on: auto (proxy when projection known) | proxy | full"),
    "proxy_require_finding": (False, bool, "proxy subset: only images with a positive label other than Normal"),
}

DEFAULTS = {k: v[0] for k, v in SCHEMA.items()}

# The allowed values of every numeric key (a test keeps this complete). A rule is one of
#   "> 0", ">= 0", ">= 1", ...   a bound;
#   "[0, 1]", "(0, 1)", "[0, 1)"  an interval, brackets closed, parentheses open;
#   "finite"                       any finite number.
# NaN and infinity are refused everywhere.
RANGES: dict[str, str] = {
    "in_chans": ">= 1",  # (and CHOICES)
    "cosine_scale": "> 0",
    "pseudo_weight": "> 0",
    "csra_lambda": ">= 0",
    "csra_temperature": "> 0",
    "mld_queries": ">= 1",
    "mld_layers": ">= 1",
    "mld_dim": ">= 8",
    "seed_dropout": "[0, 1)",
    "drop_path": "[0, 1)",
    "focal_gamma": ">= 0",
    "asl_gamma_neg": ">= 0",
    "asl_gamma_pos": ">= 0",
    "asl_clip": "[0, 1)",
    "cb_beta": "[0, 1)",
    "ldam_max_m": ">= 0",
    "ldam_s": "> 0",
    "drw_epoch": ">= -1",
    "drw_beta": "[0, 1)",
    "drw_lr_factor": "> 0",
    "db_alpha": ">= 0",
    "db_beta": ">= 0",
    "db_mu": "finite",
    "db_neg_scale": "> 0",
    "db_init_bias": ">= 0",
    "db_focal_gamma": ">= 0",
    "rfs_threshold": "(0, 1]",
    "rfs_cap": ">= 0",
    "margin_bce_max_m": "[0, 10]",
    "margin_bce_power": "[0, 4]",
    "head_weight_decay": ">= -1",
    "head_warmup_lr": ">= 0",
    "epochs": ">= 1",
    "batch_size": ">= 1",
    "lr": "> 0",
    "head_lr": ">= 0",
    "weight_decay": ">= 0",
    "warmup_epochs": ">= 0",
    "min_lr": ">= 0",
    "grad_clip": ">= 0",
    "accum_steps": ">= 1",
    "lr_ref_batch": ">= 0",
    "head_warmup_epochs": ">= 0",
    "ema_decay": "(0, 1)",
    "swa_epochs": ">= 0",
    "patience": ">= 0",
    "aug_hflip": "[0, 1]",
    "aug_rotate": "[0, 180]",
    "aug_scale": "[0, 1)",
    "aug_translate": "[0, 1)",
    "aug_brightness": "[0, 1]",
    "aug_contrast": "[0, 1)",
    "aug_affine_p": "[0, 1]",
    "aug_color_p": "[0, 1]",
    "aug_clahe_p": "[0, 1]",
    "aug_clahe_clip": ">= 1",
    "aug_clahe_tiles": "[1, 64]",
    "aug_noise_p": "[0, 1]",
    "aug_noise_var_min": ">= 0",
    "aug_noise_var_max": ">= 0",
    "aug_dropout_p": "[0, 1]",
    "aug_dropout_holes": "[0, 1000]",
    "aug_dropout_size": "[0, 1]",
    "mixup_alpha": ">= 0",
    "cutmix_alpha": ">= 0",
    "mix_prob": "[0, 1]",
    "val_fold": ">= 0",
    "seed": "[0, 4294967295]",  # numpy's legacy seeding takes 32 bits
    "workers": ">= 0",
    "max_train_batches": ">= 0",
    "nan_check_steps": ">= 1",
    "img_size": ">= 0",
    "crt_epochs": ">= 1",
    "crt_lr": "> 0",
    "crt_batch_size": ">= 1",
    "normal_gating_alpha": "[-8, 8]",  # negative: p_k / (1 - p_Normal)^|alpha| (cxrlt/post/postproc.py)
    "study_pool_weight": "[0, 1]",
    "patient_context_weight": "[0, 1]",
}

# Rules between keys: (keys, holds(cfg), why). Checked on the whole config after every file and
# override, and when an override changes one of the keys.
RELATIONS: list[tuple[tuple[str, ...], object, str]] = [
    (("min_lr", "lr"), lambda c: c["min_lr"] <= c["lr"],
     "min_lr is above lr: the cosine schedule would rise instead of decay"),
    (("head_warmup_lr", "head_warmup_epochs"), lambda c: c["head_warmup_lr"] == 0 or c["head_warmup_epochs"] > 0,
     "head_warmup_lr sets the LR of the head-only epochs, but head_warmup_epochs is 0"),
    (("head_warmup_lr", "head_warmup_epochs", "epochs"),
     lambda c: c["head_warmup_lr"] == 0 or c["head_warmup_epochs"] < c["epochs"],
     "the separate head phase (head_warmup_lr) takes every epoch: raise epochs above head_warmup_epochs"),
    (("mld_dim",), lambda c: c["mld_dim"] % 8 == 0,
     "mld_dim must be a multiple of 8 (the ML-Decoder's attention heads)"),
    (("aug_noise_var_min", "aug_noise_var_max"), lambda c: c["aug_noise_var_min"] <= c["aug_noise_var_max"],
     "the lowest Gaussian noise variance is above the highest"),
    (("mixup_alpha", "cutmix_alpha", "loss"),
     lambda c: not (c["mixup_alpha"] or c["cutmix_alpha"]) or c["loss"] not in HARD_LABEL_LOSSES,
     "mixup/cutmix train on mixed (soft) labels, which this loss cannot take: its targets enter the loss "
     "beyond the linear y * positive + (1 - y) * negative terms (ldam, margin_bce: a margin y * m; db: weights "
     "from each image's positive labels); use bce, bce_pw, focal, asl or cb"),
    (("mixup_alpha", "cutmix_alpha", "pseudo_labels"),
     lambda c: not (c["mixup_alpha"] or c["cutmix_alpha"]) or not c["pseudo_labels"],
     "mixup/cutmix with pseudo-labels is not supported (a mixed pair of a real and a pseudo-labelled image "
     "would have no single sample weight): turn one of them off"),
    (("patient_context_weight", "allow_patient_linking"),
     lambda c: c["patient_context_weight"] == 0 or c["allow_patient_linking"],
     "patient_context_weight links test images to training patients, which CXR-LT 2026 forbids; set "
     "allow_patient_linking: true to opt in (docs/rules.md)"),
]

# String keys whose values follow a pattern (the help text says which).
PATTERNS = {"device": r"auto|cpu|cuda(:\d+)?"}

# Every key belongs to one group, by what a change of its value affects:
#   post  read after training (cRT, predict, selection): editing one re-runs only those stages,
#         which read it from the current config, never from the checkpoint's copy;
#   run   how a run executes, not what it computes (a change never invalidates a run);
#   train everything else: the trained weights depend on it.
# A new key is `train` unless it is listed here.
POST_KEYS = {k for k in SCHEMA if k.startswith("crt_")} | {
    "tta", "tta_merge", "normal_gating_alpha", "study_pool_weight", "patient_context_weight",
    "allow_patient_linking", "select_on", "proxy_require_finding"}
# post keys that define the val subsets every choice on val is made on (cxrlt/evaluation/selection.py): an
# input of each stage that chooses on val (cRT's head, predict's post-processing, the ensemble)
SELECTION_KEYS = ("select_on", "proxy_require_finding")
RUN_KEYS = {"workers", "device", "compile", "grad_checkpointing", "nan_check_steps", "logger"}
# train keys that may be raised after a run finished: the run is then extended, not redone
EXTENDABLE_KEYS = {"epochs", "patience"}


def group(key: str) -> str:
    """'post', 'run' or 'train' (see POST_KEYS / RUN_KEYS)."""
    return "post" if key in POST_KEYS else "run" if key in RUN_KEYS else "train"


# Train keys added after runs existed. Each is left out of train_part where it cannot have
# changed what finished runs did, so adding a key never retrains them (their train keys stay the
# same): a value = the key is left out at that value (which reproduces the behaviour from before
# the key, and is its default); a function of the config = the key is left out where it is
# True (the key does not act in that run, e.g. a head's key under another head).
LATER_KEYS = {
    "rfs_cap": 0.0, "rfs_frequency": "image", "rfs_rounding": "stochastic", "rfs_epoch": "fixed",
    "train_projections": "all", "margin_bce_max_m": 0.2, "margin_bce_power": 0.5,
    "head_weight_decay": -1.0, "head_warmup_lr": 0.0,
    "csra_normalize": lambda c: c["head"] != "csra",
    "mld_queries": 100, "mld_layers": 1, "mld_dim": 768, "seed_dropout": 0.5,
    "aug_affine_p": 1.0, "aug_color_p": 1.0, "aug_clahe_p": 0.0, "aug_noise_p": 0.0, "aug_dropout_p": 0.0,
    "aug_clahe_clip": lambda c: c["aug_clahe_p"] == 0, "aug_clahe_tiles": lambda c: c["aug_clahe_p"] == 0,
    "aug_noise_var_min": lambda c: c["aug_noise_p"] == 0, "aug_noise_var_max": lambda c: c["aug_noise_p"] == 0,
    "aug_dropout_holes": lambda c: c["aug_dropout_p"] == 0, "aug_dropout_size": lambda c: c["aug_dropout_p"] == 0,
    "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": lambda c: not (c["mixup_alpha"] or c["cutmix_alpha"]),
    "swa_epochs": 0, "swa_model": lambda c: c["swa_epochs"] == 0,
    "lr_ref_batch": 0, "lr_scale": "none",
}


def _left_out(key: str, cfg: dict) -> bool:
    if key not in LATER_KEYS:
        return False
    rule = LATER_KEYS[key]
    return bool(rule(cfg)) if callable(rule) else cfg[key] == rule


def train_part(cfg: dict) -> dict:
    """The keys of cfg that the trained weights depend on (group 'train'), sorted; LATER_KEYS
    left out where they cannot have acted."""
    return {k: cfg[k] for k in sorted(cfg) if group(k) == "train" and not _left_out(k, cfg)}


def train_key(cfg: dict, exclude=EXTENDABLE_KEYS) -> str:
    """Fingerprint (16 hex) of the train keys, `exclude`d keys left out: equal keys <=> a run
    trained with one config can continue under the other."""
    return json_key({k: v for k, v in train_part(cfg).items() if k not in exclude})

# common names from other trainers, for the "did you mean" hint of an unknown key
ALIASES = {"learning_rate": "lr", "wd": "weight_decay", "num_epochs": "epochs", "bs": "batch_size",
           "num_workers": "workers", "arch": "model", "backbone": "model"}

# The names of the heads, losses, samplers and TTA presets: each tuple is the key set of the
# registry that builds them (models.HEADS, losses.LOSSES, samplers.SAMPLERS, inference.TTA_VIEWS),
# which checks at import that it holds exactly these names (check_registry). They are spelt here,
# not read from those modules, because those import torch and this module must not: Make's plan
# (cxrlt/pipeline/plan.py) checks every config at parse time, in well under a second.
HEAD_NAMES = ("linear", "cosine", "csra", "bn_attention", "ml_decoder", "seed_linear")
LOSS_NAMES = ("bce", "bce_pw", "focal", "asl", "cb", "ldam", "db", "margin_bce")
# losses whose targets enter beyond y * positive + (1 - y) * negative (cxrlt/models/losses.py): they take
# 0/1 labels only, so mixup/cutmix (mixed labels) is refused with them (RELATIONS)
HARD_LABEL_LOSSES = ("ldam", "db", "margin_bce")
SAMPLER_NAMES = ("instance", "class_aware", "repeat_factor")
TTA_NAMES = ("none", "flip", "flip_scale", "medium", "released_medium")
ENSEMBLE_METHODS = ("mean", "rank", "weighted", "greedy")  # ensemble.py --method, Make's ENSEMBLE

# key -> its allowed values; --help lists them after the key's help text
CHOICES = {
    "head": HEAD_NAMES,
    "loss": LOSS_NAMES,
    "crt_loss": LOSS_NAMES,
    "sampler": SAMPLER_NAMES,
    "crt_sampler": SAMPLER_NAMES,
    "tta": TTA_NAMES,
    "tta_merge": ("prob", "logit"),
    "crt_method": ("crt", "tau", "none"),
    "crt_feature_cache": ("auto", "float32", "float16", "off"),
    "in_chans": (1, 3),
    "select_on": ("auto", "proxy", "full"),
    "rfs_frequency": ("image", "label_share"),
    "rfs_rounding": ("stochastic", "round"),
    "rfs_epoch": ("fixed", "expanded"),
    "train_projections": ("all", "frontal"),
    "swa_model": ("compare", "swa", "best"),
    "lr_scale": ("none", "linear", "sqrt"),
    "compile": ("auto", "true", "false"),
    "grad_checkpointing": ("auto", "true", "false"),
}
# str keys that were bool keys and gained "auto": true/false (YAML booleans, yes/no, 1/0) still
# read as before, as the strings "true" / "false" (old configs and checkpoints stay valid)
BOOL_OR_AUTO = ("compile", "grad_checkpointing")
# keys whose value is a comma-separated list of CHOICES
LIST_CHOICES = {"logger": ("none", "tensorboard", "wandb", "mlflow")}


def check_registry(key: str, registry) -> None:
    """For a registry module at import: its names must be CHOICES[key] (a name added in one
    place only would be refused by every config, or accepted and then fail to build)."""
    if set(registry) != set(CHOICES[key]):
        raise RuntimeError(f"the {key} registry has {sorted(registry)} but cxrlt/core/config.py CHOICES[{key!r}] "
                           f"has {sorted(CHOICES[key])}: name each choice in both")


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def coerce(key: str, value, source: str):
    """Check/convert one value against the schema; ConfigError names source and key."""
    if key not in SCHEMA:
        near = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key, SCHEMA.keys(), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
    _, typ, _ = SCHEMA[key]
    ok = False
    if key in BOOL_OR_AUTO and (isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_WORDS)):
        value = "true" if _BOOL_WORDS.get(str(value).lower(), value is True) else "false"
    if typ is bool:
        if isinstance(value, bool):
            ok = True
        elif isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            value, ok = value.lower() in {"true", "1", "yes"}, True
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            ok = True
        elif isinstance(value, str):
            try:
                value, ok = int(value), True
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value, ok = float(value), True
        elif isinstance(value, str):
            try:
                value, ok = float(value), True
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            ok = True
        elif value is None:
            value, ok = "", True
    if not ok:
        raise ConfigError(
            f"{source}: config key '{key}' must be {typ.__name__}, got {value!r} ({type(value).__name__})"
        )
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(
            f"{source}: config key '{key}' = {value!r} is not one of {sorted(CHOICES[key], key=str)}"
        )
    if key in LIST_CHOICES:
        bad = [v for v in value.split(",") if v.strip() not in LIST_CHOICES[key]]
        if bad:
            raise ConfigError(f"{source}: config key '{key}' = {value!r}: {bad[0]!r} is not one of "
                              f"{', '.join(LIST_CHOICES[key])} (comma-separated)")
    if typ in (int, float):
        _check_range(key, value, source)
    elif typ is str:
        _check_text(key, value, source)
    return value


def _check_range(key: str, value, source: str) -> None:
    rule = RANGES.get(key)
    if rule is None:
        return
    if not math.isfinite(value):
        raise ConfigError(f"{source}: config key '{key}' = {value!r} must be a finite number")
    if not _in_range(value, rule):
        say = rule if rule[0] in "<>" or rule == "finite" else f"in {rule}"
        raise ConfigError(f"{source}: config key '{key}' = {value!r} must be {say}")


def _in_range(value, rule: str) -> bool:
    if rule == "finite":
        return True
    m = re.fullmatch(r"(>=|>|<=|<)\s*(\S+)", rule)
    if m:
        op, bound = m.group(1), float(m.group(2))
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    m = re.fullmatch(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])", rule)
    if not m:
        raise ValueError(f"bad range rule {rule!r}")
    lo, hi = float(m.group(2)), float(m.group(3))
    above = value >= lo if m.group(1) == "[" else value > lo
    below = value <= hi if m.group(4) == "]" else value < hi
    return above and below


def _check_text(key: str, value: str, source: str) -> None:
    if "\n" in value or "\r" in value:
        raise ConfigError(f"{source}: config key '{key}' = {value!r} must be one line")
    pattern = PATTERNS.get(key)
    if pattern and not re.fullmatch(pattern, value):
        raise ConfigError(f"{source}: config key '{key}' = {value!r} is not one of: {SCHEMA[key][2]}")


def check_relations(cfg: dict, source: str, keys=None) -> None:
    """ConfigError for the first RELATIONS rule cfg breaks (only rules involving `keys`, if given)."""
    for rule_keys, holds, why in RELATIONS:
        if (keys is None or set(rule_keys) & set(keys)) and not holds(cfg):
            values = ", ".join(f"{k} = {cfg[k]!r}" for k in rule_keys)
            raise ConfigError(f"{source}: {values}: {why}")


def read_yaml(path: str | Path, what: str = "config file"):
    """The data of a YAML file (a key given twice in a mapping is refused); every problem is a
    one-line ConfigError naming the file. Also reads study files (cxrlt/studies/spec.py)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_yaml_problem(e)}") from None


def load_yaml(path: str | Path) -> dict:
    """A YAML config file -> {key: checked value}; every problem is a one-line ConfigError."""
    path = Path(path)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of key: value")
    return {k: coerce(k, v, str(path)) for k, v in data.items()}


def _unique_key_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (built lazily: yaml is
    imported only when a config file is read)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: construct_mapping below says so
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first + 1}): give each key once",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _yaml_problem(e) -> str:
    """A PyYAML error as one line: 'line L, column C: what'."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    if not problem.startswith("duplicate key"):
        context = getattr(e, "context", None)
        problem = f"not valid YAML ({context + ': ' if context else ''}{problem})"
    return " ".join((where + problem).split())


def resolve(config_files: list[str] | None = None, overrides: dict | None = None) -> dict:
    """Defaults <- each YAML file in order <- overrides (e.g. from the CLI), then checked as a whole."""
    cfg, origin = dict(DEFAULTS), {}
    for f in config_files or []:
        values = load_yaml(f)
        cfg.update(values)
        origin.update(dict.fromkeys(values, str(f)))
    cfg = {**cfg, **{k: coerce(k, v, "command line") for k, v in (overrides or {}).items()}}
    origin.update(dict.fromkeys(overrides or {}, "command line"))
    for rule_keys, _, _ in RELATIONS:  # name the place that set the last of the rule's keys
        where = [origin[k] for k in rule_keys if k in origin]
        check_relations(cfg, where[-1] if where else "defaults", keys=rule_keys)
    return cfg


def apply_overrides(cfg: dict, overrides: dict, source: str = "command line") -> dict:
    """A copy of cfg with each override checked against the schema and applied."""
    out = {**cfg, **{k: coerce(k, v, source) for k, v in overrides.items()}}
    check_relations(out, source, keys=overrides)
    return out


def stage_config(run_cfg: dict, config_files=(), overrides: dict | None = None, log=print,
                 stage: str = "this stage") -> dict:
    """The config a post-training stage (cRT, predict) runs with: the run's own config (its train
    keys describe the model and the val fold) with the post keys, run keys and `seed` taken from
    the current config file(s) + overrides as Make passes them, or, without a file, from the run's
    copy + overrides. Overrides of other (train) keys are ignored, and said so: they would describe
    another run (Make passes TRAIN_ARGS to every stage)."""
    overrides = dict(overrides or {})
    mine = {k for k in SCHEMA if group(k) in ("post", "run")} | {"seed"}
    ignored = sorted(k for k in overrides if k not in mine)
    if ignored:
        log(f"{stage}: ignoring train keys given on the command line (the run's values apply): {', '.join(ignored)}")
    if config_files:
        current = resolve(list(config_files), overrides)
        return {**run_cfg, **{k: current[k] for k in mine}}
    return apply_overrides(run_cfg, {k: v for k, v in overrides.items() if k in mine})


def post_part(cfg: dict, prefix: str | None = None) -> dict:
    """The post keys of cfg (only those starting with `prefix` when given; without one, those that
    do not start with `crt_`: what predict reads), sorted: what a post-training output depends on."""
    keep = (lambda k: k.startswith(prefix)) if prefix else (lambda k: not k.startswith("crt_"))
    return {k: cfg[k] for k in sorted(cfg) if group(k) == "post" and keep(k)}


# the post-processing values a postproc.json chooses (cxrlt/post/postproc.py's PostParams)
POSTPROC_KEYS = ("normal_gating_alpha", "study_pool_weight", "patient_context_weight")


def load_postproc(path) -> dict:
    """The post-processing values chosen on val (`predict.py --split val` writes <out>.postproc.json:
    {"choice": {"normal_gating_alpha": A, "study_pool_weight": W, "patient_context_weight": C},
    ...}, format in cxrlt/post/postproc.py) as checked overrides."""
    import json

    keys = POSTPROC_KEYS
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: post-processing file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg}); expected the "
                          f"<pred_val>.postproc.json that predict.py --split val writes") from None
    choice = data.get("choice") if isinstance(data, dict) else None
    if not isinstance(choice, dict):
        raise ConfigError(f"{path}: no 'choice' object (expected the <pred_val>.postproc.json that "
                          f"predict.py --split val writes)")
    missing = [k for k in keys if k not in choice]
    if missing:
        raise ConfigError(f"{path}: 'choice' has no {', '.join(map(repr, missing))}")
    return {k: coerce(k, choice[k], f"{path}: choice") for k in keys}


def flag(key: str) -> str:
    """The command-line flag of a config key: `batch_size` -> `--batch-size`."""
    return f"--{key.replace('_', '-')}"


def as_flags(values: dict) -> str:
    """Config values as the flags add_config_flags reads back (`--select-on full --ema true`)."""
    return " ".join(f"{flag(k)} {shlex.quote(str(v).lower() if isinstance(v, bool) else str(v))}"
                    for k, v in values.items())


def add_config_flags(parser: argparse.ArgumentParser, keys: list[str] | None = None) -> None:
    """Add one `--key-name VALUE` flag per config key (values parsed and checked by resolve).

    Flags are spelt with dashes like every script flag (`--batch-size 8`); the key's own spelling
    (`--batch_size 8`) is accepted too (configs, TRAIN_ARGS and older commands use it), but only
    the dash form is listed in --help. A dash form the parser already has (predict.py's own
    --batch-size) is left to it: that key then takes only its underscore form.
    """
    group = parser.add_argument_group("config overrides (any key of cxrlt/core/config.py)")
    for key in keys or SCHEMA:
        default, typ, help_ = SCHEMA[key]
        if key in CHOICES and " | " not in help_:  # (a help text with " | " describes each choice)
            help_ += f"; one of: {', '.join(map(str, CHOICES[key]))}"
        dest, dash, plain = f"cfg__{key}", flag(key), f"--{key}"
        shown = dict(dest=dest, default=None, metavar=typ.__name__.upper(), help=f"{help_} [default: {default!r}]")
        if dash == plain:
            group.add_argument(plain, **shown)
            continue
        try:
            group.add_argument(dash, **shown)
        except argparse.ArgumentError:  # the script's own flag of that name wins
            group.add_argument(plain, **shown)
            continue
        group.add_argument(plain, dest=dest, default=None, help=argparse.SUPPRESS)


def overrides_from_args(args: argparse.Namespace) -> dict:
    return {k[5:]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}


def save(cfg: dict, path) -> None:
    import yaml

    from cxrlt.core.fileio import write_text

    write_text(path, yaml.safe_dump(cfg, sort_keys=False))


# keys whose meaning for a config saved before the key existed differs from today's default: a saved
# config (checkpoint, run folder) without the key reads as this value, so an old run keeps behaving
# as it was trained
ABSENT_DEFAULTS = {"csra_normalize": False}


def check_dict(cfg: dict, source: str) -> dict:
    """Validate a config dict read back from a checkpoint (older keys are tolerated; a key it lacks
    takes ABSENT_DEFAULTS' value when listed there, else the default)."""
    out = {**DEFAULTS, **ABSENT_DEFAULTS}
    for k, v in cfg.items():
        if k in SCHEMA:
            out[k] = coerce(k, v, source)
    return out
