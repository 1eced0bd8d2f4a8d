"""cxrlt.evaluation.metrics against sklearn and hand-computed values."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cxrlt.evaluation import metrics as M


@pytest.fixture
def toy():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 4)) < 0.3).astype(int)
    p = np.clip(y * 0.3 + rng.random((60, 4)) * 0.7, 0, 1)
    y[:, 2] = 0  # no positive: skipped everywhere
    p[:, 3] = np.round(p[:, 3], 1)  # many ties
    return y, p


def test_ap_and_auc_match_sklearn_and_skip_labels_without_positive(toy):
    y, p = toy
    ap = M.average_precision_per_label(y, p)
    auc = M.auc_per_label(y, p)
    for c in (0, 1, 3):
        assert ap[c] == pytest.approx(average_precision_score(y[:, c], p[:, c]))
        assert auc[c] == pytest.approx(roc_auc_score(y[:, c], p[:, c]))
    assert np.isnan(ap[2]) and np.isnan(auc[2])
    m, skipped = M.macro_map(y, p, labels=["a", "b", "c", "d"])
    assert skipped == ["c"]
    assert m == pytest.approx(np.mean([ap[0], ap[1], ap[3]]))
    assert M.macro_auc(y, p)[1] == [2]


def test_ties_do_not_depend_on_row_order():
    y = np.array([[1], [0], [1], [0], [0]])
    p = np.array([[0.5], [0.5], [0.9], [0.1], [0.5]])
    perm = np.array([4, 3, 2, 1, 0])
    a = M.average_precision_per_label(y, p)[0]
    assert a == pytest.approx(M.average_precision_per_label(y[perm], p[perm])[0])
    # Hand value: threshold 0.9 -> P=1, R=.5; threshold .5 -> P=2/4, R=1: AP = .5*1 + .5*.5.
    assert a == pytest.approx(0.75)


def test_constant_predictions():
    y = np.array([[1, 0], [0, 1], [0, 1], [0, 0]])
    p = np.full(y.shape, 0.3)
    ap = M.average_precision_per_label(y, p)
    np.testing.assert_allclose(ap, y.mean(0))  # AP of a constant score is the prevalence
    np.testing.assert_allclose(M.auc_per_label(y, p), [0.5, 0.5])
    assert M.f1_at(y, p, 0.5) == 0.0  # nothing predicted positive
    thr = M.tune_thresholds(y, p)
    # Only possible decision with a constant score: everything positive.
    np.testing.assert_allclose(M.f1_per_label(y, p, thr), [2 * 1 / (4 + 1), 2 * 2 / (4 + 2)])


def test_single_class_label_skipped_for_auc_only():
    y = np.array([[1, 1], [1, 0], [1, 0]])
    p = np.array([[0.9, 0.8], [0.2, 0.1], [0.6, 0.3]])
    assert np.isnan(M.auc_per_label(y, p)[0])
    assert M.average_precision_per_label(y, p)[0] == pytest.approx(1.0)
    assert M.macro_auc(y, p) == (pytest.approx(1.0), [0])


def test_all_labels_skipped_gives_nan():
    m, skipped = M.macro_map(np.zeros((3, 2)), np.full((3, 2), 0.5))
    assert np.isnan(m) and skipped == [0, 1]


def test_f1_matches_sklearn(toy):
    y, p = toy
    f1 = M.f1_per_label(y, p, 0.5)
    for c in (0, 1, 3):
        assert f1[c] == pytest.approx(f1_score(y[:, c], p[:, c] >= 0.5, zero_division=0))
    assert np.isnan(f1[2])
    assert M.f1_at(y, p, 0.5) == pytest.approx(np.nanmean(f1))


def test_tuned_thresholds_match_or_beat_half_and_the_best_possible(toy):
    y, p = toy
    thr = M.tune_thresholds(y, p)
    tuned = M.f1_per_label(y, p, thr)
    base = M.f1_per_label(y, p, 0.5)
    for c in (0, 1, 3):
        best = max(f1_score(y[:, c], p[:, c] >= t, zero_division=0) for t in np.unique(p[:, c]))
        assert tuned[c] == pytest.approx(best)
        assert tuned[c] >= base[c] - 1e-12
    assert thr[2] == 0.5  # no positive: the default
    assert M.f1_at(y, p, thr) >= M.f1_at(y, p, 0.5)


def test_threshold_sits_between_scores():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.3, 0.7, 0.8])
    assert M.best_f1_threshold(y, p) == pytest.approx(0.5)  # halfway between 0.3 and 0.7


def test_ece_hand_computed():
    # 2 bins: [0, .5) holds p=.2,.4 with y=0,1 -> |0.5 - 0.3| * 2/4;
    #         [.5, 1] holds p=.6,1.0 with y=1,1 -> |1 - 0.8| * 2/4.  ECE = 0.1 + 0.1.
    y = np.array([[0, 1], [1, 1]])
    p = np.array([[0.2, 0.4], [0.6, 1.0]])
    assert M.expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.2)
    assert M.expected_calibration_error(y, y.astype(float)) == 0.0


def test_frequency_groups_and_group_map():
    groups = M.frequency_groups([500, 50, 4, 5], 1000)  # 50%, 5%, 0.4%, 0.5%
    assert groups == ["head", "head", "tail", "medium"]
    g = M.group_map([0.9, 0.7, 0.1, np.nan], groups)
    assert g["head"] == pytest.approx(0.8) and g["tail"] == pytest.approx(0.1)
    assert np.isnan(g["medium"])  # its only label has no AP


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        M.macro_map(np.zeros((3, 2)), np.zeros((3, 3)))


# ---- bootstrap ----------------------------------------------------------------------------------------
def _binormal_population_ap(d: float, prevalence: float) -> float:
    """AP of the score distribution: positives ~ N(d, 1), negatives ~ N(0, 1), given prevalence.

    AP = integral of precision(t) dTPR(t), thresholds t from +inf down (numerically)."""
    from scipy.stats import norm

    t = np.linspace(-10, 10 + d, 200_001)
    tpr, fpr = norm.sf(t - d), norm.sf(t)
    precision = prevalence * tpr / (prevalence * tpr + (1 - prevalence) * fpr)
    return float(np.trapezoid(precision * norm.pdf(t - d), t))


def _binormal_sample(rng, n, params):
    y = np.stack([rng.random(n) < pi for _, pi in params], 1).astype(int)
    p = np.stack([rng.normal(0, 1, n) + d * y[:, k] for k, (d, _) in enumerate(params)], 1)
    return y, p


def test_weighted_ap_equals_sklearn_with_sample_weights_and_on_duplicated_rows(toy):
    y, p = toy
    groups = np.arange(len(y)) // 3
    w = M.resample_weights(groups, n_boot=4, seed=3)
    assert (w > 0).all() and all((w[:, groups == g] == w[:, [3 * g]]).all() for g in range(20))  # a study moves as one
    ap = M.resampled_ap(y, p, w)
    for b in range(4):
        for c in (0, 1, 3):  # 3: many tied scores
            assert ap[b, c] == pytest.approx(average_precision_score(y[:, c], p[:, c], sample_weight=w[b]))
    assert np.isnan(ap[:, 2]).all()
    counts = np.random.default_rng(0).integers(0, 3, (2, len(y)))  # integer weights = duplicated rows
    for b in range(2):
        idx = np.repeat(np.arange(len(y)), counts[b])
        assert M.resampled_ap(y, p, counts[b:b + 1])[0, 0] == pytest.approx(average_precision_score(y[idx, 0], p[idx, 0]))
    assert np.allclose(M.resampled_ap(y, p, np.ones((1, len(y))))[0], M.average_precision_per_label(y, p),
                       equal_nan=True)


def test_bootstrap_interval_covers_population_map_at_nominal_rate():
    params = [(1.5, 0.2), (1.0, 0.3), (2.0, 0.1)]  # (separation, prevalence) per label
    truth = np.mean([_binormal_population_ap(d, pi) for d, pi in params])
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    for rep in range(100):
        y, p = _binormal_sample(rng, 400, params)
        ci = M.bootstrap_map(y, p, n_boot=300, seed=rep)["mAP"]
        hits += ci["low"] <= truth <= ci["high"]
        widths.append(ci["high"] - ci["low"])
    assert 0.86 <= hits / 100 <= 0.995, hits
    assert 0.05 < np.mean(widths) < 0.2  # a real interval, not a degenerate one


def test_bootstrap_resamples_studies_not_images():
    # Every study holds two identical images: the information is that of N/2 images, so resampling
    # studies must give a wider interval (about sqrt(2)) than pretending the images are independent.
    rng = np.random.default_rng(1)
    y, p = _binormal_sample(rng, 200, [(1.0, 0.3), (1.5, 0.2)])
    y2, p2, studies = np.repeat(y, 2, 0), np.repeat(p, 2, 0), np.repeat(np.arange(200), 2)
    by_study = M.bootstrap_map(y2, p2, groups=studies, n_boot=500)
    by_image = M.bootstrap_map(y2, p2, n_boot=500)
    assert by_study["unit"] == "studies" and by_study["n_units"] == 200 and by_image["n_units"] == 400

    def width(r):
        return r["mAP"]["high"] - r["mAP"]["low"]

    assert 1.2 < width(by_study) / width(by_image) < 1.7


def test_bootstrap_interval_stays_centred_with_single_positive_labels():
    # Four labels with a single, badly ranked positive (AP ~0.1). Drawing studies with replacement
    # would miss each in ~37% of the resamples (the macro mean then jumps up) and duplicate it
    # into ties in others (its AP jumps up): the interval sat above the estimate. It must sit
    # around it, and keep the common labels' noise.
    rng = np.random.default_rng(4)
    n = 200
    y = np.zeros((n, 8), int)
    y[:, :4] = rng.random((n, 4)) < 0.3
    p = rng.normal(0, 1, (n, 8)) + 1.5 * y
    for c in range(4, 8):
        i = rng.integers(n)
        y[i, c], p[i, c] = 1, -1.0
    r = M.bootstrap_map(y, p, n_boot=1000)["mAP"]
    assert 0.25 < (r["value"] - r["low"]) / (r["high"] - r["low"]) < 0.75
    assert np.isfinite(M.resampled_ap(y, p, M.resample_weights(np.arange(n)))).all()  # no label drops out
    common = M.bootstrap_map(y[:, :4], p[:, :4], n_boot=1000)["mAP"]  # half the macro mean's weight
    assert r["high"] - r["low"] > 0.4 * (common["high"] - common["low"])


def test_bootstrap_group_intervals_and_point_values(toy):
    y, p = toy
    groups = ["head", "medium", "tail", "tail"]
    r = M.bootstrap_map(y, p, label_groups=groups, n_boot=200)
    assert r["mAP"]["value"] == pytest.approx(M.macro_map(y, p)[0])
    assert r["tail"]["value"] == pytest.approx(M.average_precision_per_label(y, p)[3])  # label 2 has no AP
    for k in ("mAP", "head", "medium", "tail"):
        assert r[k]["low"] <= r[k]["value"] <= r[k]["high"]


def test_paired_bootstrap_against_itself_is_exactly_zero(toy):
    y, p = toy
    r = M.paired_bootstrap(y, p, p.copy(), groups=np.arange(len(y)) // 2, n_boot=200)
    assert r["mAP"] == {"diff": 0.0, "low": 0.0, "high": 0.0, "frac_positive": 0.0}


def test_paired_bootstrap_detects_a_small_real_gain_the_separate_intervals_cannot():
    rng = np.random.default_rng(2)
    y = (rng.random((600, 5)) < 0.2).astype(int)
    base = rng.normal(0, 1, y.shape) + 1.0 * y
    better = base + 0.1 * y + rng.normal(0, 0.1, y.shape)  # the same errors, slightly more signal
    pair = M.paired_bootstrap(y, better, base, n_boot=500)["mAP"]
    a = M.bootstrap_map(y, better, n_boot=500)["mAP"]
    b = M.bootstrap_map(y, base, n_boot=500)["mAP"]
    assert pair["diff"] == pytest.approx(a["value"] - b["value"])
    assert 0 < pair["low"] < pair["diff"] < pair["high"] and pair["frac_positive"] > 0.975
    assert a["low"] < b["high"]  # unpaired, the two intervals overlap
    swapped = M.paired_bootstrap(y, base, better, n_boot=500)["mAP"]
    assert swapped["diff"] == pytest.approx(-pair["diff"]) and swapped["high"] < 0


def test_bootstrap_is_seeded_and_fast():
    import time

    rng = np.random.default_rng(3)
    y, p = _binormal_sample(rng, 300, [(1.0, 0.05 + 0.01 * k) for k in range(30)])
    studies = np.arange(300) // 2
    t = time.perf_counter()
    r1 = M.bootstrap_map(y, p, groups=studies, n_boot=1000, seed=5)
    elapsed = time.perf_counter() - t
    assert r1 == M.bootstrap_map(y, p, groups=studies, n_boot=1000, seed=5)
    assert r1 != M.bootstrap_map(y, p, groups=studies, n_boot=1000, seed=6)
    assert elapsed < 5.0  # ~0.5 s on one core; a per-resample sklearn loop takes ~30 s


def test_score_is_the_macro_map_with_auc_and_named_skips(toy):
    y, p = toy
    ap = M.average_precision_per_label(y, p)
    s = M.score(y, p, labels=["a", "b", "c", "d"])
    assert s["mAP"] == pytest.approx(np.mean(ap[[0, 1, 3]])) and s["skipped"] == ["c"]
    assert s["mAUC"] == pytest.approx(np.mean([roc_auc_score(y[:, c], p[:, c]) for c in (0, 1, 3)]))
    assert np.array_equal(np.isnan(s["ap"]), [False, False, True, False])
    assert M.score(y, p)["skipped"] == [2]  # indices without names
    fast = M.score(y, p, auc=False)
    assert np.isnan(fast["mAUC"]) and fast["mAP"] == s["mAP"]
