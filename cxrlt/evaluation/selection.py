"""Validation subsets that look like the leaderboard, and honest (cross-fitted) selection.

The Task-1 evaluation images are frontal (PA/AP), one image per study, each with at least one
finding; a val fold holds PA + lateral pairs of every study, and normal images. Choices made on
the val fold (best epoch, cRT head, post-processing, ensemble weights) are therefore made on a
test-like subset, and the number reported for a choice is never measured on the images it was
chosen on.

Subsets of the val rows (`val_sets`; indices into the rows given):
  full       every val row.
  proxy      the test-like subset: frontal images only (when the projection is known), at most
             one image per study (a seeded, order-independent choice: the image whose
             hash(seed, ImageID) is smallest), and with `proxy_require_finding` only images with
             a positive label other than Normal.
  selection  the subset choices are made on: config `select_on` = proxy | full | auto (auto =
             proxy when the projection is known, else full). An empty proxy falls back to full.
  halves     two patient-disjoint halves (A, B) of the selection set: patients in
             hash(seed, patient key) order, each to the half with fewer images so far.

Honest number (`choose`): choose on A and score B with that choice, choose on B and score A.
Per label, the two out-of-half APs are averaged (one if a half has no positive of the label),
then macro over labels: the "halves basis" (each candidate's own score on it is its "halves"
value). The halves basis sits above the selection-set mAP when labels have few positives (a
label found in one half only is scored against half the negatives), so the gain is measured on
it and reported on the selection set's scale:
    honest = reference[select_on] + (cross-fitted halves value - reference["halves"])
with the reference = the no-choice default (candidate 0: no post-processing, equal ensemble
weights). The final choice is made on the whole selection set: its score there is optimistic,
`honest` is the number to quote beside full and proxy. (Scoring the two halves' predictions
together as one set instead would mix two differently calibrated choices in one ranking.)

API for the stages (all indices are positions in the `rows` they were built from):
    keys = val_keys(cache, rows)                       # ids, study, patient, frontal, y
    sets = val_sets(cache, rows, cfg)                  # or val_sets_from_keys(keys, labels, cfg)
    sel = cross_fit(n, predict, keys.y, sets)          # predict(i, idx) -> (len(idx), C) probabilities
    sel["choice"], sel["honest"], sel["half_choices"],
    sel["table"][i]["full" | "proxy" | "half_a" | "half_b" | "halves"]
  or, for a stage that scores candidates one at a time (the trainer's epochs, cRT's heads):
    table.append(score_row(keys.y, sets, lambda idx: probs[idx]))   # probs: (len(rows), C)
    sel = choose(table, sets["select_on"])             # best so far, half choices, honest
  public_row(row) drops the per-label arrays before a row goes into a JSON file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cxrlt.core.config import SELECTION_KEYS
from cxrlt.core.labels import NORMAL_LABEL
from cxrlt.data.identity import centre as centre_of

SELECT_ON = ("auto", "proxy", "full")
SPLIT_SEED = 0  # fixed: every stage must see the same proxy and halves, whatever the training seed
SUBSETS = ("full", "proxy", "half_a", "half_b")


@dataclass
class ValKeys:
    """Per-row keys of a set of labelled images (arrays aligned with the rows)."""

    ids: np.ndarray  # str ImageID
    study: np.ndarray  # str exact study key (never blank: a blank key becomes the ImageID)
    patient: np.ndarray  # str patient key (never blank)
    frontal: np.ndarray | None  # bool, None when the projection is unknown
    y: np.ndarray  # (N, C) labels
    centre: np.ndarray | None = None  # str centre (cxrlt.data.identity.centre); make_keys always fills it


def make_keys(ids, y, study=None, patient=None, frontal=None, centre=None) -> ValKeys:
    """ValKeys with blank or missing study/patient keys replaced by the ImageID (own group), and
    missing centres taken from the ImageIDs' shape (cxrlt.data.identity.centre)."""
    ids = np.asarray(ids, dtype=str)

    def fill(keys):
        if keys is None:
            return ids.copy()
        keys = np.asarray(keys, dtype=str)
        return np.where(np.char.strip(keys) == "", ids, keys)

    centres = (np.array([centre_of(i) for i in ids], dtype=object) if centre is None
               else np.asarray(centre, dtype=object))
    return ValKeys(ids, fill(study), fill(patient), None if frontal is None else np.asarray(frontal, bool),
                   np.asarray(y), centres)


