"""cxrlt.post.postproc: gating, pooling, patient context and the cross-fitted choice of the grid."""

import json

import numpy as np
import pytest

from cxrlt.post import postproc as P
from cxrlt.evaluation.metrics import macro_map
from cxrlt.evaluation.selection import make_keys, val_sets_from_keys

LABELS = ["Normal", "a", "b"]


def test_normal_gating_positive_negative_and_zero_exponents():
    p = np.array([[0.8, 0.5, 0.1], [0.0, 0.6, 0.9], [0.5, 0.7, 0.2]])
    q = P.normal_gating(p, LABELS, alpha=2.0)
    assert np.allclose(q[:, 0], p[:, 0])
    assert np.allclose(q[0, 1:], p[0, 1:] * 0.2 ** 2) and np.allclose(q[1, 1:], p[1, 1:])
    bayes = P.normal_gating(p, LABELS, alpha=-1.0)  # p_k / (1 - p_Normal), clipped at 1
    assert np.allclose(bayes[:, 1:], np.minimum(p[:, 1:] / (1 - p[:, :1]), 1.0))
    assert bayes[0, 1] == 1.0 and bayes[2, 2] == pytest.approx(0.4)
    assert P.normal_gating(p, LABELS, 0.0) is p
    assert P.normal_gating(p, ["x", "a", "b"], 2.0) is p  # no Normal label: unchanged
    assert np.isfinite(P.normal_gating(np.array([[1.0, 0.5, 0.5]]), LABELS, -2.0)).all()
    assert all(g.normal_gating_alpha == 0 for g in P.grid(["x", "a"]))
    assert {-1.0, 0.0, 1.0} <= {g.normal_gating_alpha for g in P.grid(LABELS)}
    assert P.grid(LABELS)[0] == P.PostParams()  # the no-op first: ties keep it


def test_study_pool_uses_the_exact_study_key_and_blank_keys_stay_alone():
    p = np.array([[0.0], [1.0], [0.5], [0.2], [0.8]])
    # rows 0-1 one study; rows 3-4 have blank study keys (each its own study after make_keys)
    keys = make_keys(["i0", "i1", "i2", "i3", "i4"], np.zeros((5, 1)), study=["s1", "s1", "s2", "", " "])
    q = P.study_pool(p, keys.study, weight=0.5)
    assert np.allclose(q[:, 0], [0.25, 0.75, 0.5, 0.2, 0.8])
    assert P.study_pool(p, keys.study, 0.0) is p


def _context_pool():
    #            patient study  Normal a  b
    pool = [("P1", "s1", 0, 1, 0), ("P1", "s1", 0, 1, 0), ("P1", "s2", 0, 0, 1), ("P2", "s3", 1, 0, 0)]
    return P.Context(np.array([r[0] for r in pool]), np.array([r[1] for r in pool]),
                     np.array([r[2:] for r in pool], dtype=float))


def test_patient_context_is_the_mean_label_of_the_patients_other_studies():
    ctx = _context_pool()
    mean, has = ctx.mean_labels(["P1", "P1", "P1", "P2", "P9"], ["s1", "s2", "s9", "s3", "s4"])
    assert has.tolist() == [True, True, True, False, False]  # P2's only study is its own; P9 unknown
    assert np.allclose(mean[0], [0, 0, 1])  # image of s1: only s2 counts (never its own study)
    assert np.allclose(mean[1], [0, 1, 0])  # image of s2: the two images of s1
    assert np.allclose(mean[2], [0, 2 / 3, 1 / 3])  # a new study: all three
    assert np.allclose(mean[3:], 0)
    p = np.full((5, 3), 0.5)
    q = P.patient_context(p, mean, has, 0.4)
    assert np.allclose(q[0], [0.3, 0.3, 0.7]) and np.allclose(q[3:], 0.5)


