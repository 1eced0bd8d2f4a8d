"""Patient-grouped, multilabel-stratified folds (cxrlt.data.splits)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrlt.data.splits import assign_folds

K = 5


def long_tail_table(n=3000, n_groups=600, n_labels=12, seed=0) -> tuple[pd.DataFrame, list[str]]:
    rng = np.random.default_rng(seed)
    labels = [f"L{i}" for i in range(n_labels)]
    prevalence = np.geomspace(0.3, 0.003, n_labels)
    y = (rng.random((n, n_labels)) < prevalence).astype(np.int8)
    df = pd.DataFrame(y, columns=labels)
    df.insert(0, "PatientID", [f"{g}.00E+38" for g in rng.integers(0, n_groups, n)])
    return df, labels


def per_fold_positives(df, labels, folds) -> np.ndarray:
    return np.stack([df.loc[folds == f, labels].sum().to_numpy() for f in range(K)])


def test_no_patient_in_two_folds_and_all_folds_used():
    df, labels = long_tail_table()
    folds = assign_folds(df, labels, k=K, seed=0)
    assert folds.shape == (len(df),) and set(folds) == set(range(K))
    assert (df.assign(f=folds).groupby("PatientID")["f"].nunique() == 1).all()
    sizes = np.bincount(folds, minlength=K)
    assert sizes.max() - sizes.min() <= 0.1 * len(df) / K


def test_deterministic_under_seed_and_independent_of_row_order():
    df, labels = long_tail_table()
    a = assign_folds(df, labels, k=K, seed=3)
    assert (a == assign_folds(df, labels, k=K, seed=3)).all()
    assert (a != assign_folds(df, labels, k=K, seed=4)).any()
    perm = np.random.default_rng(1).permutation(len(df))
    shuffled = assign_folds(df.iloc[perm].reset_index(drop=True), labels, k=K, seed=3)
    assert (shuffled == a[perm]).all()


def test_stratification_beats_a_random_group_split():
    df, labels = long_tail_table()
    folds = assign_folds(df, labels, k=K, seed=0)
    total = df[labels].sum().to_numpy()

    def mean_rel_dev(f):
        return (np.abs(per_fold_positives(df, labels, f) - total / K) / (total / K)).mean()

    groups = df["PatientID"].astype("category").cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    random_devs = [mean_rel_dev(rng.integers(0, K, groups.max() + 1)[groups]) for _ in range(5)]
    assert mean_rel_dev(folds) < 0.5 * min(random_devs)


def test_rare_label_spreads_over_folds():
    """A label with k positives in k different patients must reach min(k, K) folds."""
    df, labels = long_tail_table(n=1000, n_groups=1000, n_labels=6)
    for k_pos in (2, 3, 7):
        rare = np.zeros(len(df), dtype=np.int8)
        rare[np.random.default_rng(k_pos).choice(len(df), k_pos, replace=False)] = 1
        d = df.assign(Rare=rare)
        folds = assign_folds(d, labels + ["Rare"], k=K, seed=0)
        assert len(set(folds[rare == 1])) == min(k_pos, K)


def test_blank_patient_ids_are_separate_groups():
    df = pd.DataFrame({"PatientID": [""] * 10, "A": [1, 0] * 5})
    folds = assign_folds(df, ["A"], k=K, seed=0)
    assert np.bincount(folds, minlength=K).tolist() == [2] * K  # not all in one fold
