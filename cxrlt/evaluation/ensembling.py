"""Combining the probability matrices of several models (all (N, C), rows aligned).

Methods:
- mean: the average probability.
- rank: every model's column is replaced by its normalised rank (average rank for ties, scaled
  to [0, 1]: lowest 0, highest 1), then averaged. It keeps each model's ordering of the images,
  which is all mAP and AUC look at, and removes differences in calibration/scale between models;
  the output is no longer a calibrated probability (F1 at 0.5 and ECE mean little on it).
- weighted: a weighted mean, with given weights or weights fitted on a validation fold by
  coordinate ascent on val mAP (fit_weights).
- greedy: Caruana et al. (2004) forward selection with replacement on the validation fold; the
  selection counts are the weights of a weighted mean.
Fitting uses the selection set of the val fold (cxrlt/evaluation/selection.py: the test-like proxy by
default); `cross_fitted` gives the honest number (fit on one patient half, score on the other).
With a single model every method returns that model's predictions unchanged.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from cxrlt.core import progress

from cxrlt.core.config import ENSEMBLE_METHODS
from cxrlt.evaluation.metrics import average_precision_per_label, macro_mean, score

METHODS = ENSEMBLE_METHODS


def _stack(preds) -> np.ndarray:
    """(M, N, C) array from a list of (N, C) arrays of the same shape."""
    shapes = {np.shape(p) for p in preds}
    if not preds or len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"need >= 1 prediction matrices of one (N, C) shape, got {sorted(shapes)}")
    return np.stack([np.asarray(p, dtype=np.float64) for p in preds])


def normalise_weights(weights, n_models: int) -> np.ndarray:
    """Non-negative weights summing to 1 (ValueError for a wrong count, negatives or all zero)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_models,):
        raise ValueError(f"{len(w)} weights given for {n_models} models")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w / w.sum()


def weighted_mean(preds, weights) -> np.ndarray:
    stack = _stack(preds)
    return np.tensordot(normalise_weights(weights, len(stack)), stack, axes=1)


def mean_ensemble(preds) -> np.ndarray:
    return _stack(preds).mean(0)


def rank_normalise(p) -> np.ndarray:
    """Per column: average ranks of the values, mapped linearly to [0, 1] (constant column -> 0.5)."""
    p = np.asarray(p, dtype=np.float64)
    n = p.shape[0]
    if n == 1:
        return np.full_like(p, 0.5)
    return (rankdata(p, method="average", axis=0) - 1.0) / (n - 1)


def rank_ensemble(preds) -> np.ndarray:
    stack = _stack(preds)
    if len(stack) == 1:
        return stack[0]
    return np.mean([rank_normalise(p) for p in stack], axis=0)


def _score(y, p) -> float:
    """Validation criterion: macro mAP (labels without a positive skipped); -inf if undefined."""
    m = score(y, p, auc=False)["mAP"]
    return m if np.isfinite(m) else -np.inf


def fit_weights(val_preds, y_val, grid_step: float = 0.1, max_passes: int = 10) -> np.ndarray:
    """Weights maximising val mAP of the weighted mean, by coordinate ascent on the simplex.

    Start from equal weights. A pass tries, for each model in turn, every raw weight in
    {0, step, ..., 1} for that model (others unchanged, then renormalised) and keeps the best if
    it beats the current val mAP. Stops after a pass without gain or max_passes. Cheap for any
    number of models (M * (1/step + 1) mAP evaluations per pass), deterministic, and can drop a
    model entirely (weight 0).
    """
    stack = _stack(val_preds)
    m = len(stack)
    w = np.full(m, 1.0 / m)
    if m == 1:
        return w
    best = _score(y_val, np.tensordot(w, stack, axes=1))
    grid = np.round(np.arange(0.0, 1.0 + grid_step / 2, grid_step), 10)
    for _ in progress.bar(range(max_passes), desc="fit weights", unit="pass", leave=False):
        improved = False
        for i in range(m):
            for v in grid:
                cand = w.copy()
                cand[i] = v
                if cand.sum() <= 0:
                    continue
                cand /= cand.sum()
                s = _score(y_val, np.tensordot(cand, stack, axes=1))
                if s > best + 1e-12:
                    best, w, improved = s, cand, True
        if not improved:
            break
    return w


