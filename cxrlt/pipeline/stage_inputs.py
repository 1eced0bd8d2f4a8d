"""What each stage reads from the config: the one owner of that rule.

Make's plan writes these dicts into the stages' stamps (cxrlt/pipeline/plan.py) and each stage
records the same dicts in its output's sidecar (cxrlt/pipeline/fingerprints.py) and compares
them on its next run, so the two layers cannot disagree about what a stage depends on:

    training   train_keys(cfg)    every key of group `train` (cxrlt/core/config.py)
    cRT        crt_keys(cfg)      the crt_* keys, the selection keys (the head is chosen on the
                                  selection set) and the seed (its sampler and initialisation)
    predict    predict_keys(cfg)  the post keys other than crt_* (TTA, post-processing,
                                  selection); crt_* reach predict through the cRT model's content

Upstream outputs (a checkpoint, a cache) enter a stage's inputs by content (file_key, cache key)
where the stage runs, and by file time as Make prerequisites.
"""

from __future__ import annotations

from cxrlt.core import config as config_mod


def train_keys(cfg: dict) -> dict:
    return config_mod.train_part(cfg)


def crt_keys(cfg: dict) -> dict:
    keys = {**config_mod.post_part(cfg, prefix="crt_"), "seed": cfg["seed"]}
    keys.update({k: cfg[k] for k in config_mod.SELECTION_KEYS})
    return dict(sorted(keys.items()))


def predict_keys(cfg: dict) -> dict:
    return config_mod.post_part(cfg)
