"""Multi-label metrics on (N images, C labels) arrays: y in {0, 1}, p probabilities in [0, 1].

Conventions shared by every function here:
- A label with no positive among the N images has no defined AP, recall or F1: its per-label
  value is NaN and the macro means skip it (the callers list the skipped labels).
- AUC additionally needs at least one negative; labels with a single class are NaN/skipped.
- Predicted positive means p >= threshold (so ties at the threshold count as positive, the same
  rule sklearn's precision_recall_curve uses).
- AP equals sklearn's average_precision_score (step-wise area under the PR curve, no interpolation);
  tied scores form one operating point, so AP does not depend on the order of tied rows.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score

# Long-tail groups by the fraction of training images that carry the label. On the CXR-LT 2026
# profile (142,928 training images, max/min ratio ~1000:1) this gives 6 head, 17 medium and
# 7 tail labels: head >= 5% (>= ~7,150 images), tail < 0.5% (< ~715 images).
HEAD_MIN_FRACTION = 0.05
TAIL_MAX_FRACTION = 0.005
GROUPS = ("head", "medium", "tail")


def _check_arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim == 1:
        y, p = y[:, None], p.reshape(-1, 1)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} must both be (N, C)")
    return (y > 0.5).astype(np.int8), p


def _annotated(y) -> np.ndarray | None:
    """(N, C) bool: the entries with a label (a NaN label is unannotated: a masked label of a
    multi-dataset cache); None when every entry is annotated."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.floating):
        return None
    known = ~np.isnan(y)
    if known.all():
        return None
    return known if known.ndim == 2 else known[:, None]


def _per_label(y, p, fn, need_negative: bool) -> np.ndarray:
    """Apply fn(y_c, p_c) to every label that has a positive (and a negative if asked), else NaN;
    on its annotated rows only."""
    known = _annotated(y)
    y, p = _check_arrays(y, p)
    out = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        y_c, p_c = (y[:, c], p[:, c]) if known is None else (y[known[:, c], c], p[known[:, c], c])
        pos = int(y_c.sum())
        if pos == 0 or (need_negative and pos == len(y_c)):
            continue
        out[c] = fn(y_c, p_c)
    return out


def average_precision_per_label(y, p) -> np.ndarray:
    """(C,) AP per label; NaN for labels with no positive (weighted_ap with unit weights: equal to
    sklearn's average_precision_score, without its per-call overhead)."""
    return resampled_ap(y, p, np.ones((1, len(np.asarray(y))), np.int32))[0]


def auc_per_label(y, p) -> np.ndarray:
    """(C,) ROC AUC per label; NaN for labels with only one class."""
    return _per_label(y, p, roc_auc_score, need_negative=True)


def _nanmean_skipped(values: np.ndarray, labels=None) -> tuple[float, list]:
    """Mean over the finite entries and the skipped ones (names if labels given, else indices)."""
    skipped_idx = [int(i) for i in np.flatnonzero(np.isnan(values))]
    skipped = [labels[i] for i in skipped_idx] if labels is not None else skipped_idx
    kept = values[~np.isnan(values)]
    return (float(kept.mean()) if len(kept) else float("nan")), skipped


def macro_mean(per_label) -> float:
    """Mean of the defined (non-NaN) per-label values; NaN if none (how every macro mean here skips)."""
    return _nanmean_skipped(np.asarray(per_label, dtype=np.float64))[0]


def score(y, p, labels=None, auc: bool = True) -> dict:
    """THE macro mAP of the package (training, cRT, predict, ensembling, evaluation all use it).

    -> {"mAP": mean AP over the labels with >= 1 positive (NaN if none),
        "mAUC": mean ROC AUC over the labels with both classes (NaN if none, or auc=False),
        "ap": (C,) AP per label (NaN where undefined),
        "skipped": the labels without a positive (names if `labels` given, else indices)}.
    auc=False skips the AUC (inner loops that only rank by mAP, e.g. greedy ensembling).
    """
    ap = average_precision_per_label(y, p)
    m_ap, skipped = _nanmean_skipped(ap, labels)
    m_auc = macro_auc(y, p)[0] if auc else float("nan")
    return {"mAP": m_ap, "mAUC": m_auc, "ap": ap, "skipped": skipped}


def macro_map(y, p, labels=None) -> tuple[float, list]:
    """(macro mAP, skipped labels) of `score` (for callers that report the skipped names)."""
    return (s := score(y, p, labels, auc=False))["mAP"], s["skipped"]


