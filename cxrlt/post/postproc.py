"""Post-processing of predicted probabilities (N images, C labels), and its choice on the val fold.

Three steps, applied in this order (each off at weight/exponent 0):

  study pooling     p <- (1 - w) p + w * mean of p over the images of the same study, among the
                    images predicted together (exact study key, cxrlt.data.cache `study`; a blank key
                    is its own study). The CXR-LT test list has one image per study, so on the
                    leaderboard pooling is a no-op; it is measured on the proxy subset (one image
                    per study) for the same reason.
  patient context   p <- (1 - w) p + w * mean training label vector of the same patient's OTHER
                    studies (exact patient key), for images that have such studies; others keep p.
                    Test patients often have earlier studies in the training data; on the val
                    fold the same patient's other studies are val images, whose labels play the
                    role of training labels (never the image's own study: that would leak its
                    labels).
  normal gating     p_k <- p_k * (1 - p_Normal)^alpha for every finding k (Normal unchanged),
                    clipped to [0, 1]. alpha > 0 damps findings on confidently normal images;
                    alpha = -1 gives p_k / (1 - p_Normal) = P(k | the image has a finding) when
                    every finding implies "not normal": the Bayes adjustment for an evaluation set
                    in which every image has a finding (the challenge's).

The grid (GATING_GRID x POOL_GRID x CONTEXT_GRID) is scored on the val subsets of
cxrlt/evaluation/selection.py and the choice is made on the selection set, with the honest (cross-fitted)
number beside it (`choose_postproc`). Each subset is post-processed on its own, as if it were the
whole prediction set, so pooling sees only the subset's images, like the test list.

`<pred_val.csv>.postproc.json` (written by predict.py --split val; its "choice" is read by
config.load_postproc for --postproc-from):
  {"choice": {normal_gating_alpha, study_pool_weight, patient_context_weight} (what is applied: the
   best grid point when its honest gain is positive, else the no-op, "kept_raw": true),
   "chosen": {full, proxy, half_a, half_b, halves}  (val mAP of the applied choice on each subset;
   halves: its halves-basis score, cxrlt/evaluation/selection.py), "best" / "best_scores": the grid
   point that won on the selection set and its scores, "raw": the same for no post-processing,
   "honest": the selection-set mAP the whole choice procedure is worth, cross-fitted (raw's mAP
   on the selection set + "honest_gain": half B scored with the choice made on half A and vice
   versa, minus raw, on the halves basis), "select_on", "sets" {subset: n images},
   "describe", "half_choices", "grid": [{the 3 parameters, full, proxy, half_a, half_b, halves}], "tta"}.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import product

import numpy as np

from cxrlt.core.labels import NORMAL_LABEL

# The no-op value comes first in every grid: ties in the choice go to "off".
GATING_GRID = (0.0, -1.0, -0.5, 0.5, 1.0, 2.0)
POOL_GRID = (0.0, 0.25, 0.5, 0.75)
CONTEXT_GRID = (0.0, 0.1, 0.2, 0.4, 0.6)
_MIN_NOT_NORMAL = 1e-6  # floor of 1 - p_Normal for negative exponents


@dataclass(frozen=True)
class PostParams:
    normal_gating_alpha: float = 0.0
    study_pool_weight: float = 0.0
    patient_context_weight: float = 0.0

    @classmethod
    def from_cfg(cls, cfg: dict) -> PostParams:
        return cls(*(float(cfg.get(k, 0.0)) for k in cls.__dataclass_fields__))

    def as_dict(self) -> dict:
        return asdict(self)


def grid(labels, allow_patient_linking: bool = False) -> list[PostParams]:
    """Every grid point (no gating exponents when there is no Normal label; patient context only
    when the user opted in to linking images to training patients, config allow_patient_linking:
    docs/rules.md); no-op first."""
    alphas = GATING_GRID if NORMAL_LABEL in labels else (0.0,)
    contexts = CONTEXT_GRID if allow_patient_linking else (0.0,)
    return [PostParams(a, w, c) for a, w, c in product(alphas, POOL_GRID, contexts)]


def normal_gating(p: np.ndarray, labels, alpha: float, normal: str = NORMAL_LABEL) -> np.ndarray:
    """p_k <- p_k * (1 - p_Normal)^alpha for findings, clipped to [0, 1]; p itself when alpha is 0
    or there is no Normal label."""
    if alpha == 0 or normal not in labels:
        return p
    j = list(labels).index(normal)
    not_normal = np.maximum(1.0 - p[:, j:j + 1], _MIN_NOT_NORMAL)
    q = np.clip(p * not_normal ** alpha, 0.0, 1.0).astype(p.dtype)
    q[:, j] = p[:, j]
    return q


def _codes(keys) -> np.ndarray:
    _, codes = np.unique(np.asarray(keys, dtype=str), return_inverse=True)
    return codes.ravel()


def group_mean(p: np.ndarray, keys) -> np.ndarray:
    """(N, C): each row replaced by the mean of the rows with the same key."""
    codes = _codes(keys)
    sums = np.zeros((codes.max(initial=-1) + 1, p.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, p)
    return sums[codes] / np.bincount(codes)[codes, None]


def study_pool(p: np.ndarray, study_keys, weight: float) -> np.ndarray:
    """Blend each image's probabilities with the mean over its study (exact study key)."""
    if weight == 0:
        return p
    return ((1.0 - weight) * p + weight * group_mean(p, study_keys)).astype(p.dtype)