def _pairs_problem(rng, n_studies=300, noise=1.0):
    """Val fold of PA + lateral pairs sharing their labels; each image's prediction is the label
    plus independent noise, so averaging the pair helps on the full fold."""
    y = (rng.random((n_studies, 3)) < [0.3, 0.25, 0.2]).astype(int)
    y2 = np.repeat(y, 2, 0)
    p = 1 / (1 + np.exp(-(2 * y2 - 1 + rng.normal(0, noise, y2.shape))))
    ids = [f"img{i}" for i in range(len(y2))]
    studies = np.repeat([f"s{k}" for k in range(n_studies)], 2)
    patients = np.repeat([f"p{k}" for k in range(n_studies)], 2)
    frontal = np.tile([True, False], n_studies)
    return make_keys(ids, y2, studies, patients, frontal), p


def test_pooling_helps_on_full_val_but_is_never_chosen_on_the_one_image_per_study_proxy():
    keys, p = _pairs_problem(np.random.default_rng(0))
    sets = val_sets_from_keys(keys, LABELS, {"select_on": "auto"})
    res = P.choose_postproc(p, keys, LABELS, None, sets)
    pooled = [g for g in res["grid"] if g["study_pool_weight"] > 0 and g["normal_gating_alpha"] == 0]
    assert max(g["full"] for g in pooled) > res["raw"]["full"] + 0.02  # PA + lateral pairs: pooling "helps"
    assert all(g["proxy"] == pytest.approx(res["raw"]["proxy"]) for g in pooled)  # no-op on the proxy
    assert res["select_on"] == "proxy" and res["choice"]["study_pool_weight"] == 0.0
    assert res["sets"]["proxy"] == 300 and res["sets"]["half_a"] + res["sets"]["half_b"] == 300
    assert all(g["patient_context_weight"] == 0 for g in res["grid"])  # no context: no context grid
    full = P.choose_postproc(p, keys, LABELS, None, val_sets_from_keys(keys, LABELS, {"select_on": "full"}))
    assert full["choice"]["study_pool_weight"] > 0  # chosen on the full fold it would be applied


def test_negative_gating_is_chosen_when_every_evaluated_image_has_a_finding():
    # Calibrated model of a population with normals: P(normal) = q, findings only when abnormal.
    # The evaluated images are the abnormal ones, for which P(k | abnormal) = p_k / (1 - p_Normal).
    rng = np.random.default_rng(1)
    n = 1200
    q = rng.uniform(0.02, 0.9, n)
    r = rng.uniform(0.05, 0.6, (n, 2))
    y = np.zeros((n, 3), int)
    y[:, 1:] = rng.random((n, 2)) < r
    keep = y[:, 1:].any(1)  # every evaluated image has a finding
    p = np.column_stack([q, (1 - q)[:, None] * r])[keep]
    keys = make_keys([f"i{k}" for k in range(keep.sum())], y[keep], frontal=np.ones(keep.sum(), bool))
    res = P.choose_postproc(p, keys, LABELS, None, val_sets_from_keys(keys, LABELS, {"select_on": "proxy"}))
    assert res["choice"]["normal_gating_alpha"] < 0
    assert res["honest_gain"] > 0.01 and res["honest"] > res["raw"]["proxy"]


def test_patient_context_weight_is_chosen_when_earlier_studies_predict_the_labels():
    rng = np.random.default_rng(2)
    n_pat = 150
    chronic = (rng.random((n_pat, 3)) < [0.3, 0.3, 0.3]).astype(int)  # a patient's findings persist
    studies, patients, ys = [], [], []
    for k in range(n_pat):
        for s in range(3):
            studies.append(f"p{k}s{s}")
            patients.append(f"p{k}")
            ys.append(np.where(rng.random(3) < 0.85, chronic[k], 1 - chronic[k]))
    y = np.array(ys)
    p = 1 / (1 + np.exp(-(1.0 * (2 * y - 1) + rng.normal(0, 1.5, y.shape))))  # a weak model
    keys = make_keys([f"i{k}" for k in range(len(y))], y, studies, patients, np.ones(len(y), bool))
    context = P.Context(keys.patient, keys.study, y.astype(float))  # the val labels as the labelled pool
    sets = val_sets_from_keys(keys, LABELS, {"select_on": "proxy"})
    # by default (CXR-LT 2026's rules: docs/rules.md) no image is linked to its patient's labels
    off = P.choose_postproc(p, keys, LABELS, context, sets)
    assert off["n_with_context"] == 0 and not off["allow_patient_linking"]
    assert all(g["patient_context_weight"] == 0 for g in off["grid"]) and off["choice"]["patient_context_weight"] == 0
    res = P.choose_postproc(p, keys, LABELS, context, sets, allow_patient_linking=True)  # opted in
    assert res["n_with_context"] == len(y)
    assert res["choice"]["patient_context_weight"] > 0
    assert res["honest_gain"] > 0.02 and res["honest"] > res["raw"]["proxy"]
    # the same predictions without context keys to match gain nothing from the context weights
    lonely = make_keys(keys.ids, y, studies, [f"x{k}" for k in range(len(y))], keys.frontal)
    res2 = P.choose_postproc(p, lonely, LABELS, context, val_sets_from_keys(lonely, LABELS, {}),
                             allow_patient_linking=True)
    assert res2["n_with_context"] == 0 and res2["choice"]["patient_context_weight"] == 0