def macro_auc(y, p, labels=None) -> tuple[float, list]:
    """Macro mean ROC AUC over labels with both classes, and the skipped labels."""
    return _nanmean_skipped(auc_per_label(y, p), labels)


def f1_per_label(y, p, thr=0.5) -> np.ndarray:
    """(C,) F1 of the decision p >= thr (thr: scalar or (C,)); NaN for labels with no positive."""
    y, p = _check_arrays(y, p)
    thr = np.broadcast_to(np.asarray(thr, dtype=np.float64), (y.shape[1],))
    pred = p >= thr[None, :]
    tp = (pred & (y == 1)).sum(0)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (#predicted + #positive); no 0/0 once #positive > 0.
    denom = pred.sum(0) + y.sum(0)
    return np.where(y.sum(0) > 0, 2.0 * tp / np.maximum(denom, 1), np.nan)


def f1_at(y, p, thr=0.5) -> float:
    """Macro F1 at threshold(s) thr, over the labels with >= 1 positive (like macro_map)."""
    return _nanmean_skipped(f1_per_label(y, p, thr))[0]


def best_f1_threshold(y_c, p_c, default: float = 0.5) -> float:
    """Threshold maximising the F1 of p_c >= thr for one label (default if it has no positive).

    Candidates are the distinct scores. The chosen one is moved halfway down to the next lower
    distinct score: the decisions on these images are unchanged, but the margin makes the
    threshold less brittle on new images whose scores land just below a tuned score.
    """
    y_c = np.asarray(y_c) > 0.5
    p_c = np.asarray(p_c, dtype=np.float64)
    if not y_c.any():
        return default
    precision, recall, thresholds = precision_recall_curve(y_c, p_c)
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = thresholds[int(np.argmax(f1))]
    lower = p_c[p_c < best]
    return float((best + lower.max()) / 2) if len(lower) else float(best)


def tune_thresholds(y, p, default: float = 0.5) -> np.ndarray:
    """(C,) per-label thresholds maximising F1 on (y, p); `default` for labels with no positive."""
    y, p = _check_arrays(y, p)
    return np.array([best_f1_threshold(y[:, c], p[:, c], default) for c in range(y.shape[1])])


def expected_calibration_error(y, p, n_bins: int = 15) -> float:
    """ECE over all N*C (image, label) probabilities pooled together.

    Equal-width bins on [0, 1]: bin b holds p in [b/n, (b+1)/n), the last bin also holds 1.0.
    ECE = sum over bins of (n_b / N*C) * |mean(y in b) - mean(p in b)|.
    """
    y, p = _check_arrays(y, p)
    y, p = y.ravel().astype(np.float64), p.ravel()
    if len(p) == 0:
        return float("nan")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    sum_y = np.bincount(bins, weights=y, minlength=n_bins)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    # |sum_y - sum_p| / N equals (n_b/N) * |mean y - mean p| and is 0 for empty bins.
    return float(np.abs(sum_y - sum_p).sum() / len(p))


def frequency_groups(
    train_counts,
    n_train_images: int,
    head_min: float = HEAD_MIN_FRACTION,
    tail_max: float = TAIL_MAX_FRACTION,
) -> list[str]:
    """Group of each label by its training frequency f = count / n_train_images.

    head: f >= head_min (5%); tail: f < tail_max (0.5%); medium: in between. Fractions rather
    than counts keep the grouping the same on a subsample or a small demo set.
    """
    if n_train_images <= 0:
        raise ValueError("n_train_images must be positive")
    if not 0 < tail_max <= head_min:
        raise ValueError("need 0 < tail_max <= head_min")
    frac = np.asarray(train_counts, dtype=np.float64) / n_train_images
    return ["head" if f >= head_min else "tail" if f < tail_max else "medium" for f in frac]


def group_map(per_label_ap, groups) -> dict[str, float]:
    """Mean AP of each group over its labels with a defined AP (NaN for an empty group)."""
    means = _summaries(np.asarray(per_label_ap, dtype=np.float64)[None, :], groups)
    return {g: float(means[g][0]) for g in GROUPS}


# ---- bootstrap intervals ------------------------------------------------------------------------------
# A resample re-weights the evaluation's STUDIES (images of one study share their labels and look
# alike, so they are not independent draws; resampling images would make the interval too narrow).
# It is the Bayesian bootstrap (Rubin 1981): each study gets an Exp(1) weight, the continuous
# analogue of drawing the studies with replacement, with the same coverage on common labels. Unlike
# integer draws it never leaves a study out, so a label with 1-2 positives never drops out of a
# resample (which pushed the macro mean, and the interval, above the estimate), and no image is
# duplicated into a tie with itself (which raised a rare label's AP). AP under weights is sklearn's
# sample_weight AP; each label is sorted ONCE and every resample is a weighted cumulative sum over
# that order, vectorised over resamples.
N_BOOT = 1000
BOOT_SEED = 0
_CHUNK_ELEMENTS = 4_000_000  # resamples x images per chunk: bounds memory on a large val fold


def group_codes(groups) -> np.ndarray:
    """(N,) int codes 0..G-1 of the distinct group keys (compared as strings)."""
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return codes.ravel()


def resample_weights(groups, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """(n_boot, N) float weights: an Exp(1) weight per distinct group (study) and resample, given
    to every image of the group."""
    codes = group_codes(groups)
    g = int(codes.max()) + 1 if len(codes) else 1
    weights = np.random.default_rng(seed).exponential(size=(n_boot, g)).astype(np.float32)
    return weights[:, codes]  # float32: 1000 resamples of a 28k-image val fold take 112 MB


def weighted_ap(y_c, p_c, w) -> np.ndarray:
    """(B,) AP of one label under each row of weights w (B, N); NaN where the weighted positives are 0.

    Equals sklearn's average_precision_score(y_c, p_c, sample_weight=w[b]) (tied scores form one
    operating point: only the last row of a tie run in the sorted order is a threshold)."""
    y_c = np.asarray(y_c) > 0.5
    p_c = np.asarray(p_c, dtype=np.float64)
    order = np.argsort(-p_c, kind="stable")
    ps, ys = p_c[order], y_c[order]
    ends = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True])
    w = np.asarray(w)[:, order].astype(np.float64)
    tp = np.cumsum(w * ys, axis=1)[:, ends]
    seen = np.cumsum(w, axis=1)[:, ends]
    pos = tp[:, -1] if len(ends) else np.zeros(len(w))
    gain = np.diff(tp, axis=1, prepend=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / seen, 0.0)
        return np.where(pos > 0, (gain * precision).sum(1) / pos, np.nan)


