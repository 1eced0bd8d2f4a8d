"""Epoch samplers over the training rows, identical on every DDP rank without communication.

Each sampler yields positions 0..N-1 into the training rows. The epoch's full index list is
a pure function of (seed, epoch) -- so a resumed run replays exactly the same epochs and all
ranks compute the same list -- and has length N for every sampler. With R replicas the list
is padded by wrapping around to a multiple of R and rank r takes positions r, r+R, r+2R, ...,
so the ranks' shares are disjoint, equally long, and interleave back into the padded list.

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
                 f_c = fraction of rows with label c, t = cfg rfs_threshold; r(row) = max over
                 its labels (1 for a row with no label). Each epoch every row is repeated
                 floor(r) times plus once more with probability frac(r) (seeded stochastic
                 rounding), the expanded list is shuffled and truncated to N, so the epoch length
                 stays N (and the same on every rank) while rare rows appear ~r times as often.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler

from cxrlt.core.config import check_registry
from cxrlt.data.labelmask import annotated_counts
from cxrlt.core.errors import ConfigError


class EpochSampler(Sampler[int]):
    """Base: subclasses implement `epoch_indices(rng) -> np.ndarray` of length N."""

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
        self.total_size = math.ceil(self.num_rows / self.num_replicas) * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, epoch: int) -> np.random.Generator:
        # the stream depends on (seed, epoch) only: never on rank or on earlier epochs
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))

    def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def full_indices(self, epoch: int | None = None) -> np.ndarray:
        """The whole epoch's list (length N) as every rank computes it."""
        epoch = self.epoch if epoch is None else epoch
        idx = np.asarray(self.epoch_indices(self.rng(epoch)), dtype=np.int64)
        assert idx.shape == (self.num_rows,)
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


def repeat_factors(targets: np.ndarray, threshold: float) -> np.ndarray:
    """Per-row repeat factor max(1, max over its labels of sqrt(t / f_c)); 1 for unlabelled rows."""
    pos = np.asarray(targets) > 0.5  # a NaN (unannotated) label is never a positive
    positives, annotated = annotated_counts(targets)  # f_c over the rows that annotate label c
    freq = positives / np.maximum(annotated, 1)  # 0 for an absent label, which no row carries anyway
    with np.errstate(divide="ignore"):
        r_label = np.maximum(1.0, np.sqrt(threshold / np.where(freq > 0, freq, np.inf)))
    r_row = np.where(pos, r_label[None, :], 1.0).max(axis=1, initial=1.0)
    return r_row


class RepeatFactorSampler(EpochSampler):
    def __init__(self, targets: np.ndarray, threshold: float, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(len(targets), seed, num_replicas, rank)
        if threshold < 0:
            raise ConfigError(f"rfs_threshold must be >= 0, got {threshold}")
        self.factors = repeat_factors(targets, threshold)

    def epoch_indices(self, rng):
        whole = np.floor(self.factors)
        reps = (whole + (rng.random(self.num_rows) < self.factors - whole)).astype(np.int64)
        expanded = np.repeat(np.arange(self.num_rows), reps)  # len >= N since every r >= 1
        return rng.permutation(expanded)[: self.num_rows]


# cfg sampler -> (targets, cfg, seed, num_replicas, rank) -> the sampler; its names are
# config.SAMPLER_NAMES
SAMPLERS = {
    "instance": lambda y, cfg, seed, n, r: InstanceSampler(len(y), seed, n, r),
    "class_aware": lambda y, cfg, seed, n, r: ClassAwareSampler(y, seed, n, r),
    "repeat_factor": lambda y, cfg, seed, n, r: RepeatFactorSampler(y, float(cfg["rfs_threshold"]), seed, n, r),
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
