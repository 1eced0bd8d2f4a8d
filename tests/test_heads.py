"""The heads added after the first three: bn_attention (the CXR-LT 2026 winner's), ml_decoder
(ML-Decoder), seed_linear (the reference paper's), and CSRA's normalised scoring (csra_normalize).

Small tensors for the formulas, one tiny training run per head through the real Trainer, then cRT
and TTA prediction of its model."""

import math

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from cxrlt.models.checkpoint import CHECKPOINT_FORMAT
from cxrlt.core import config
from cxrlt.core.fileio import torch_save
from cxrlt.models.model import (BNAttentionHead, CSRAHead, MLDecoderHead, SeedLinearHead, build_head,
                                build_model)
from cxrlt.post.retrain_head import starting_head

F, C = 16, 5
NEW = {"bn_attention": {}, "ml_decoder": {"mld_queries": 2, "mld_dim": 16, "mld_layers": 2},
       "seed_linear": {}, "csra": {}}


def _cfg(head, **kw):
    return config.resolve([], {"head": head, **NEW[head], **kw})


def _head(name, **kw):
    torch.manual_seed(0)
    return build_head(_cfg(name, **kw), F, C)


def _map(b=3, h=3, w=4, seed=1):
    return torch.randn(b, F, h, w, generator=torch.Generator().manual_seed(seed))


# ---- shapes, gradients, fp32 -------------------------------------------------------------------

@pytest.mark.parametrize("name", list(NEW))
def test_head_input_and_logit_shapes(name):
    model = build_model(tiny_cfg(head=name, **NEW[name]), num_classes=C).eval()
    x = model.normalize(torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8))
    feat = model.features(x)
    hin = model.head_input(x)
    assert hin.shape == ((2, model.num_features) if name == "seed_linear" else feat.shape)
    assert model(x).shape == (2, C)


@pytest.mark.parametrize("name", list(NEW))
def test_gradients_reach_every_parameter(name):
    head = _head(name).train()
    head.classify(head.pool(_map())).sum().backward()
    for k, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, k


def test_ml_decoder_queries_are_fixed_and_saved():
    head = _head("ml_decoder")
    assert "queries" not in dict(head.named_parameters())  # not trained (the official code freezes them)
    assert "queries" in head.state_dict() and head.queries.shape == (2, 16)


@pytest.mark.parametrize("name", list(NEW))
def test_logits_are_float32_under_bf16_autocast(name):
    head = _head(name).eval()
    h = head.pool(_map())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        auto = head.classify(h.bfloat16())
    assert auto.dtype == torch.float32
    # computed in float32 from the (bf16-rounded) input: exactly what float32 gives on that input
    with torch.no_grad():
        torch.testing.assert_close(auto, head.classify(h.bfloat16().float()), rtol=1e-6, atol=1e-6)


def test_whole_model_logits_are_float32_under_bf16_autocast():
    model = build_model(tiny_cfg(head="ml_decoder", **NEW["ml_decoder"]), num_classes=C).eval()
    x = model.normalize(torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, feat = model(x), model.features(x)
        assert z.dtype == torch.float32
        torch.testing.assert_close(z, model.head.classify(feat.float()), rtol=1e-6, atol=1e-6)


# ---- formulas ----------------------------------------------------------------------------------

def test_csra_normalised_scores_equal_a_hand_computation():
    head = CSRAHead(2, 2, lam=0.5, temperature=2.0, normalize=True)
    with torch.no_grad():
        head.conv.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]).view(2, 2, 1, 1))  # norms 5 and 2
        head.bias.copy_(torch.tensor([0.25, -0.5]))
    feat = torch.tensor([[[[1.0, 0.0], [3.0, 0.0]], [[0.0, 0.5], [1.0, 1.0]]]])  # (1, 2, 2, 2)
    f = feat[0].flatten(1).T.tolist()  # the 4 locations' features
    want = []
    for w, norm, b in (((3.0, 4.0), 5.0, 0.25), ((0.0, -2.0), 2.0, -0.5)):
        s = [(w[0] * a + w[1] * c) / norm for a, c in f]
        e = [math.exp(2.0 * v) for v in s]
        want.append(sum(s) / 4 + 0.5 * sum(v * x / sum(e) for v, x in zip(s, e)) + b)
    assert head(feat)[0].tolist() == pytest.approx(want, rel=1e-6)
    # the raw form (csra_normalize false) differs; the normalised one ignores each weight's scale
    head.normalize = False
    assert head(feat)[0].tolist() != pytest.approx(want, rel=1e-3)
    head.normalize = True
    with torch.no_grad():
        head.conv.weight.mul_(torch.tensor([7.0, 0.1]).view(2, 1, 1, 1))
    assert head(feat)[0].tolist() == pytest.approx(want, rel=1e-5)


