"""Model building on timm's tiny test models (no network, pretrained weights from tmp files)."""

import math

import pytest
import timm
import torch

from cxrlt.core import config
from cxrlt.models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from cxrlt.core.errors import ConfigError, InputError
from cxrlt.models.model import CosineHead, CSRAHead, LinearHead, build_model

SIZE = 32


def cfg(**kw):
    c = dict(config.DEFAULTS, model="test_convnext", pretrained=False)
    c.update(kw)
    return c


def images(b=2, size=SIZE):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, 1, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("model", ["test_convnext", "test_efficientnet"])
@pytest.mark.parametrize("head", ["linear", "cosine", "csra"])
def test_output_shapes(model, head):
    m = build_model(cfg(model=model, head=head), num_classes=5).eval()
    x = m.normalize(images())
    with torch.no_grad():
        feats = m.features(x)
        hin = m.head_input(x)
        out = m(x)
    assert feats.dim() == 4 and feats.shape[:2] == (2, m.num_features)
    assert hin.shape == (feats.shape if head == "csra" else (2, m.num_features))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    torch.testing.assert_close(m.head.classify(hin), out)


def test_cosine_head_range_and_value():
    torch.manual_seed(0)
    head = CosineHead(8, 3, scale=4.0)
    x = torch.randn(16, 8) * 100
    out = head.classify(x)
    assert out.abs().max() <= 4.0 + 1e-5
    w = head.weight.detach()
    expected = 4.0 * (x @ w.t()) / (x.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # an input along a class weight hits the top of the range
    assert head.classify(w[1:2] * 3)[0, 1].item() == pytest.approx(4.0, abs=1e-5)


def test_csra_without_attention_is_mean_pooling_linear():
    torch.manual_seed(0)
    csra = CSRAHead(6, 4, lam=0.0, temperature=1.0)
    lin = LinearHead(6, 4)
    with torch.no_grad():
        csra.bias.normal_()
        lin.fc.weight.copy_(csra.conv.weight.view(4, 6))
        lin.fc.bias.copy_(csra.bias)
    feat = torch.randn(3, 6, 5, 4)
    torch.testing.assert_close(csra(feat), lin(feat), rtol=1e-5, atol=1e-5)


def test_csra_matches_hand_computation():
    head = CSRAHead(2, 1, lam=0.5, temperature=1.0)
    with torch.no_grad():
        head.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
        head.bias.fill_(0.25)
    # 2x2 map; per-location score s = f0 - f1 = [1, 0, 2, -1]
    feat = torch.tensor([[[[1.0, 0.0], [3.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]]])
    s = [1.0, 0.0, 2.0, -1.0]
    base = sum(s) / 4
    e = [math.exp(v) for v in s]
    att = sum(v * w / sum(e) for v, w in zip(s, e))
    assert head(feat).item() == pytest.approx(base + 0.5 * att + 0.25, rel=1e-6)
    head.temperature = 99.0  # max pooling
    assert head(feat).item() == pytest.approx(base + 0.5 * 2.0 + 0.25, rel=1e-6)


def test_normalize_three_channels():
    m = build_model(cfg(in_chans=3), 2)
    mean = torch.tensor(m.backbone.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(m.backbone.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = torch.tensor([0, 51, 255, 128], dtype=torch.uint8).view(1, 1, 2, 2)
    out = m.normalize(x)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 2, 2)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    assert "pixel_mean" not in m.state_dict()  # non-persistent: checkpoints carry weights only


def test_normalize_one_channel_uses_mean_of_means():
    m = build_model(cfg(model="test_efficientnet", in_chans=1), 2)
    pc = m.backbone.pretrained_cfg
    x = torch.tensor([10, 200], dtype=torch.uint8).view(1, 1, 1, 2)
    out = m.normalize(x)
    assert out.shape == (1, 1, 1, 2)
    expected = (x.float() / 255 - sum(pc["mean"]) / 3) / (sum(pc["std"]) / 3)
    torch.testing.assert_close(out, expected)
    assert m(m.normalize(images())).shape == (2, 2)


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"unknown model name 'test_convnxt' \(close matches: .*test_convnext"):
        build_model(cfg(model="test_convnxt"), 3)
    with pytest.raises(ConfigError, match=r"no such pretrained tag \(available: test_convnext.r160_in1k"):
        build_model(cfg(model="test_convnext.bogus"), 3)


def test_drop_path_rejected_by_model_without_it():
    with pytest.raises(ConfigError, match="drop_path"):
        build_model(cfg(model="densenet121", drop_path=0.1), 3)


def _save_timm_weights(tmp_path, name="test_convnext", seed=1):
    torch.manual_seed(seed)
    src = timm.create_model(name, pretrained=False)  # full model, classifier included
    path = tmp_path / f"{name}.pth"
    torch.save(src.state_dict(), path)
    return src.state_dict(), path


def test_pretrained_file_loads_backbone_weights(tmp_path):
    src_sd, path = _save_timm_weights(tmp_path)
    m = build_model(cfg(pretrained=True, pretrained_file=str(path)), 4)
    own = m.backbone.state_dict()
    assert set(own) <= set(src_sd)
    for k, v in own.items():
        torch.testing.assert_close(v, src_sd[k], msg=k)
    # grayscale adaptation: the 1-channel stem is the sum of the RGB filters
    m1 = build_model(cfg(pretrained=True, pretrained_file=str(path), in_chans=1), 4)
    stem = "stem.0.weight"
    torch.testing.assert_close(m1.backbone.state_dict()[stem], src_sd[stem].sum(dim=1, keepdim=True))


def test_pretrained_file_errors(tmp_path):
    with pytest.raises(InputError, match="pretrained_file not found"):
        build_model(cfg(pretrained=True, pretrained_file=str(tmp_path / "nope.pth")), 4)
    _, other = _save_timm_weights(tmp_path, "test_resnet")
    with pytest.raises(InputError, match="test_resnet.pth"):
        build_model(cfg(pretrained=True, pretrained_file=str(other)), 4)


def _save_our_checkpoint(model, path, labels):
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "labels": labels, "config": {"model": "test_convnext"}},
               path)


