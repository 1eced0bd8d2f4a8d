"""The CXR-LT 2026 winner's released recipe (configs/winner.yaml): its repeat-factor sampler, its
margin BCE, per-group weight decay, the separate head phase, frontal-only training, the new keys
leaving finished runs' train keys alone, and one epoch of the config on the demo cache."""

import math

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from cxrlt.core import config
from cxrlt.core.errors import ConfigError, InputError
from cxrlt.data.cache import open_cache
from cxrlt.data.samplers import build_sampler, repeat_factors
from cxrlt.models.losses import build_loss, margin_bce_margins
from cxrlt.training.schedule import lr_multiplier, param_groups
from cxrlt.training.trainer import Trainer

CFG = dict(config.DEFAULTS)


# ---- repeat-factor sampler as released --------------------------------------------------------
def _targets():
    t = np.zeros((20, 3), dtype=np.float32)
    t[:12, 0] = 1  # n = 12
    t[12:16, 1] = 1  # n = 4
    t[16, 2] = 1  # n = 1
    t[0, 2] = 1  # n(label 2) = 2; row 0 carries labels 0 and 2
    return t  # rows 17-19 have no label; positives 12 + 4 + 2 = 18


def test_label_share_repeat_factors_and_cap_by_hand():
    t = _targets()
    share = np.array([12, 4, 2]) / 18.0
    r_label = np.maximum(1.0, np.sqrt(0.5 / share))  # t = 0.5: 1, 1.5, 2.121
    expected = np.ones(20)
    expected[12:16] = r_label[1]
    expected[[0, 16]] = r_label[2]
    np.testing.assert_allclose(repeat_factors(t, 0.5, frequency="label_share"), expected)
    # image frequency (LVIS): f = 12/20, 4/20, 2/20 -> different factors
    lvis = repeat_factors(t, 0.5, frequency="image")
    np.testing.assert_allclose(lvis[16], math.sqrt(0.5 / 0.1))
    capped = repeat_factors(t, 8.0, cap=3.0, frequency="label_share")
    assert capped.max() == 3.0 and capped[16] == 3.0  # uncapped: sqrt(8 / (2/18)) = 8.49
    assert repeat_factors(t, 8.0, frequency="label_share").max() == pytest.approx(math.sqrt(72))


def test_round_rounding_expands_the_epoch_and_reshuffles_it():
    t = _targets()
    cfg = dict(CFG, rfs_threshold=0.5, rfs_frequency="label_share", rfs_rounding="round", rfs_epoch="expanded",
               rfs_cap=10.0)
    s = build_sampler("repeat_factor", t, cfg, seed=0)
    reps = np.round(s.factors).astype(int)  # 1.5 -> 2 (half to even), 2.121 -> 2
    assert list(reps[12:16]) == [2] * 4 and reps[16] == 2 and reps[0] == 2
    assert s.epoch_length == reps.sum() == 26
    e0, e1 = s.full_indices(0), s.full_indices(1)
    # every row exactly round(r) times in every epoch, in a new order each epoch
    for e in (e0, e1):
        np.testing.assert_array_equal(np.bincount(e, minlength=20), reps)
    assert not np.array_equal(e0, e1)
    # fixed epochs keep N images
    fixed = build_sampler("repeat_factor", t, dict(cfg, rfs_epoch="fixed"), seed=0)
    assert fixed.epoch_length == 20 and len(fixed.full_indices(0)) == 20


def test_expanded_epoch_shares_are_disjoint_and_interleave_back():
    t = _targets()
    cfg = dict(CFG, rfs_threshold=0.5, rfs_frequency="label_share", rfs_rounding="round", rfs_epoch="expanded")
    whole = build_sampler("repeat_factor", t, cfg, seed=3)
    shards = [build_sampler("repeat_factor", t, cfg, seed=3, num_replicas=4, rank=r) for r in range(4)]
    for s in (whole, *shards):
        s.set_epoch(2)
    parts = [list(s) for s in shards]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == math.ceil(26 / 4)
    padded = np.resize(whole.full_indices(2), 4 * len(parts[0]))
    interleaved = np.empty_like(padded)
    for r, p in enumerate(parts):
        interleaved[r::4] = p
    np.testing.assert_array_equal(interleaved, padded)  # positions disjoint, the same list on every rank


