"""cxrlt.evaluation.selection: the test-like proxy subset, patient halves and cross-fitted selection."""

import numpy as np
import pandas as pd
import pytest

from conftest import IndexCache
from cxrlt.evaluation import selection as V

LABELS = ["Normal", "effusion", "nodule"]


def hand_index(projection=True) -> pd.DataFrame:
    #        ImageID   study  patient proj  Normal eff nod
    lines = [("a_pa",  "s1",  "p1",  "PA",  0, 1, 0),
             ("a_l",   "s1",  "p1",  "L",   0, 1, 0),
             ("b_pa",  "s2",  "p1",  "PA",  1, 0, 0),   # normal only: no finding
             ("b_l",   "s2",  "p1",  "L",   1, 0, 0),
             ("c_ap",  "s3",  "p2",  "AP",  0, 0, 1),
             ("d_l",   "s4",  "p3",  "L",   0, 1, 1),   # lateral-only study
             ("e_pa1", "s5",  "p4",  "PA",  0, 1, 0),   # two frontal images in one study
             ("e_pa2", "s5",  "p4",  "PA",  0, 1, 0),
             ("f_pa",  "",    "p5",  "PA",  0, 0, 1),   # blank study keys: each its own study
             ("g_pa",  "",    "p5",  "AP_horizontal", 0, 1, 0)]
    df = pd.DataFrame(lines, columns=["ImageID", "study", "patient", "projection", *LABELS])
    if not projection:
        df["projection"] = ""
    df.insert(0, "split", "train")
    df.insert(1, "fold", 0)
    return df


def ids_of(keys, idx):
    return sorted(keys.ids[idx])


def test_proxy_is_frontal_one_image_per_study():
    cache = IndexCache(hand_index(), LABELS)
    rows = cache.rows("train", fold=0)
    keys = V.val_keys(cache, rows)
    assert list(keys.study[8:]) == ["f_pa", "g_pa"]  # blank study -> own ImageID
    proxy = ids_of(keys, V.proxy_subset(keys, LABELS))
    # s1 -> its PA, s2 -> its PA, s3 AP, s4 (lateral only) none, s5 one of two, f and g separately
    assert len(proxy) == 6 and {"a_pa", "b_pa", "c_ap", "f_pa", "g_pa"} <= set(proxy)
    assert len({"e_pa1", "e_pa2"} & set(proxy)) == 1
    with_finding = ids_of(keys, V.proxy_subset(keys, LABELS, require_finding=True))
    assert with_finding == sorted(set(proxy) - {"b_pa"})
    assert V.proxy_subset(keys, LABELS, seed=0).tolist() == V.proxy_subset(keys, LABELS, seed=0).tolist()


def test_proxy_choice_does_not_depend_on_row_order_and_changes_with_seed():
    df = hand_index()
    many = pd.concat([df.assign(ImageID=df["ImageID"] + f"_{k}", study=df["study"] + f"_{k}") for k in range(30)])
    picks = {}
    for order in ("asc", "desc"):
        cache = IndexCache(many if order == "asc" else many.iloc[::-1], LABELS)
        keys = V.val_keys(cache, cache.rows("train"))
        picks[order] = set(ids_of(keys, V.proxy_subset(keys, LABELS)))
    assert picks["asc"] == picks["desc"]
    e1 = {i for i in picks["asc"] if i.startswith("e_pa1")}
    assert 5 < len(e1) < 25  # the study's two PA images are each chosen about half the time
    keys = V.val_keys(IndexCache(many, LABELS), np.arange(len(many)))
    assert set(ids_of(keys, V.proxy_subset(keys, LABELS, seed=1))) != picks["asc"]


def test_without_projection_proxy_keeps_laterals_and_selection_is_full():
    cache = IndexCache(hand_index(projection=False), LABELS)
    rows = cache.rows("train")
    sets = V.val_sets(cache, rows, {"select_on": "auto"})
    keys = V.val_keys(cache, rows)
    assert keys.frontal is None and not sets["has_projection"]
    assert len(sets["proxy"]) == 7  # one image per study, laterals allowed (d_l's study counts)
    assert sets["select_on"] == "full" and sets["selection"].tolist() == list(range(10))
    assert V.val_sets(IndexCache(hand_index(), LABELS), rows, {"select_on": "auto"})["select_on"] == "proxy"
    assert V.val_sets(IndexCache(hand_index(), LABELS), rows, {"select_on": "full"})["select_on"] == "full"


def test_halves_are_patient_disjoint_balanced_and_cover_the_selection():
    rng = np.random.default_rng(0)
    n = 400
    patients = rng.integers(0, 120, n).astype(str)
    keys = V.make_keys([f"i{k}" for k in range(n)], np.zeros((n, 3)), study=[f"s{k}" for k in range(n)],
                       patient=patients)
    sel = np.sort(rng.choice(n, 300, replace=False))
    a, b = V.patient_halves(keys, sel)
    assert sorted(np.r_[a, b].tolist()) == sel.tolist()
    assert not set(keys.patient[a]) & set(keys.patient[b])
    assert abs(len(a) - len(b)) <= 10  # a patient has ~3 images here
    assert [x.tolist() for x in V.patient_halves(keys, sel[::-1])] == [a.tolist(), b.tolist()]