def val_keys(cache, rows) -> ValKeys:
    """The keys of cache rows, through the Cache API."""
    return make_keys(cache.ids(rows), cache.targets(rows), cache.study_keys(rows), cache.patient_keys(rows),
                     cache.frontal(rows) if cache.has_projection else None, cache.centres(rows))


def rows_of_ids(cache, ids) -> np.ndarray:
    """Cache rows of the given ImageIDs (KeyError naming the first one the cache lacks)."""
    rows = cache.rows()
    where = dict(zip(cache.ids(rows), rows))
    missing = [i for i in ids if i not in where]
    if missing:
        raise KeyError(f"{len(missing)} ImageID(s) not in the cache, e.g. {missing[0]}")
    return np.array([where[i] for i in ids], dtype=np.int64)


def keys_from_index(index_path, ids, y) -> tuple[ValKeys | None, str]:
    """Keys of the images `ids` (labels y, aligned) from the cache whose index.csv is index_path,
    if that cache opens and holds every image; else (None, why not). For the stages that get a
    cache only as a label file (evaluate.py --labels, ensemble.py --val-labels)."""
    from pathlib import Path

    from cxrlt.data.cache import open_cache
    from cxrlt.core.errors import InputError

    if not index_path:
        return None, "no cache index given"
    try:
        cache = open_cache(Path(index_path).parent)
        rows = rows_of_ids(cache, ids)
    except (InputError, KeyError) as e:
        return None, f"{index_path}: {e}"
    frontal = cache.frontal(rows) if cache.has_projection else None
    return (make_keys(ids, y, cache.study_keys(rows), cache.patient_keys(rows), frontal, cache.centres(rows)),
            f"cache of {index_path}")