def greedy_selection(val_preds, y_val, max_steps: int = 25) -> tuple[np.ndarray, list[dict]]:
    """Caruana et al. (2004) forward selection with replacement.

    Start from an empty ensemble; each step adds the model (repeats allowed) whose addition gives
    the best val mAP of the mean of the selected models; stop when the best addition does not
    improve on the current ensemble, or after max_steps. The first step always adds the best
    single model, so the result never scores below it on the validation fold.
    Returns (selection counts as weights summing to 1, history of {step, model, val_mAP}).
    """
    stack = _stack(val_preds)
    counts = np.zeros(len(stack), dtype=np.int64)
    total = np.zeros_like(stack[0])
    best, history = -np.inf, []
    for step in progress.bar(range(max_steps), desc="greedy selection", unit="step", leave=False):
        n = counts.sum() + 1
        scores = [_score(y_val, (total + stack[i]) / n) for i in range(len(stack))]
        i = int(np.argmax(scores))  # ties -> the earliest model
        if scores[i] <= best:
            break
        best = scores[i]
        counts[i] += 1
        total += stack[i]
        history.append({"step": step + 1, "model": i, "val_mAP": best})
    if counts.sum() == 0:  # no model has a defined val mAP: fall back to the plain mean
        counts[:] = 1
    return counts / counts.sum(), history


def fit(method: str, val_preds, y_val) -> tuple[np.ndarray | None, dict]:
    """Weights of `method` fitted on the validation predictions and labels (None for mean/rank,
    which need no fitting), and an info dict (greedy_history for greedy)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("mean", "rank"):
        return None, {}
    if val_preds is None or y_val is None:
        raise ValueError(f"--method {method} needs validation predictions and labels"
                         + (" (or --weights)" if method == "weighted" else ""))
    if method == "weighted":
        return fit_weights(val_preds, y_val), {}
    w, history = greedy_selection(val_preds, y_val)
    return w, {"greedy_history": history}


def _fit_or_given(method, val_preds, y_val, weights, n_models: int):
    if method == "weighted" and weights is not None:
        return normalise_weights(weights, n_models), {}
    return fit(method, val_preds, y_val)


def combine(method: str, test_preds, val_preds=None, y_val=None, weights=None, select=None):
    """Combine test predictions; returns (test ensemble, weights or None, info dict).

    weights (weighted only): given explicitly, else fitted on (val_preds, y_val) restricted to the
    val rows `select` (the selection set of cxrlt/evaluation/selection.py; None = all rows).
    """
    if val_preds is not None and len(val_preds) != len(test_preds):
        raise ValueError(f"{len(val_preds)} validation files for {len(test_preds)} test files")
    if val_preds is not None and select is not None:
        val_preds, y_val = [np.asarray(v)[select] for v in val_preds], np.asarray(y_val)[select]
    w, info = _fit_or_given(method, val_preds, y_val, weights, len(test_preds))
    return apply_same(method, test_preds, w), w, info


def cross_fitted(method: str, val_preds, y_val, sets: dict, weights=None) -> dict:
    """The honest val mAP of `method` (cxrlt/evaluation/selection.py): the ensemble of half B with the
    weights fitted on half A and of half A with those fitted on B, scored per label on each half;
    the gain over the equal-weight mean (on the halves basis) is added to the mean's selection-set
    mAP. {"honest", "honest_gain", "half_weights": [fitted on A, on B] (None: nothing fitted)}.
    With nothing to fit (mean, rank, given weights) it is the ensemble's selection-set mAP."""
    from cxrlt.evaluation.selection import halves_macro, honest_value

    y_val = np.asarray(y_val)
    stack = [np.asarray(v) for v in val_preds]
    a, b = sets["halves"]
    sel = sets["selection"]
    w_a, _ = _fit_or_given(method, [v[a] for v in stack], y_val[a], weights, len(stack))
    w_b, _ = _fit_or_given(method, [v[b] for v in stack], y_val[b], weights, len(stack))
    fitted = [None if w is None else w.tolist() for w in (w_a, w_b)]
    if w_a is None or (method == "weighted" and weights is not None):  # nothing was fitted
        ens = apply_same(method, [v[sel] for v in stack], w_a)
        return {"honest": macro_mean(average_precision_per_label(y_val[sel], ens)), "honest_gain": 0.0,
                "half_weights": fitted}

    def ap(rows, w=None):  # weights w fitted elsewhere; None: the equal-weight mean (the reference)
        part = [v[rows] for v in stack]
        return average_precision_per_label(y_val[rows], mean_ensemble(part) if w is None else weighted_mean(part, w))

    reference = {"halves": halves_macro(ap(a), ap(b)), "selection": macro_mean(ap(sel))}
    honest, gain = honest_value(reference, "selection", halves_macro(ap(a, w_b), ap(b, w_a)))
    return {"honest": honest, "honest_gain": gain, "half_weights": fitted}


def apply_same(method: str, preds, weights) -> np.ndarray:
    """The ensemble of `preds` with a method/weights already chosen (for scoring the val fold)."""
    if weights is not None:
        return weighted_mean(preds, weights)
    return mean_ensemble(preds) if method == "mean" else rank_ensemble(preds)