def test_stochastic_expanded_epoch_has_a_fixed_length():
    t = _targets()
    cfg = dict(CFG, rfs_threshold=0.5, rfs_frequency="label_share", rfs_epoch="expanded")
    s = build_sampler("repeat_factor", t, cfg, seed=1)
    assert s.epoch_length == round(s.factors.sum())
    assert {len(s.full_indices(e)) for e in range(5)} == {s.epoch_length}


def test_rfs_options_are_checked():
    with pytest.raises(ConfigError, match="rfs_cap must be 0"):
        build_sampler("repeat_factor", _targets(), dict(CFG, rfs_cap=0.5), seed=0)
    with pytest.raises(ConfigError, match="rfs_frequency"):
        config.resolve([], {"rfs_frequency": "share"})


# ---- margin BCE ----------------------------------------------------------------------------
def _released_formula(z, y, counts, beta, max_m, power):
    """The released loss written out in float64 (labels with a positive only: see losses.py)."""
    n = counts.astype(float)
    w = (1 - beta) / (1 - beta ** n)
    w = w / w.mean()
    inv = 1 / w
    m = max_m * (inv - inv.min()) / (inv.max() - inv.min())
    za = z - y * m
    bce = np.logaddexp(0, -za) * y + np.logaddexp(0, za) * (1 - y)  # stable at |z| = 80
    return (bce * w ** power).mean(), m


def test_margin_bce_matches_the_formula_at_extreme_logits():
    counts = np.array([900, 120, 15, 2])
    z = np.array([[80.0, -80.0, 0.3, -2.0], [-80.0, 80.0, 5.0, 60.0], [0.0, 1.0, -70.0, -0.5]])
    y = np.array([[1, 0, 1, 0], [1, 1, 0, 1], [0, 1, 1, 0]], dtype=float)
    cfg = dict(CFG, loss="margin_bce", cb_beta=0.999, margin_bce_max_m=0.2, margin_bce_power=0.5)
    loss = build_loss(cfg, counts, 1000)
    got = loss(torch.tensor(z, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)).item()
    want, m = _released_formula(z, y, counts, 0.999, 0.2, 0.5)
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-5)
    assert m[0] == pytest.approx(0.2) and m[-1] == 0.0  # the frequent label gets the largest margin


def test_margin_bce_zero_positive_label_leaves_the_others_alone():
    with_zero = np.array([900, 120, 15, 0])
    m = margin_bce_margins(with_zero, 0.999, 0.2)
    np.testing.assert_allclose(m[:3], margin_bce_margins(with_zero[:3], 0.999, 0.2))
    assert m[3] == 0.0
    cfg = dict(CFG, loss="margin_bce", cb_beta=0.999)
    w = build_loss(cfg, with_zero, 1000).class_weight.numpy()
    w3 = build_loss(cfg, with_zero[:3], 1000).class_weight.numpy()
    np.testing.assert_allclose(w[:3], w3, rtol=1e-6)  # the others' weights are unchanged
    assert w[3] == 1.0


def test_margin_bce_refuses_drw():
    with pytest.raises(ConfigError, match="weight them twice"):
        build_loss(dict(CFG, loss="margin_bce", drw_epoch=2), np.array([5, 3]), 10)