def test_apply_matches_the_grid_scores_and_the_choice_round_trips(tmp_path):
    from cxrlt.core import config

    keys, p = _pairs_problem(np.random.default_rng(3), n_studies=60)
    sets = val_sets_from_keys(keys, LABELS, {"select_on": "full"})
    res = P.choose_postproc(p, keys, LABELS, None, sets)
    path = tmp_path / "pred_val.csv.postproc.json"
    path.write_text(json.dumps(res))
    params = P.PostParams.from_cfg(config.load_postproc(path))
    assert params.as_dict() == res["choice"] and set(config.POSTPROC_KEYS) == set(res["choice"])
    q = P.apply(p, keys, LABELS, None, params)
    assert macro_map(keys.y, q)[0] == pytest.approx(res["chosen"]["full"])


@pytest.mark.parametrize("gain, applied", [(-0.01, False), (0.0, False), (0.02, True)])
def test_the_best_grid_point_is_applied_only_when_its_honest_gain_is_positive(monkeypatch, gain, applied):
    from cxrlt.evaluation import selection

    keys, p = _pairs_problem(np.random.default_rng(0))
    sets = val_sets_from_keys(keys, LABELS, {"select_on": "full"})
    real = selection.cross_fit

    def fake(n, predict, y, sets):  # the real table, a chosen non-default point, the given honest gain
        sel = real(n, predict, y, sets)
        return {**sel, "choice": n - 1, "honest_gain": gain, "honest": 0.5 + gain}

    monkeypatch.setattr(selection, "cross_fit", fake)
    res = P.choose_postproc(p, keys, LABELS, None, sets)
    best = [g for g in P.grid(LABELS) if g.patient_context_weight == 0][-1].as_dict()  # no context here
    assert res["best"] == best and res["kept_raw"] is (not applied)
    assert res["choice"] == (best if applied else P.grid(LABELS)[0].as_dict())
    assert ("raw predictions are kept" in P.summary_line(res)) is (not applied)
    assert ("is positive: applied" in P.summary_line(res)) is applied
    assert "not applied (POSTPROC=off" in P.summary_line(res, applied=False)  # reported only


def test_the_honest_gain_has_a_bootstrap_interval_around_it_in_the_line():
    keys, p = _pairs_problem(np.random.default_rng(0))
    res = P.choose_postproc(p, keys, LABELS, None, val_sets_from_keys(keys, LABELS, {"select_on": "full"}))
    iv = res["honest_gain_interval"]
    assert iv["low"] < iv["high"] and iv["n_boot"] > 100 and iv["gain"] == res["honest_gain"]
    assert iv["low"] - 0.05 <= res["honest_gain"] <= iv["high"] + 0.05  # near the resamples, not far out
    assert f"[{iv['low']:+.4f}, {iv['high']:+.4f}]" in P.summary_line(res)


def test_patient_context_needs_the_explicit_opt_in_key():
    from cxrlt.core import config
    from cxrlt.core.errors import ConfigError

    with pytest.raises(ConfigError, match="allow_patient_linking: true"):
        config.resolve(None, {"patient_context_weight": 0.2})
    opted = config.resolve(None, {"patient_context_weight": 0.2, "allow_patient_linking": True})
    assert opted["patient_context_weight"] == 0.2
    assert config.DEFAULTS["allow_patient_linking"] is False and config.group("allow_patient_linking") == "post"