def resampled_ap(y, p, weights) -> np.ndarray:
    """(B, C) per-label AP of (y, p) under each resample's weights (NaN: no positive drawn).
    A NaN label (unannotated) weighs 0: each label is scored on its annotated rows."""
    known = _annotated(y)
    y, p = _check_arrays(y, p)
    weights = np.asarray(weights)
    b, n = weights.shape
    out = np.full((b, y.shape[1]), np.nan)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for c in range(y.shape[1]):
        if not y[:, c].any():
            continue
        for s in range(0, b, step):
            w = weights[s:s + step] if known is None else weights[s:s + step] * known[:, c]
            out[s:s + step, c] = weighted_ap(y[:, c], p[:, c], w)
    return out


def _summaries(ap: np.ndarray, label_groups) -> dict[str, np.ndarray]:
    """Macro mAP and the mean AP of each label group, per row of ap (B, C), over the labels with a
    defined AP."""
    def mean(cols):
        ok = ~np.isnan(ap) & cols[None, :]
        n = ok.sum(1)
        return np.where(n > 0, np.where(ok, ap, 0.0).sum(1) / np.maximum(n, 1), np.nan)

    out = {"mAP": mean(np.ones(ap.shape[1], bool))}
    if label_groups is not None:
        lg = np.asarray(label_groups)
        for g in GROUPS:
            out[g] = mean(lg == g)
    return out