# ---- optimisation ----------------------------------------------------------------------------
def test_head_weight_decay_reaches_the_optimizer(demo_cache, tmp_path):
    tr = Trainer(tiny_cfg(epochs=1, weight_decay=0.01, head_weight_decay=0.05), str(demo_cache), str(tmp_path / "r"))
    by_part = {(g["part"], g["weight_decay"]) for g in tr.optimizer.param_groups}
    assert ("backbone", 0.01) in by_part and ("head", 0.05) in by_part
    assert {wd for part, wd in by_part if part == "head"} == {0.05, 0.0}  # biases and norms never decay
    same = param_groups(tr.model, dict(tr.cfg, head_weight_decay=-1.0))
    assert {g["weight_decay"] for g in same if g["part"] == "head"} == {0.01, 0.0}


def test_separate_head_phase_schedule():
    cfg = dict(CFG, epochs=12, head_warmup_epochs=2, head_warmup_lr=1e-3, warmup_epochs=1, lr=1e-4, min_lr=1e-6)
    spe = 10
    # the warm-up and cosine start after the 20 head steps and end at the last step
    assert lr_multiplier(20, cfg, spe) == pytest.approx(1 / 10)
    assert lr_multiplier(29, cfg, spe) == pytest.approx(1.0)
    assert lr_multiplier(119, cfg, spe) == pytest.approx(0.01, abs=2e-3)
    one = dict(cfg, head_warmup_lr=0.0)  # one schedule: its warm-up is over by step 10
    assert lr_multiplier(20, one, spe) < 1.0 and lr_multiplier(9, one, spe) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="head_warmup_epochs is 0"):
        config.resolve([], {"head_warmup_lr": 1e-3})


def test_head_phase_trains_the_head_at_its_constant_lr_and_restarts_the_ema(demo_cache, tmp_path):
    tr = Trainer(tiny_cfg(epochs=2, head_warmup_epochs=1, head_warmup_lr=5e-3, lr=1e-3, ema=True, ema_decay=0.99),
                 str(demo_cache), str(tmp_path / "r"))
    bb0 = {n: p.detach().clone() for n, p in tr.model.backbone.named_parameters()}
    tr._set_lr()
    lrs = {g["part"]: g["lr"] for g in tr.optimizer.param_groups}
    assert lrs == {"backbone": 0.0, "head": 5e-3}
    tr.fit()
    assert tr.ema.steps == tr.steps_per_epoch  # restarted at epoch 2: only its steps are averaged
    moved = [not torch.equal(bb0[n], p) for n, p in tr.model.backbone.named_parameters()]
    assert any(moved)


# ---- frontal-only training ---------------------------------------------------------------------
def test_frontal_only_training_rows(demo_cache):
    cache = open_cache(demo_cache)
    assert cache.has_projection  # the demo has a metadata CSV, as the real data
    all_tr, val = cache.training_rows(dict(CFG))
    fr, val2 = cache.training_rows(dict(CFG, train_projections="frontal"))
    np.testing.assert_array_equal(val, val2)
    assert 0 < len(fr) < len(all_tr)
    assert cache.frontal(fr).all() and not cache.frontal(all_tr).all()


def test_frontal_only_needs_projections(demo_dataset, tmp_path):
    from cxrlt.data.cache_build import build_train_cache

    out = tmp_path / "nometa"
    build_train_cache(demo_dataset / "train.csv", demo_dataset / "images", out, 16, folds=4, seed=0, workers=1)
    with pytest.raises(InputError, match="train_projections frontal needs"):
        open_cache(out).training_rows(dict(CFG, train_projections="frontal"))


# ---- train keys of finished runs ---------------------------------------------------------------------
def test_later_keys_at_their_neutral_value_keep_old_train_keys():
    for key, neutral in config.LATER_KEYS.items():
        assert callable(neutral) or config.DEFAULTS[key] == neutral, key
    old = {k: v for k, v in config.DEFAULTS.items() if k not in config.LATER_KEYS}  # a run from before
    assert config.train_key(old) == config.train_key(config.DEFAULTS)
    assert config.train_key(dict(config.DEFAULTS, rfs_cap=10.0)) != config.train_key(config.DEFAULTS)
    # a CSRA run's key holds csra_normalize (it changed what CSRA computes); another head's does not
    csra = dict(config.DEFAULTS, head="csra")
    old_csra = {k: v for k, v in csra.items() if k not in config.LATER_KEYS}
    assert config.train_key(csra) != config.train_key(old_csra)
    assert config.train_key(dict(config.DEFAULTS, csra_normalize=False)) == config.train_key(config.DEFAULTS)