def test_init_checkpoint_replaces_head_when_label_count_differs(tmp_path):
    torch.manual_seed(0)
    old = build_model(cfg(), 5)
    path = tmp_path / "model.pt"
    _save_our_checkpoint(old, path, list("abcde"))
    torch.manual_seed(1)
    new = build_model(cfg(init_checkpoint=str(path)), 7)
    for k, v in old.backbone.state_dict().items():
        torch.testing.assert_close(new.backbone.state_dict()[k], v)
    assert new.head.fc.weight.shape == (7, old.num_features)
    assert not new.init_info["head_loaded"] and new.init_info["backbone_keys"] == len(old.backbone.state_dict())
    # same label set: the head comes along too
    same = build_model(cfg(init_checkpoint=str(path)), 5, labels=list("abcde"))
    assert same.init_info["head_loaded"]
    torch.testing.assert_close(same.head.fc.weight, old.head.fc.weight)
    # same count, other labels: head kept random
    other = build_model(cfg(init_checkpoint=str(path)), 5, labels=list("vwxyz"))
    assert not other.init_info["head_loaded"] and "labels differ" in other.init_info["head_reason"]


def test_init_checkpoint_with_other_backbone_is_refused(tmp_path):
    path = tmp_path / "eff.pt"
    _save_our_checkpoint(build_model(cfg(model="test_efficientnet"), 3), path, list("abc"))
    with pytest.raises(InputError, match="backbone weights do not fit"):
        build_model(cfg(init_checkpoint=str(path)), 3)


class _Pickled:
    """Any custom class makes the file need pickled code to load."""


def test_checkpoint_needing_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    m = build_model(cfg(), 3)
    torch.save({"model": m.state_dict(), "extra": _Pickled()}, path)
    with pytest.raises(InputError, match="refused to load"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="refused to load"):
        build_model(cfg(init_checkpoint=str(path)), 3)


def test_parameter_groups_split_head_and_backbone():
    m = build_model(cfg(head="csra"), 3)
    head_ids = {id(p) for p in m.head_parameters()}
    bb_ids = {id(p) for p in m.backbone_parameters()}
    assert head_ids and bb_ids and not head_ids & bb_ids
    assert head_ids | bb_ids == {id(p) for p in m.parameters()}


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_ldam_model_returns_real_logits_scaled_by_s(head):
    # the head holds LDAM's s: the model's output is s times the raw scores, which a model
    # built for another loss returns from the same weights
    torch.manual_seed(0)
    raw = build_model(cfg(head=head, loss="bce"), 3)
    ldam = build_model(cfg(head=head, loss="ldam", ldam_s=7.0), 3)
    ldam.load_state_dict(raw.state_dict())
    assert raw.logit_scale == 1.0 and ldam.logit_scale == 7.0
    x = raw.normalize(images())
    assert torch.allclose(ldam(x), 7.0 * raw(x), atol=1e-5)
    assert torch.allclose(ldam.head.classify(ldam.head_input(x)), ldam(x))
    assert "logit_scale" not in " ".join(ldam.state_dict())  # a constant of the config, not a weight


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    from cxrlt.models.losses import build_loss

    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        m = build_model(cfg(grad_checkpointing=on, drop_path=0.1), 3).train()
        assert all(s.grad_checkpointing == on for s in m.backbone.stages)
        y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        torch.manual_seed(1)  # the same drop-path draws in both runs (checkpointing replays them)
        loss = build_loss(cfg(loss="bce"), [5, 5, 5], 10)(m(m.normalize(images())), y)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5) for n in g0)


@pytest.mark.parametrize("head,loss", [("linear", "bce"), ("cosine", "ldam"), ("csra", "ldam")])
def test_head_logits_stay_fp32_under_bf16_autocast(head, loss):
    # Under autocast the backbone may run in bf16, but the head must score fp32 features in fp32:
    # bf16 logits keep only a few hundred distinct values per label (and LDAM's s scales the error).
    torch.manual_seed(0)
    m = build_model(cfg(head=head, loss=loss), num_classes=4).eval()
    shape = (512, m.num_features, 2, 2) if head == "csra" else (512, m.num_features)
    h = torch.randn(*shape).to(torch.bfloat16)  # what a bf16 backbone hands the head
    with torch.no_grad():
        ref = m.head.classify(h.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m.head.classify(h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for k in range(4):
        assert got[:, k].unique().numel() == ref[:, k].unique().numel()


def test_whole_model_under_bf16_autocast_keeps_distinct_logits():
    # the same model under CPU bf16 autocast: as many distinct values per label as in fp32
    torch.manual_seed(0)
    m = build_model(cfg(head="cosine", loss="ldam"), num_classes=3).eval()
    x = m.normalize(images(b=64))
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(x)
    assert got.dtype == torch.float32
    for k in range(3):
        assert got[:, k].unique().numel() == ref[:, k].unique().numel() == 64
