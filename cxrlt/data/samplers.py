"""Epoch samplers over the training rows, identical on every DDP rank without communication.

Each sampler yields positions 0..N-1 into the training rows. The epoch's full index list is
a pure function of (seed, epoch) -- so a resumed run replays exactly the same epochs and all
ranks compute the same list -- and has length N for every sampler (longer for repeat_factor
with rfs_epoch expanded, see below). With R replicas the list is padded by wrapping around to
a multiple of R and rank r takes positions r, r+R, r+2R, ..., so the ranks' shares are
disjoint, equally long, and interleave back into the padded list.

Samplers (cfg["sampler"] / cfg["crt_sampler"]):
  instance       a fresh seeded permutation of the rows each epoch
  class_aware    multi-label class-aware sampling (Shen et al. 2016): each draw picks a label
                 uniformly among the labels with >= 1 positive, then the next image of that
                 label's shuffled list; a list that runs out is reshuffled and restarted. The
                 lists are reshuffled at the start of every epoch (that keeps the epoch a pure
                 function of (seed, epoch)). Rows with no positive label are never drawn (no
                 "no-label" pseudo class): they carry only negatives, which every drawn image
                 also supplies for all the labels it lacks.
  repeat_factor  repeat-factor sampling (Gupta et al., LVIS 2019): r(c) = max(1, sqrt(t / f_c)),
                 t = cfg rfs_threshold; r(row) = max over its labels (1 for a row with no label),
                 capped at cfg rfs_cap (0 = no cap). Options, each a config key:
                   rfs_frequency  image: f_c = fraction of rows with label c (LVIS, the default);
                                  label_share: f_c = n_c / sum_k n_k, the label's share of all
                                  positive labels (the CXR-LT 2026 winner's released sampler)
                   rfs_rounding   stochastic: a row is repeated floor(r) times plus once more
                                  with probability frac(r) (seeded, new each epoch, the default);
                                  round: round(r) times (numpy's round-half-even, as released)
                   rfs_epoch      fixed: the shuffled expanded list is truncated to N, so an
                                  epoch keeps N images (the default); expanded: the epoch is
                                  the whole expanded list, sum over rows of round(r) images
                                  (stochastic rounding: round(sum r), the draws truncated or
                                  wrapped to it), the same length every epoch so the LR
                                  schedule's steps per epoch stay fixed
                 The expanded list is reshuffled every epoch; rare rows appear ~r times as often.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler

from cxrlt.core.config import check_registry
from cxrlt.data.labelmask import annotated_counts
from cxrlt.core.errors import ConfigError


class EpochSampler(Sampler[int]):
    """Base: subclasses implement `epoch_indices(rng) -> np.ndarray` of length epoch_length (N)."""

    def __init__(self, num_rows: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if num_rows <= 0:
            raise ValueError("a sampler needs at least one training row")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad DDP layout: rank {rank} of {num_replicas}")
        self.num_rows = int(num_rows)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.total_size = math.ceil(self.epoch_length / self.num_replicas) * self.num_replicas

    @property
    def epoch_length(self) -> int:
        """Images in one epoch's full list (N; more for repeat_factor with rfs_epoch expanded)."""
        return self.num_rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, epoch: int) -> np.random.Generator:
        # the stream depends on (seed, epoch) only: never on rank or on earlier epochs
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))

    def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def full_indices(self, epoch: int | None = None) -> np.ndarray:
        """The whole epoch's list (length epoch_length) as every rank computes it."""
        epoch = self.epoch if epoch is None else epoch
        idx = np.asarray(self.epoch_indices(self.rng(epoch)), dtype=np.int64)
        assert idx.shape == (self.epoch_length,)
        return idx

    def rank_indices(self, epoch: int | None = None) -> np.ndarray:
        idx = self.full_indices(epoch)
        pad = self.total_size - len(idx)
        if pad:
            idx = np.concatenate([idx, np.resize(idx, pad)])  # wrap around
        return idx[self.rank::self.num_replicas]

    def __iter__(self):
        return iter(self.rank_indices().tolist())

    def __len__(self) -> int:
        return self.total_size // self.num_replicas


class InstanceSampler(EpochSampler):
    def epoch_indices(self, rng):
        return rng.permutation(self.num_rows)