def test_csra_normalize_is_the_default_and_old_configs_read_as_raw(tmp_path):
    from cxrlt.post.inference import load_trained

    assert config.resolve([], {})["csra_normalize"] is True
    old = {k: v for k, v in tiny_cfg(head="csra").items() if k != "csra_normalize"}  # saved before the key
    assert config.check_dict(old, "old")["csra_normalize"] is False
    assert config.check_dict({**old, "csra_normalize": True}, "new")["csra_normalize"] is True
    model = build_model(tiny_cfg(head="csra", csra_normalize=False), num_classes=3)
    torch_save({"format": CHECKPOINT_FORMAT, "config": old, "labels": ["a", "b", "c"], "model": model.state_dict(), "image_size": 64},
               tmp_path / "old.pt")
    loaded, _ = load_trained(tmp_path / "old.pt")
    assert loaded.head.normalize is False
    assert build_model(tiny_cfg(head="csra"), num_classes=3).head.normalize is True


def test_bn_attention_equals_a_hand_computation():
    head = _head("bn_attention", csra_lambda=0.3).eval()
    with torch.no_grad():
        head.bn.running_mean.normal_()
        head.bn.running_var.uniform_(0.5, 2.0)
        head.bn.weight.uniform_(0.5, 1.5)
        head.bn.bias.normal_()
        head.fc.bias.normal_()
    feat = _map(b=2)
    bn = head.bn
    x = (feat - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    x = x * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    W, b, V = head.fc.weight.detach(), head.fc.bias.detach(), head.att.weight.detach().view(C, F)
    want = torch.zeros(2, C)
    for i in range(2):
        loc = x[i].flatten(1).T  # (h*w, F)
        for c in range(C):
            a = torch.softmax(loc @ V[c], dim=0)  # the class's attention over locations
            attended = (a[:, None] * loc).sum(0)
            want[i, c] = W[c] @ loc.mean(0) + b[c] + 0.3 * (W[c] @ attended + b[c])
    with torch.no_grad():
        torch.testing.assert_close(head(feat), want, rtol=1e-5, atol=1e-5)


def test_bn_attention_normalises_the_map_in_training():
    head = _head("bn_attention").train()
    feat = _map(b=8) * 5 + 3
    head(feat)
    assert torch.allclose(head.bn.running_mean, 0.1 * feat.mean(dim=(0, 2, 3)), atol=1e-5)


def test_ml_decoder_group_fc_gives_each_query_its_labels():
    head = MLDecoderHead(F, 5, queries=2, layers=1, dim=16).eval()  # 2 queries, 3 labels each, 5 kept
    assert head.queries.shape == (2, 16) and head.group_weight.shape == (2, 16, 3)
    with torch.no_grad():
        head.bias.normal_()
        feat = _map(b=2)
        h = head.decode(feat)
        z = head(feat)
    for j in range(5):
        q, k = divmod(j, 3)
        torch.testing.assert_close(z[:, j], h[:, q] @ head.group_weight[:, :, k][q] + head.bias[j])
    # queries beyond the label count are not made: one query per label, one output each
    assert MLDecoderHead(F, 5, queries=100, layers=1, dim=16).group_weight.shape == (5, 16, 1)
    with pytest.raises(config.ConfigError, match="multiple of 8"):
        config.resolve([], {"head": "ml_decoder", "mld_dim": 20})


def test_ml_decoder_attends_to_the_map():
    head = MLDecoderHead(F, 3, queries=3, layers=1, dim=16).eval()
    feat = _map(b=1)
    moved = feat.clone()
    moved[:, :, 0, 0] += 5.0  # one location changes: the logits follow
    with torch.no_grad():
        assert not torch.allclose(head(feat), head(moved))
        # a permutation of the locations does not (attention over a set of tokens)
        perm = feat.flatten(2)[:, :, torch.randperm(12, generator=torch.Generator().manual_seed(0))].view_as(feat)
        torch.testing.assert_close(head(feat), head(perm), rtol=1e-5, atol=1e-5)


def test_seed_linear_is_layernorm_dropout_linear():
    head = SeedLinearHead(F, C, dropout=0.5)
    with torch.no_grad():
        head.norm.weight.uniform_(0.5, 1.5)
        head.norm.bias.normal_()
    feat = _map()
    g = feat.mean(dim=(2, 3))
    n = (g - g.mean(1, keepdim=True)) / torch.sqrt(g.var(1, unbiased=False, keepdim=True) + 1e-5)
    n = n * head.norm.weight + head.norm.bias
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(feat), n @ head.fc.weight.T + head.fc.bias, rtol=1e-5, atol=1e-5)
        head.train()
        torch.manual_seed(0)
        a = head(feat)
        assert not torch.allclose(a, head(feat))  # dropout 0.5 is on in training
    assert _head("seed_linear", seed_dropout=0.2).drop.p == 0.2