@dataclass
class Context:
    """Labelled images the patient context is taken from: keys and (M, C) labels."""

    patient: np.ndarray
    study: np.ndarray
    y: np.ndarray

    @classmethod
    def from_cache(cls, cache, csv_patient: bool = False) -> Context:
        """Every labelled (split == train) image of a cache, all folds. csv_patient: keyed by the
        training CSV's own PatientID instead of the exact patient key, for test images (whose
        patient is the test list's PatientID: META_CSV never re-identifies a test image)."""
        from cxrlt.evaluation.selection import make_keys, val_keys

        rows = cache.rows("train")
        keys = val_keys(cache, rows)
        patient = keys.patient
        if csv_patient:
            patient = make_keys(keys.ids, keys.y, patient=cache.csv_patients(rows)).patient
        return cls(patient, keys.study, np.nan_to_num(np.asarray(keys.y, dtype=np.float64)))

    def mean_labels(self, patient_keys, study_keys) -> tuple[np.ndarray, np.ndarray]:
        """(N, C) mean label vector of each image's patient's images in OTHER studies, and (N,)
        whether it has any (rows without context are 0)."""
        pool_p, query_p = np.asarray(self.patient, dtype=str), np.asarray(patient_keys, dtype=str)
        pool_s = np.char.add(np.char.add(pool_p, "\x1f"), np.asarray(self.study, dtype=str))
        query_s = np.char.add(np.char.add(query_p, "\x1f"), np.asarray(study_keys, dtype=str))
        sum_p, n_p = _sums_by_key(pool_p, self.y, query_p)
        sum_s, n_s = _sums_by_key(pool_s, self.y, query_s)
        n = n_p - n_s  # the patient's labelled images outside this study
        has = n > 0
        return np.where(has[:, None], (sum_p - sum_s) / np.maximum(n, 1)[:, None], 0.0), has


def _sums_by_key(pool_keys, y, query_keys) -> tuple[np.ndarray, np.ndarray]:
    """For each query key: the sum of y over the pool rows with that key, and their count."""
    keys, codes = np.unique(np.concatenate([pool_keys, query_keys]), return_inverse=True)
    pool, query = codes[:len(pool_keys)], codes[len(pool_keys):]
    sums = np.zeros((len(keys), y.shape[1]), dtype=np.float64)
    np.add.at(sums, pool, y)
    return sums[query], np.bincount(pool, minlength=len(keys))[query]


def patient_context(p: np.ndarray, context_mean: np.ndarray, has_context: np.ndarray, weight: float) -> np.ndarray:
    """Blend the probabilities of images with context with their context's mean labels."""
    if weight == 0 or not has_context.any():
        return p
    q = p.copy()
    q[has_context] = (1.0 - weight) * p[has_context] + weight * context_mean[has_context]
    return q.astype(p.dtype)


def postprocess(p: np.ndarray, labels, study_keys, context_mean, has_context, params: PostParams) -> np.ndarray:
    """The three steps in order (study pooling, patient context, normal gating)."""
    q = study_pool(p, study_keys, params.study_pool_weight)
    q = patient_context(q, context_mean, has_context, params.patient_context_weight)
    return normal_gating(q, labels, params.normal_gating_alpha)