def _hash(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def has_finding(y, labels) -> np.ndarray:
    """(N,) True where an image has a positive label other than Normal."""
    y = np.asarray(y) > 0.5
    keep = [j for j, x in enumerate(labels) if x != NORMAL_LABEL]
    return y[:, keep].any(1)


def proxy_subset(keys: ValKeys, labels, require_finding: bool = False, seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of the test-like subset (see the module docstring)."""
    ok = np.ones(len(keys.ids), bool) if keys.frontal is None else keys.frontal.copy()
    if require_finding:
        ok &= has_finding(keys.y, labels)
    best: dict[str, tuple[int, int]] = {}
    for i in np.flatnonzero(ok):
        h = (_hash(seed, keys.ids[i]), i)
        if keys.study[i] not in best or h < best[keys.study[i]]:
            best[keys.study[i]] = h
    return np.array(sorted(i for _, i in best.values()), dtype=np.int64)


def patient_halves(keys: ValKeys, idx, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Two patient-disjoint halves of idx with image counts as equal as the patients allow."""
    idx = np.asarray(idx, dtype=np.int64)
    by_patient: dict[str, list[int]] = {}
    for i in idx:
        by_patient.setdefault(keys.patient[i], []).append(int(i))
    halves: tuple[list[int], list[int]] = ([], [])
    for p in sorted(by_patient, key=lambda k: _hash(seed, k)):
        halves[len(halves[1]) < len(halves[0])].extend(by_patient[p])
    return np.array(sorted(halves[0]), dtype=np.int64), np.array(sorted(halves[1]), dtype=np.int64)


def resolve_select_on(select_on: str, has_projection: bool) -> str:
    if select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
    return ("proxy" if has_projection else "full") if select_on == "auto" else select_on


def val_sets_from_keys(keys: ValKeys, labels, cfg: dict, seed: int = SPLIT_SEED) -> dict:
    """{"full", "proxy", "selection", "halves": (A, B)} index arrays, "select_on" ("proxy"|"full"),
    "has_projection" and a one-line "describe" of the sizes."""
    full = np.arange(len(keys.ids), dtype=np.int64)
    proxy = proxy_subset(keys, labels, cfg.get("proxy_require_finding", False), seed)
    select_on = resolve_select_on(cfg.get("select_on", "auto"), keys.frontal is not None)
    if select_on == "proxy" and not len(proxy):
        select_on = "full"  # nothing test-like to select on
    selection = proxy if select_on == "proxy" else full
    halves = patient_halves(keys, selection, seed)
    describe = (f"val {len(full)} images, proxy {len(proxy)} ({'frontal, ' if keys.frontal is not None else ''}"
                f"one per study{', with a finding' if cfg.get('proxy_require_finding') else ''}); "
                f"selection on {select_on}, halves {len(halves[0])}/{len(halves[1])} images")
    return {"full": full, "proxy": proxy, "selection": selection, "halves": halves, "select_on": select_on,
            "has_projection": keys.frontal is not None, "describe": describe}


def val_sets(cache, rows, cfg: dict, seed: int = SPLIT_SEED) -> dict:
    """val_sets_from_keys on the keys of cache rows (indices are positions in rows)."""
    return val_sets_from_keys(val_keys(cache, rows), cache.labels, cfg, seed)


# ---- honest selection ------------------------------------------------------------------------------
def _argmax(values) -> int:
    """Index of the largest value; NaN counts as -inf; ties -> the first (list the default first)."""
    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isnan(v), -np.inf, v)
    return int(np.argmax(v))


def _ap(y, p) -> np.ndarray:
    from cxrlt.evaluation.metrics import average_precision_per_label

    return average_precision_per_label(y, p)


def _macro(per_label) -> float:
    from cxrlt.evaluation.metrics import macro_mean

    return macro_mean(per_label)


def halves_macro(per_label_a, per_label_b) -> float:
    """Macro mean over labels of the mean of a label's two half values (one half if the other has
    no positive of it): the halves basis every honest number is on."""
    pair = np.array([per_label_a, per_label_b], dtype=np.float64)
    n = (~np.isnan(pair)).sum(0)
    return _macro(np.where(n > 0, np.nansum(pair, 0) / np.maximum(n, 1), np.nan))


def subsets_of(sets: dict) -> dict[str, np.ndarray]:
    """{"full", "proxy", "half_a", "half_b"} index arrays of a val_sets() result."""
    return {"full": sets["full"], "proxy": sets["proxy"], "half_a": sets["halves"][0], "half_b": sets["halves"][1]}


def score_row(y, sets: dict, predict, per_label=_ap) -> dict:
    """One candidate's row of a score table: macro mAP on full, proxy, half_a, half_b, "halves" (its
    halves-basis score: what `honest` is compared with), and its per-label values on each half
    ("ap_half_a", "ap_half_b"; what choose() needs for the honest number).

    predict(idx) -> (len(idx), C) predictions for the val rows idx, made as if those rows were the
    whole prediction set (what post-processing that pools rows needs)."""
    y = np.asarray(y)
    per = {s: per_label(y[idx], predict(idx)) if len(idx) else np.full(y.shape[1], np.nan)
           for s, idx in subsets_of(sets).items()}
    row = {s: _macro(v) for s, v in per.items()}
    row.update(halves=halves_macro(per["half_a"], per["half_b"]), ap_half_a=per["half_a"], ap_half_b=per["half_b"])
    return row


def honest_value(reference: dict, select_on: str, cross_fitted_halves: float) -> tuple[float, float]:
    """(honest, gain): the reference's selection-set mAP plus the cross-fitted gain over it, both
    measured on the halves basis (see the module docstring); clipped to [0, 1] (an additive
    correction can step past 1 next to a perfect score)."""
    gain = cross_fitted_halves - reference["halves"]
    return float(np.clip(reference[select_on] + gain, 0.0, 1.0)), gain


def choose(table: list[dict], select_on: str, reference: int = 0) -> dict:
    """The choice a score table gives (rows from score_row; higher is better).

    Returns {"choice": i chosen on `select_on`, "select_on", "half_choices": [chosen on A, chosen on
    B], "honest", "honest_gain" (over candidate `reference`, the no-choice default: list it
    first), "chosen": table[choice], "table": table}."""
    if not table:
        raise ValueError("no candidates to choose from")
    choice = _argmax([t[select_on] for t in table])
    on_a, on_b = _argmax([t["half_a"] for t in table]), _argmax([t["half_b"] for t in table])
    cross = halves_macro(table[on_b]["ap_half_a"], table[on_a]["ap_half_b"])
    honest, gain = honest_value(table[reference], select_on, cross)
    return {"choice": choice, "select_on": select_on, "half_choices": [on_a, on_b], "honest": honest,
            "honest_gain": gain, "chosen": table[choice], "table": table}


def cross_fit(n_candidates: int, predict, y, sets: dict, per_label=_ap) -> dict:
    """choose() over the rows of candidates 0..n-1; predict(i, idx) -> predictions of candidate i."""
    table = [score_row(y, sets, lambda idx, i=i: predict(i, idx), per_label) for i in range(n_candidates)]
    return choose(table, sets["select_on"])


HONEST_BOOT = 500  # resamples of the honest gain's interval


def _halves_macro_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """halves_macro for each row of two (B, C) per-label arrays."""
    pair = np.stack([a, b]).astype(np.float64)
    n = (~np.isnan(pair)).sum(0)
    per = np.where(n > 0, np.nansum(pair, 0) / np.maximum(n, 1), np.nan)
    ok = ~np.isnan(per)
    k = ok.sum(1)
    return np.where(k > 0, np.where(ok, per, 0.0).sum(1) / np.maximum(k, 1), np.nan)


def honest_gain_interval(sel: dict, predict, y, sets: dict, groups, n_boot: int = HONEST_BOOT, seed: int = 0,
                         level: float = 0.95) -> dict:
    """Bootstrap interval of sel["honest_gain"] (a cross_fit() result): the studies of each half are
    re-weighted (metrics.resample_weights, the Bayesian bootstrap of the evaluation), and on the same
    weights the cross-fitted predictions (half A with the choice made on B and vice versa) and the
    reference's (candidate 0) are scored on the halves basis. The half choices are held fixed: the
    interval is that of measuring the gain on these halves, not of the choices themselves.
    -> {"gain", "low", "high", "level", "n_boot", "unit": "studies"}."""
    from cxrlt.evaluation.metrics import _interval, resample_weights, resampled_ap

    y = np.asarray(y)
    groups = np.asarray(groups)
    on_a, on_b = sel["half_choices"]
    per = {}
    for name, idx, chosen in (("a", sets["halves"][0], on_b), ("b", sets["halves"][1], on_a)):
        if not len(idx):
            per[name] = (np.full((n_boot, y.shape[1]), np.nan),) * 2
            continue
        w = resample_weights(groups[idx], n_boot, seed + (name == "b"))
        per[name] = (resampled_ap(y[idx], predict(chosen, idx), w), resampled_ap(y[idx], predict(0, idx), w))
    boot = _halves_macro_rows(per["a"][0], per["b"][0]) - _halves_macro_rows(per["a"][1], per["b"][1])
    lo, hi = _interval(boot, level)
    return {"gain": float(sel["honest_gain"]), "low": lo, "high": hi, "level": level, "n_boot": n_boot,
            "unit": "studies"}


def selection_part(cfg: dict) -> dict:
    """The config's selection keys (what a stage that chooses on val must record and be re-run for)."""
    return {k: cfg[k] for k in SELECTION_KEYS}


def set_sizes(sets: dict) -> dict[str, int]:
    """{"full", "proxy", "half_a", "half_b"}: image counts of a val_sets() result."""
    return {k: len(v) for k, v in subsets_of(sets).items()}


def json_float(x) -> float | None:
    """A score for a JSON file: None for NaN (json would write NaN, which is not JSON; NaN != NaN)."""
    return None if x is None or np.isnan(x) else float(x)


def named_scores(row: dict, select_on: str) -> dict:
    """A score-table row as the stages name its values in metrics.jsonl / summary.json:
    {"val_mAP" (full), "val_proxy_mAP", "val_select_mAP" (on the selection set)}."""
    return {"val_mAP": json_float(row["full"]), "val_proxy_mAP": json_float(row["proxy"]),
            "val_select_mAP": json_float(row[select_on])}


def unlabelled_sets(y, cfg: dict | None = None) -> dict:
    """val_sets for labelled rows without keys (each image its own study and patient, projection
    unknown: the selection set is the full set). For callers that hold only predictions and labels."""
    y = np.asarray(y)
    ids = np.arange(len(y)).astype(str)
    return val_sets_from_keys(make_keys(ids, y), [], cfg or {})


def public_row(row: dict) -> dict:
    """A score-table row without its per-label arrays (for JSON files and printing)."""
    return {k: v for k, v in row.items() if not k.startswith("ap_")}