def _mean_per_label(y, p):
    return np.asarray(p, dtype=float).mean(0)


def test_cross_fit_never_reports_on_the_half_it_chose_on():
    sets = {"full": np.arange(10), "proxy": np.arange(6), "halves": (np.array([0, 1, 2]), np.array([3, 4, 5])),
            "select_on": "proxy"}
    # "Predictions" scored by their mean: candidate 1 looks best on A, candidate 2 on B, and each
    # is bad on the other half.
    value = np.array([[0.5] * 6 + [0.5] * 4,
                      [0.9] * 3 + [0.1] * 3 + [0.9] * 4,
                      [0.1] * 3 + [0.8] * 3 + [0.0] * 4])
    calls = []

    def predict(i, idx):
        calls.append((i, tuple(idx)))
        return value[i, idx][:, None]

    sel = V.cross_fit(3, predict, np.zeros((10, 1)), sets, per_label=_mean_per_label)
    assert sel["half_choices"] == [1, 2]
    # A's pick scored on B, B's pick on A: 0.1 on the halves basis, 0.4 below the reference
    # (candidate 0: 0.5 on the halves and on the proxy); the in-half maxima would say +0.35.
    assert sel["honest_gain"] == pytest.approx(-0.4) and sel["honest"] == pytest.approx(0.1)
    assert sel["choice"] == 1 and sel["chosen"]["proxy"] == pytest.approx(0.5)
    assert sel["table"][2]["full"] == pytest.approx(0.27) and sel["table"][1]["halves"] == pytest.approx(0.5)
    assert {(1, (3, 4, 5)), (2, (0, 1, 2))} <= set(calls)
    assert "ap_half_a" not in V.public_row(sel["table"][0]) and "halves" in V.public_row(sel["table"][0])


def test_cross_fit_honest_number_is_unbiased_for_noise_candidates():
    # 40 candidates that are pure noise: the best of them on the selection set looks good, the
    # cross-fitted number stays at the chance level (mean 0.5).
    rng = np.random.default_rng(1)
    values = rng.random((40, 200))
    keys = V.make_keys([f"i{k}" for k in range(200)], np.zeros((200, 3)), patient=rng.integers(0, 80, 200).astype(str))
    sets = V.val_sets_from_keys(keys, LABELS, {"select_on": "full"})
    sel = V.cross_fit(40, lambda i, idx: values[i, idx][:, None], keys.y, sets, per_label=_mean_per_label)
    assert sel["chosen"]["full"] > 0.54
    assert abs(sel["honest"] - 0.5) < 0.04 and abs(sel["honest_gain"]) < 0.04


def test_honest_number_averages_each_label_over_the_halves_that_have_it():
    # label 0 has positives in both halves, label 1 only in half B: its AP comes from B alone.
    y = np.array([[1, 0], [0, 0], [1, 1], [0, 0]])
    sets = {"full": np.arange(4), "proxy": np.arange(4), "halves": (np.array([0, 1]), np.array([2, 3])),
            "select_on": "full"}
    p = np.array([[0.9, 0.5], [0.1, 0.5], [0.2, 0.7], [0.3, 0.1]])
    row = V.score_row(y, sets, lambda idx: p[idx])
    assert np.isnan(row["ap_half_a"][1])
    assert row["halves"] == pytest.approx(np.mean([(1.0 + 0.5) / 2, 1.0]))  # label 0: A 1.0, B 0.5; label 1: B
    assert row["half_a"] == pytest.approx(1.0) and row["half_b"] == pytest.approx(0.75)
    one = V.choose([row], "full")  # one candidate: no choice, no gain
    assert one["honest_gain"] == 0 and one["honest"] == pytest.approx(row["full"])


def test_choose_ties_go_to_the_first_candidate_and_nan_loses():
    row = {"full": 0.5, "proxy": 0.5, "half_a": 0.5, "half_b": 0.5, "halves": 0.5, "ap_half_a": [0.5], "ap_half_b": [0.5]}
    table = [dict(row), dict(row), {**row, "proxy": float("nan"), "half_a": float("nan")}]
    sel = V.choose(table, "proxy")
    assert sel["choice"] == 0 and sel["half_choices"] == [0, 0]
    table[1]["half_b"] = 0.6
    assert V.choose(table, "proxy")["half_choices"] == [0, 1]


def test_rows_of_ids_maps_image_ids_to_cache_rows():
    cache = IndexCache(hand_index(), LABELS)
    assert V.rows_of_ids(cache, ["c_ap", "a_pa"]).tolist() == [4, 0]
    with pytest.raises(KeyError, match="zz"):
        V.rows_of_ids(cache, ["a_pa", "zz"])
