import math

import numpy as np
import pytest

from cxrlt.core import config
from cxrlt.core.errors import ConfigError
from cxrlt.data.samplers import SAMPLERS, build_sampler, repeat_factors

CFG = dict(config.DEFAULTS)


def skewed_targets(n=400, seed=0):
    """Label 0 in ~60% of rows, label 1 in ~10%, label 2 in 4 rows (when n > 250), label 3 never; some
    rows have no label at all."""
    rng = np.random.default_rng(seed)
    t = np.zeros((n, 4), dtype=np.float32)
    t[:, 0] = rng.random(n) < 0.6
    t[:, 1] = rng.random(n) < 0.1
    t[[k for k in (5, 17, 99, 250) if k < n], 2] = 1
    return t


def epoch_list(s, epoch):
    s.set_epoch(epoch)
    return list(s)


@pytest.mark.parametrize("name", SAMPLERS)
def test_deterministic_under_seed_and_epochs_differ(name):
    t = skewed_targets()
    a = build_sampler(name, t, CFG, seed=3)
    b = build_sampler(name, t, CFG, seed=3)
    assert epoch_list(a, 0) == epoch_list(b, 0)
    # resume: jumping straight to epoch 5 gives the same list as reaching it in order
    for e in range(5):
        epoch_list(a, e)
    assert epoch_list(a, 5) == epoch_list(b, 5)
    assert epoch_list(a, 0) != epoch_list(a, 1)
    assert epoch_list(build_sampler(name, t, CFG, seed=4), 0) != epoch_list(a, 0)
    assert len(a) == len(t) and len(epoch_list(a, 2)) == len(t)
    assert all(0 <= i < len(t) for i in epoch_list(a, 2))


def test_instance_is_a_permutation():
    t = skewed_targets(50)
    assert sorted(epoch_list(build_sampler("instance", t, CFG, seed=0), 7)) == list(range(50))


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("n", [400, 401])
def test_ddp_shares_rebuild_the_single_process_list(name, replicas, n):
    t = skewed_targets(n)
    single = epoch_list(build_sampler(name, t, CFG, seed=1), 4)
    shards = [epoch_list(build_sampler(name, t, CFG, seed=1, num_replicas=replicas, rank=r), 4)
              for r in range(replicas)]
    per_rank = math.ceil(n / replicas)
    assert [len(s) for s in shards] == [per_rank] * replicas
    assert all(len(build_sampler(name, t, CFG, 1, replicas, r)) == per_rank for r in range(replicas))
    # interleave rank shares back: first N positions equal the single-process list, the rest
    # is the wrap-around padding
    merged = [shards[k % replicas][k // replicas] for k in range(per_rank * replicas)]
    assert merged[:n] == single
    assert merged[n:] == single[: per_rank * replicas - n]


def test_ddp_shares_are_disjoint_positions_for_instance():
    t = skewed_targets(400)
    shards = [set(epoch_list(build_sampler("instance", t, CFG, 0, 2, r), 0)) for r in range(2)]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 400


def test_class_aware_label_frequencies_are_uniform():
    t = skewed_targets(3000, seed=1)
    t[t[:, 2] == 1, 2] = 0
    t[[5, 17, 99, 250, 700, 1800], 2] = 1  # 6 rows carry the rare label
    s = build_sampler("class_aware", t, CFG, seed=0)
    idx = np.array(epoch_list(s, 0) + epoch_list(s, 1))
    # each draw picks one of the 3 present labels uniformly; count how often each label is
    # the one an image was drawn for: rows of the rare label are drawn ~1/3 of the time
    rare_rows = np.flatnonzero(t[:, 2])
    share_rare = np.isin(idx, rare_rows).mean()
    assert share_rare == pytest.approx(1 / 3, abs=0.03)
    # instance sampling would draw them 6/3000 of the time
    share_label1 = t[idx, 1].mean()
    assert share_label1 > 1 / 3 - 0.03  # >= its own third (plus co-occurrences)
    # never drawn: rows without any label; label 3 has no positive and is not a draw target
    assert t[idx].sum(axis=1).min() >= 1


def test_class_aware_cycles_through_each_label_list():
    t = np.zeros((30, 2), dtype=np.float32)
    t[:3, 0] = 1  # label 0: rows 0..2
    t[3:, 1] = 1
    idx = np.array(epoch_list(build_sampler("class_aware", t, CFG, seed=2), 0))
    drawn0 = idx[idx < 3]
    # consecutive full passes over a shuffled list: every complete block of 3 holds each row once
    for k in range(len(drawn0) // 3):
        assert sorted(drawn0[3 * k: 3 * k + 3]) == [0, 1, 2]


def test_repeat_factor_formula():
    t = np.zeros((10, 3))
    t[:5, 0] = 1  # f = 0.5
    t[0, 1] = 1  # f = 0.1
    t[1, 2] = 1  # f = 0.1
    t[2, 1] = 1  # f(label 1) = 0.2
    r = repeat_factors(t, threshold=0.4)
    # label factors: max(1, sqrt(0.4/0.5)) = 1, sqrt(0.4/0.2) = sqrt 2, sqrt(0.4/0.1) = 2
    expected = np.array([math.sqrt(2), 2.0, math.sqrt(2), 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(r, expected)


def test_repeat_factor_sampling_boosts_rare_rows():
    t = skewed_targets(1000, seed=3)
    c = dict(CFG, rfs_threshold=0.1)
    s = build_sampler("repeat_factor", t, c, seed=0)
    r = s.factors
    rare = np.flatnonzero(t[:, 2])  # f = 0.004 -> r = sqrt(25) = 5
    np.testing.assert_allclose(r[rare], 5.0)
    counts = np.zeros(len(t))
    epochs = 30
    for e in range(epochs):
        np.add.at(counts, np.array(epoch_list(s, e)), 1)
    # the expanded list has sum(r) entries of which N are kept: expected draws r_i * N / sum(r)
    expected = r * len(t) / r.sum()
    assert counts[rare].mean() / epochs == pytest.approx(expected[rare].mean(), rel=0.15)
    plain = np.flatnonzero(r == 1)
    assert counts[plain].mean() / epochs == pytest.approx(expected[plain].mean(), rel=0.05)
    assert counts[rare].mean() > 3 * counts[plain].mean()


def test_unknown_sampler():
    with pytest.raises(ConfigError, match="unknown sampler 'nope'"):
        build_sampler("nope", skewed_targets(10), CFG, seed=0)