# ---- cRT re-initialisation ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bn_attention", "ml_decoder", "seed_linear"])
def test_crt_reinit_resets_every_parameter_and_buffer_from_the_seed(name):
    trained = _head(name).train()
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in trained.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3 + 1)
        trained(_map() * 4 + 2)  # BatchNorm statistics move too
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    start = starting_head(trained, reinit=True, seed=7)
    for k, v in start.state_dict().items():
        if v.dtype.is_floating_point:
            assert not torch.allclose(v, before[k]), k  # weights, biases, queries, running statistics
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # a copy: trained unchanged
    again = starting_head(trained, reinit=True, seed=7)
    other = starting_head(trained, reinit=True, seed=8)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in start.state_dict().items())
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in start.state_dict().items())
    if name == "bn_attention":
        assert torch.equal(start.bn.running_mean, torch.zeros(F)) and torch.equal(start.bn.running_var, torch.ones(F))
    if name == "ml_decoder":
        assert not torch.allclose(start.queries, before["queries"])


def test_explain_attention_of_the_bn_attention_head_and_none_for_ml_decoder():
    from cxrlt import explain as X

    model = build_model(tiny_cfg(model="test_resnet", head="bn_attention"), num_classes=3).eval()
    x = model.normalize(torch.randint(0, 255, (1, 1, 64, 64), dtype=torch.uint8))
    att, _ = X.csra_attention(model, x, [0, 2])
    feat = model.features(x)
    with torch.no_grad():
        want = torch.softmax(model.head.att(model.head.bn(feat))[0, 2].flatten(), 0)
    torch.testing.assert_close(att[0, 1].flatten(), want)
    assert X.resolve_method(model, "auto") == "attention"
    mld = build_model(tiny_cfg(model="test_resnet", head="ml_decoder", mld_dim=16), num_classes=3).eval()
    assert X.resolve_method(mld, "auto") == "gradcam"
    with pytest.raises(X.InputError, match="ml_decoder head has no attention map per label.*use gradcam"):
        X.resolve_method(mld, "attention")
    probs, maps = X.class_maps(mld, torch.randint(0, 255, (1, 1, 64, 64), dtype=torch.uint8), [0, 1])
    assert probs.shape == (1, 3) and maps.shape == (1, 2, 2, 2) and np.isfinite(maps).all()


# ---- through the Trainer, cRT and TTA ----------------------------------------------------------

@pytest.mark.parametrize("name", ["bn_attention", "ml_decoder", "seed_linear"])
def test_one_epoch_then_crt_then_tta_prediction(name, demo_cache, tmp_path):
    from cxrlt.data.cache import open_cache
    from cxrlt.data.dataset import CacheDataset, make_loader
    from cxrlt.models.checkpoint import load_checkpoint
    from cxrlt.post.inference import load_trained, predict_tta
    from cxrlt.post.retrain_head import run as run_crt
    from cxrlt.training.trainer import train

    extra = {"ml_decoder": {"mld_queries": 4, "mld_dim": 16}}.get(name, {})  # 4 queries < the labels: group FC
    run = tmp_path / "run"
    res = train(tiny_cfg(head=name, epochs=1, **extra), str(demo_cache), str(run))
    assert 0 < res["best_map"] <= 1
    ck = load_checkpoint(run / "model.pt")
    model, _ = load_trained(run / "model.pt")
    assert type(model.head) is {"bn_attention": BNAttentionHead, "ml_decoder": MLDecoderHead,
                                "seed_linear": SeedLinearHead}[name]
    s = run_crt(run, demo_cache, tmp_path / "crt", {"workers": 0, "device": "cpu", "crt_epochs": 1,
                                                     "crt_batch_size": 32}, log=lambda *_: None)
    assert s["reinit"] and s["head_distance"]["start_to_trained"] > 0.1, s["head_distance"]
    assert s["head_distance"]["end_to_start"] > 0  # the re-initialised head trained
    crt_model, _ = load_trained(tmp_path / "crt" / "model.pt")
    cache = open_cache(demo_cache)
    rows = cache.rows("train", fold=ck["config"]["val_fold"])[:20]
    loader = make_loader(CacheDataset(cache.images_path, rows, num_classes=len(ck["labels"])), 8, workers=0)
    for m in (model, crt_model):
        _, p = predict_tta(m, loader, torch.device("cpu"), "flip_scale", progress=False)
        assert p.shape == (len(rows), len(ck["labels"])) and np.isfinite(p).all() and (p > 0).all()
