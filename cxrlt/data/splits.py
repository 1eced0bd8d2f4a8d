"""Patient-grouped, multilabel-stratified K-fold assignment.

All images of one patient land in the same fold (no patient leaks between training and
validation), and each label's positives are spread over the folds as evenly as the groups
allow, so that even labels with a handful of positives appear in most validation folds.

Algorithm: greedy iterative stratification (after Sechidis et al., ECML 2011) applied to
groups instead of single images. Labels are visited from the rarest (fewest positive images)
to the most common; each not-yet-assigned group with positives of that label goes to the fold
that most lacks that label (desired count total/K minus what it has), ties broken by the fold
that most lacks images, then by a seeded random order of the folds. Within a label, groups are
visited by decreasing number of that label's positives (big items first packs better), equal
ones in seeded random order. Groups without any
positive are placed last, largest first, into the fold that most lacks images.

Note on the official data: PatientID is stored in Excel float form ("3.24E+38"), so distinct
patients can share an ID. Grouping on it merges them: conservative (never a leak), slightly
coarser folds. A blank group value makes that row a group of its own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def assign_folds(df: pd.DataFrame, labels: list[str], k: int = 5, seed: int = 0,
                 group_col: str = "PatientID") -> np.ndarray:
    """-> int64 array (len(df),) of fold numbers 0..k-1, aligned with df's rows.

    Deterministic for a given (rows, labels, k, seed). Groups are identified by their sorted
    values, so shuffling the rows of df does not change any row's fold (rows with a blank
    group value excepted: they are identified by position).
    """
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    n = len(df)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    group_of_row, n_groups = _group_ids(df[group_col].astype(str).to_numpy())
    y = df[list(labels)].to_numpy(dtype=np.int64)
    # per-group image count and positive counts (n_groups x C)
    sizes = np.bincount(group_of_row, minlength=n_groups).astype(np.float64)
    pos = np.zeros((n_groups, y.shape[1]), dtype=np.float64)
    np.add.at(pos, group_of_row, y)

    rng = np.random.default_rng(seed)
    fold_rank = rng.permutation(k)  # tie-break order of the folds
    group_order = rng.permutation(n_groups)  # tie-break order of equal-size groups
    need_lab = np.tile(pos.sum(axis=0) / k, (k, 1))  # (k, C) positives each fold still lacks
    need_size = np.full(k, n / k)  # images each fold still lacks
    fold_of_group = np.full(n_groups, -1, dtype=np.int64)

    def place(g: int, lab: int | None) -> None:
        # lexicographic choice: most lacking this label, then most lacking images, then fold_rank
        key_lab = need_lab[:, lab] if lab is not None else np.zeros(k)
        f = int(np.lexsort((-fold_rank, need_size, key_lab))[-1])
        fold_of_group[g] = f
        need_lab[f] -= pos[g]
        need_size[f] -= sizes[g]

    label_totals = pos.sum(axis=0)
    for lab in np.argsort(label_totals, kind="stable"):
        if label_totals[lab] == 0:
            continue
        cand = group_order[(pos[group_order, lab] > 0) & (fold_of_group[group_order] < 0)]
        cand = cand[np.argsort(-pos[cand, lab], kind="stable")]
        for g in cand:
            place(int(g), int(lab))
    rest = group_order[fold_of_group[group_order] < 0]
    for g in rest[np.argsort(-sizes[rest], kind="stable")]:
        place(int(g), None)
    return fold_of_group[group_of_row]


def _group_ids(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Group value per row -> (dense group index per row, number of groups). Blank = own group."""
    values = values.astype(object).copy()
    blank = np.array([not str(v).strip() for v in values], dtype=bool)
    # a NUL prefix cannot occur in a CSV value, so these never collide with real IDs
    values[blank] = [f"\0row{i}" for i in np.flatnonzero(blank)]
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)
    return inverse.ravel().astype(np.int64), len(uniq)
