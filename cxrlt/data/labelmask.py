"""Annotation masks of training targets: a NaN target is an unannotated entry (a label its dataset
does not annotate, or an `ignore`d uncertain / blank label: cxrlt/data/external.py). The one
place that counts positives and annotated images per label over annotated entries only (losses'
counts and weights, samplers, the trainer)."""

from __future__ import annotations

import numpy as np


def annotated_counts(targets) -> tuple[np.ndarray, np.ndarray | int]:
    """(positives per label, annotated images per label) of (N, C) targets, NaN = unannotated.
    The second is the plain int N when every entry is annotated."""
    y = np.asarray(targets, dtype=np.float64)
    known = ~np.isnan(y)
    positives = np.where(known, y > 0.5, False).sum(0).astype(np.float64)
    return positives, (int(len(y)) if known.all() else known.sum(0))


def has_unannotated(targets) -> bool:
    return bool(np.isnan(np.asarray(targets, dtype=np.float64)).any())