def _units(groups, n: int) -> tuple[str, np.ndarray]:
    """("studies", groups) or, with no groups, ("images", one group per image)."""
    if groups is None:
        return "images", np.arange(n)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group keys for {n} images")
    return "studies", np.asarray(groups)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` percentile interval of the resampled values (NaN if none is defined)."""
    v = values[np.isfinite(values)]
    if not len(v):
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def bootstrap_map(y, p, groups=None, label_groups=None, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                  level: float = 0.95) -> dict:
    """Bootstrap (percentile) 95% interval of macro mAP, and of head/medium/tail mAP with
    label_groups.

    groups: (N,) study key per image (resampled together); None resamples images.
    Returns {name: {"value", "low", "high"}} for mAP (+ each group) and "n_boot", "seed", "level",
    "unit" ("studies" | "images"), "n_units". value is the statistic on the data as given.
    """
    y, p = _check_arrays(y, p)
    unit, groups = _units(groups, len(y))
    w = resample_weights(groups, n_boot, seed)
    point = _summaries(average_precision_per_label(y, p)[None, :], label_groups)
    boot = _summaries(resampled_ap(y, p, w), label_groups)
    out = {k: {"value": float(point[k][0]), **dict(zip(("low", "high"), _interval(boot[k], level)))}
           for k in boot}
    out.update(n_boot=n_boot, seed=seed, level=level, unit=unit, n_units=int(group_codes(groups).max(initial=-1)) + 1)
    return out


def paired_bootstrap(y, p_a, p_b, groups=None, label_groups=None, n_boot: int = N_BOOT,
                     seed: int = BOOT_SEED, level: float = 0.95) -> dict:
    """Paired bootstrap of mAP(p_a) - mAP(p_b) on the same images: both are scored on the same
    resamples, so the interval is that of the difference (much narrower than the two intervals
    suggest when the predictions are correlated). Per statistic: {"diff", "low", "high",
    "frac_positive"} (frac_positive: share of resamples where a beats b), plus n_boot/seed/level/unit."""
    y, p_a = _check_arrays(y, p_a)
    _, p_b = _check_arrays(y, p_b)
    if p_a.shape != p_b.shape:
        raise ValueError(f"prediction sets differ in shape: {p_a.shape} vs {p_b.shape}")
    unit, groups = _units(groups, len(y))
    w = resample_weights(groups, n_boot, seed)
    point = _summaries((average_precision_per_label(y, p_a) - average_precision_per_label(y, p_b))[None, :],
                       label_groups)
    diffs = _summaries(resampled_ap(y, p_a, w) - resampled_ap(y, p_b, w), label_groups)  # same resamples
    out = {}
    for k in diffs:
        lo, hi = _interval(diffs[k], level)
        fin = diffs[k][np.isfinite(diffs[k])]
        out[k] = {"diff": float(point[k][0]), "low": lo, "high": hi,
                  "frac_positive": float((fin > 0).mean()) if len(fin) else float("nan")}
    out.update(n_boot=n_boot, seed=seed, level=level, unit=unit)
    return out


# ---- per centre ---------------------------------------------------------------------------------------
# CXR-LT 2026's test list mixes centres (PadChest, NIH): the overall mAP can hide a centre the model
# fails on. Each centre's images are scored apart (the mAP of its rows alone, labels without a
# positive there skipped, as macro_map does) with its own bootstrap interval; a centre with fewer
# images or positive image-label pairs than below is reported as too few, not as a number (an mAP
# over a handful of images is noise, and its interval would look deceptively tight).
CENTRE_MIN_IMAGES = 10
CENTRE_MIN_POSITIVES = 5


def centre_too_few(y) -> str:
    """Why a centre's labels (n, C) are too few to score ('' when they are not)."""
    y = np.asarray(y)
    n_pos = int((np.nan_to_num(y.astype(np.float64)) > 0.5).sum())
    if len(y) >= CENTRE_MIN_IMAGES and n_pos >= CENTRE_MIN_POSITIVES:
        return ""
    return (f"too few to score ({len(y)} images, {n_pos} positives; needs >= {CENTRE_MIN_IMAGES} images "
            f"and >= {CENTRE_MIN_POSITIVES} positives)")


def per_centre_map(y, p, centres, groups=None, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                   level: float = 0.95) -> dict:
    """{centre: {"n_images", "n_positives", "scored", and "mAP", "low", "high", "unit", "n_units"
    when scored, else "why"}}, centres in sorted order. centres: (N,) centre name per image
    (cxrlt.data.identity.centre); groups: (N,) study keys (the bootstrap units) or None."""
    raw = np.asarray(y)  # kept as given: a NaN label (unannotated) stays masked in the bootstrap
    y, p = _check_arrays(y, p)
    raw = raw.reshape(y.shape)
    centres = np.asarray(centres).astype(str)
    if len(centres) != len(y):
        raise ValueError(f"{len(centres)} centres for {len(y)} images")
    out = {}
    for name in sorted(set(centres.tolist())):
        idx = np.flatnonzero(centres == name)
        n_pos = int(y[idx].sum())
        entry = {"n_images": int(len(idx)), "n_positives": n_pos}
        why = centre_too_few(y[idx])
        if why:
            entry.update(scored=False, why=why)
        else:
            g = None if groups is None else np.asarray(groups)[idx]
            b = bootstrap_map(raw[idx], p[idx], g, n_boot=n_boot, seed=seed, level=level)
            entry.update(scored=True, unit=b["unit"], n_units=b["n_units"], **b["mAP"])
            entry["mAP"] = entry.pop("value")
        out[name] = entry
    return out