def context_of(context: Context | None, keys, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(context mean labels, has context) of the images of keys; none at all without a Context."""
    if context is None:
        return np.zeros((len(keys.ids), n_labels), dtype=np.float64), np.zeros(len(keys.ids), bool)
    return context.mean_labels(keys.patient, keys.study)


def apply(p: np.ndarray, keys, labels, context: Context | None, params: PostParams) -> np.ndarray:
    """postprocess() of the predictions of the images of keys (ValKeys; keys.y is not used)."""
    return postprocess(p, labels, keys.study, *context_of(context, keys, p.shape[1]), params)


def choose_postproc(p: np.ndarray, keys, labels, context: Context | None, sets: dict,
                    allow_patient_linking: bool = False) -> dict:
    """Score the grid on every val subset and choose on the selection set (see the docstring).

    p: (N, C) val probabilities; keys: ValKeys of the same rows (y = labels); sets: val_sets().
    Patient context is in the grid only with allow_patient_linking (docs/rules.md)."""
    from cxrlt.evaluation.selection import cross_fit, honest_gain_interval, public_row

    if not allow_patient_linking:
        context = None
    ctx_mean, has_ctx = context_of(context, keys, p.shape[1])
    points = grid(labels, allow_patient_linking)
    if not has_ctx.any():  # nothing to blend with: the context weights would all tie
        points = [g for g in points if g.patient_context_weight == 0]

    def predict(i, idx):
        return postprocess(p[idx], labels, keys.study[idx], ctx_mean[idx], has_ctx[idx], points[i])

    sel = cross_fit(len(points), predict, keys.y, sets)
    interval = honest_gain_interval(sel, predict, keys.y, sets, keys.study)
    table = [{**g.as_dict(), **public_row(row)} for g, row in zip(points, sel["table"])]
    # the best grid point is applied only when the honest (cross-fitted) estimate says the choice
    # procedure gains: a choice that wins on the selection set by chance would cost on the test list
    kept_raw = sel["choice"] != 0 and not sel["honest_gain"] > 0
    applied = 0 if kept_raw else sel["choice"]
    return {"choice": points[applied].as_dict(), "chosen": _scores(table[applied]),
            "best": points[sel["choice"]].as_dict(), "best_scores": _scores(table[sel["choice"]]),
            "kept_raw": kept_raw,
            "raw": _scores(table[0]), "honest": sel["honest"], "honest_gain": sel["honest_gain"],
            "honest_gain_interval": interval, "allow_patient_linking": bool(allow_patient_linking),
            "select_on": sets["select_on"], "describe": sets["describe"],
            "sets": {"full": len(sets["full"]), "proxy": len(sets["proxy"]), "half_a": len(sets["halves"][0]),
                     "half_b": len(sets["halves"][1])},
            "half_choices": [points[i].as_dict() for i in sel["half_choices"]],
            "n_with_context": int(has_ctx.sum()), "grid": table}


def _scores(row: dict) -> dict:
    return {k: row[k] for k in ("full", "proxy", "half_a", "half_b", "halves")}


def summary_line(res: dict, applied: bool = True) -> str:
    """One line: raw vs chosen on full / proxy, the honest numbers with the honest gain's interval,
    and what is applied: the choice (applied, POSTPROC=auto, when its honest gain is positive), the
    raw predictions (a gain that is not positive), or nothing (applied=False: reported only)."""
    c, r = res["best_scores"], res["raw"]
    ch = res["best"]
    ch = (f"gating alpha {ch['normal_gating_alpha']:g}, study pooling {ch['study_pool_weight']:g}, "
          f"patient context {ch['patient_context_weight']:g}")
    line = (f"post-processing chosen on {res['select_on']}: {ch} | val mAP full {r['full']:.4f} -> {c['full']:.4f}, "
            f"proxy {r['proxy']:.4f} -> {c['proxy']:.4f}, honest (cross-fitted on {res['select_on']}) "
            f"{r[res['select_on']]:.4f} -> {res['honest']:.4f}")
    iv = res.get("honest_gain_interval")
    gain = f"honest gain {res['honest_gain']:+.4f}"
    if iv:
        gain += f" [{iv['low']:+.4f}, {iv['high']:+.4f}] ({iv['level']:.0%} bootstrap over studies)"
    if not applied:
        return line + f" | {gain} | not applied (POSTPROC=off: reported only)"
    if res["kept_raw"]:
        return line + f" | {gain} is not positive: not applied, the raw predictions are kept (no post-processing)"
    if res["choice"] == PostParams().as_dict():
        return line + f" | {gain} | nothing to apply (the best choice is no post-processing)"
    return line + f" | {gain} is positive: applied"
