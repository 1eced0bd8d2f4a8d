"""cxrlt.metrics against sklearn and hand-computed values."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cxrlt import metrics as M


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