# ---- the config ----------------------------------------------------------------------------
def test_winner_config_follows_the_released_code():
    cfg = config.resolve(["configs/winner.yaml"])
    assert (cfg["loss"], cfg["sampler"], cfg["rfs_frequency"], cfg["rfs_cap"]) == \
        ("margin_bce", "repeat_factor", "label_share", 10.0)
    assert (cfg["head_warmup_epochs"], cfg["epochs"] - cfg["head_warmup_epochs"]) == (10, 60)
    assert (cfg["lr"], cfg["head_lr"], cfg["weight_decay"], cfg["head_weight_decay"]) == (1.5e-5, 1.5e-4, 0.01, 0.05)
    assert (cfg["tta"], cfg["tta_merge"], cfg["normal_gating_alpha"]) == ("released_medium", "logit", 0.5)


def test_one_epoch_of_the_winner_config(demo_cache, tmp_path):
    from cxrlt.core.fileio import read_jsonl
    from cxrlt.training.trainer import train

    cfg = config.resolve(["configs/winner.yaml"], dict(
        model="test_convnext", pretrained=False, img_size=0, epochs=2, head_warmup_epochs=1, warmup_epochs=0.5,
        batch_size=16, workers=0, device="cpu", ema_decay=0.9, lr=1e-3, head_lr=1e-2, min_lr=1e-5))
    out = tmp_path / "winner"
    res = train(cfg, str(demo_cache), str(out))
    recs = read_jsonl(out / "metrics.jsonl")
    assert len(recs) == 2 and all(np.isfinite(r["train_loss"]) for r in recs)
    assert 0 < res["best_map"] <= 1


@pytest.mark.parametrize("study", ["studies/winner_ablation.yaml", "studies/demo_winner_ablation.yaml"])
def test_ablation_variants_turn_one_lever_off_each(study, tmp_path):
    from cxrlt.studies import spec

    s = spec.load_study(study)
    base = config.resolve(list(s.base))
    assert s.baseline == "winner" and s.variants["winner"] == {}
    for name, over in s.variants.items():
        if name != "winner":
            assert any(base[k] != v for k, v in over.items()), name  # a real change of the recipe


def test_demo_ablation_trains_one_epoch_per_distinct_backbone(demo_cache, tmp_path):
    """The demo ablation's variants, one epoch each (the study's own configs, tiny sizes)."""
    import os

    from conftest import ROOT
    from cxrlt.studies import spec
    from cxrlt.training.trainer import train

    os.chdir(ROOT)
    s = spec.expand("studies/demo_winner_ablation.yaml", tmp_path / "state")
    trained = {}
    for run in s.runs:
        head_epochs = min(1, config.resolve([run["config"]])["head_warmup_epochs"])
        cfg = config.resolve([run["config"]], dict(epochs=2, head_warmup_epochs=head_epochs, batch_size=16,
                                                   workers=0, device="cpu", max_train_batches=3))
        key = config.train_key(cfg)
        if key in trained:  # post-training variants (TTA, gating) share the winner's backbone
            continue
        res = train(cfg, str(demo_cache), str(tmp_path / run["stem"]))
        assert 0 < res["best_map"] <= 1, run["stem"]
        trained[key] = run["stem"]
    assert len(trained) == len(s.variants) - 1  # no_gating reuses the winner's run


def test_winner_head_and_augmentations_are_the_released_ones():
    cfg = config.resolve(["configs/winner.yaml"])
    assert cfg["head"] == "bn_attention"
    assert (cfg["aug_affine_p"], cfg["aug_clahe_p"], cfg["aug_noise_p"], cfg["aug_dropout_p"]) == (0.4, 0.2, 0.15, 0.15)