class ClassAwareSampler(EpochSampler):
    def __init__(self, targets: np.ndarray, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(len(targets), seed, num_replicas, rank)
        pos = np.asarray(targets) > 0.5
        self.label_rows = [np.flatnonzero(pos[:, c]) for c in range(pos.shape[1])]
        self.labels = np.array([c for c, rows in enumerate(self.label_rows) if len(rows)], dtype=np.int64)
        if len(self.labels) == 0:
            raise ConfigError("class_aware sampler: no label has a positive row in the training fold")

    def epoch_indices(self, rng):
        draws = self.labels[rng.integers(len(self.labels), size=self.num_rows)]
        out = np.empty(self.num_rows, dtype=np.int64)
        for c in self.labels:
            where = np.flatnonzero(draws == c)
            if len(where) == 0:
                continue
            rows = self.label_rows[c]
            # consecutive shuffled passes over the label's rows, cut to the draws it received
            passes = math.ceil(len(where) / len(rows))
            seq = rng.permuted(np.tile(rows, (passes, 1)), axis=1).ravel()
            out[where] = seq[: len(where)]
        return out


RFS_FREQUENCIES = ("image", "label_share")
RFS_ROUNDINGS = ("stochastic", "round")
RFS_EPOCHS = ("fixed", "expanded")


def repeat_factors(targets: np.ndarray, threshold: float, cap: float = 0.0,
                   frequency: str = "image") -> np.ndarray:
    """Per-row repeat factor min(cap, max(1, max over its labels of sqrt(t / f_c))); 1 for
    unlabelled rows; cap 0 = none. f_c by `frequency` (module docstring)."""
    if frequency not in RFS_FREQUENCIES:
        raise ConfigError(f"rfs_frequency '{frequency}' (choose one of: {', '.join(RFS_FREQUENCIES)})")
    pos = np.asarray(targets) > 0.5  # a NaN (unannotated) label is never a positive
    positives, annotated = annotated_counts(targets)  # over the rows that annotate label c
    if frequency == "image":
        freq = positives / np.maximum(annotated, 1)  # 0 for an absent label, which no row carries anyway
    else:
        freq = positives / max(float(positives.sum()), 1.0)
    with np.errstate(divide="ignore"):
        r_label = np.maximum(1.0, np.sqrt(threshold / np.where(freq > 0, freq, np.inf)))
    r_row = np.where(pos, r_label[None, :], 1.0).max(axis=1, initial=1.0)
    return np.minimum(r_row, cap) if cap > 0 else r_row


class RepeatFactorSampler(EpochSampler):
    def __init__(self, targets: np.ndarray, threshold: float, seed: int, num_replicas: int = 1, rank: int = 0,
                 cap: float = 0.0, frequency: str = "image", rounding: str = "stochastic", epoch: str = "fixed"):
        if threshold < 0:
            raise ConfigError(f"rfs_threshold must be >= 0, got {threshold}")
        if cap and cap < 1:
            raise ConfigError(f"rfs_cap must be 0 (no cap) or >= 1, got {cap}")
        for key, value, allowed in (("rfs_rounding", rounding, RFS_ROUNDINGS), ("rfs_epoch", epoch, RFS_EPOCHS)):
            if value not in allowed:
                raise ConfigError(f"{key} '{value}' (choose one of: {', '.join(allowed)})")
        self.factors = repeat_factors(targets, threshold, cap, frequency)
        self.rounding = rounding
        if epoch == "expanded":
            length = int(np.round(self.factors).sum()) if rounding == "round" else int(round(self.factors.sum()))
        else:
            length = len(targets)
        self._length = max(length, len(targets))  # every r >= 1
        super().__init__(len(targets), seed, num_replicas, rank)

    @property
    def epoch_length(self) -> int:
        return self._length

    def epoch_indices(self, rng):
        if self.rounding == "round":
            reps = np.round(self.factors).astype(np.int64)
        else:
            whole = np.floor(self.factors)
            reps = (whole + (rng.random(self.num_rows) < self.factors - whole)).astype(np.int64)
        expanded = rng.permutation(np.repeat(np.arange(self.num_rows), reps))  # len >= N since every r >= 1
        return np.resize(expanded, self._length)  # truncated, or wrapped when short of a fixed length


# cfg sampler -> (targets, cfg, seed, num_replicas, rank) -> the sampler; its names are
# config.SAMPLER_NAMES
SAMPLERS = {
    "instance": lambda y, cfg, seed, n, r: InstanceSampler(len(y), seed, n, r),
    "class_aware": lambda y, cfg, seed, n, r: ClassAwareSampler(y, seed, n, r),
    "repeat_factor": lambda y, cfg, seed, n, r: RepeatFactorSampler(
        y, float(cfg["rfs_threshold"]), seed, n, r, cap=float(cfg.get("rfs_cap", 0.0)),
        frequency=cfg.get("rfs_frequency", "image"), rounding=cfg.get("rfs_rounding", "stochastic"),
        epoch=cfg.get("rfs_epoch", "fixed")),
}
check_registry("sampler", SAMPLERS)


def build_sampler(name: str, targets: np.ndarray, cfg: dict, seed: int,
                  num_replicas: int = 1, rank: int = 0) -> EpochSampler:
    """Sampler `name` over the training rows; targets (N, C) 0/1 of those rows."""
    targets = np.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"targets must be (N, C), got shape {targets.shape}")
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{name}' (choose one of: {', '.join(SAMPLERS)})")
    return SAMPLERS[name](targets, cfg, seed, num_replicas, rank)
