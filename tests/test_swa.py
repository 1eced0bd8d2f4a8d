"""SWA of the last k epochs' weights (cxrlt/training/swa.py and its use in the trainer)."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn

from conftest import tiny_cfg
from cxrlt.evaluation.metrics import score
from cxrlt.models.checkpoint import load_checkpoint
from cxrlt.post.inference import load_trained
from cxrlt.training.swa import SWA, batchnorms, recompute_bn, window
from cxrlt.training.trainer import Trainer


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_swa_is_the_equal_weight_mean_of_the_window_epochs():
    nets = [_net(s) for s in range(5)]
    swa = SWA(3)
    assert list(window(5, 3)) == [2, 3, 4]
    added = [swa.add(n, e, 5) for e, n in enumerate(nets)]
    assert added == [False, False, True, True, True] and swa.epochs == [2, 3, 4]
    avg = swa.averaged(nets[0]).state_dict()
    for k, v in avg.items():
        if v.dtype.is_floating_point:
            want = torch.stack([nets[e].state_dict()[k] for e in (2, 3, 4)]).mean(0)
            assert torch.allclose(v, want, atol=1e-6), k
    # a state dict round trip (last.pt) continues the same mean; a moved window starts again
    again = SWA(3)
    again.load_state_dict(swa.state_dict())
    assert again.epochs == [2, 3, 4]
    assert again.add(nets[1], 6, 8) and again.epochs == [6]  # epochs raised to 8: the window is 5-7
    assert torch.equal(again.mean["4.weight"], nets[1].state_dict()["4.weight"])


def test_recompute_bn_averages_the_batches_statistics():
    net = _net(0).eval()  # as the SWA copy is
    batches = [torch.randn(16, 1, 8, 8) * (1 + i) + i for i in range(3)]
    with torch.no_grad():
        feats = [net[0](b) for b in batches]
    assert recompute_bn(net, batches) == 3
    bn = net[1]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4)
    assert bn.momentum == 0.1 and not net.training
    assert recompute_bn(nn.Linear(2, 2), [torch.randn(2, 2)]) == 0  # no BatchNorm: nothing to do


@pytest.mark.slow
@pytest.mark.parametrize("swa_model", ["swa", "best", "compare"])
def test_trainer_writes_swa_pt_the_mean_of_the_last_epochs_with_recomputed_bn(demo_cache, tmp_path, swa_model):
    cfg = tiny_cfg(model="test_resnet", epochs=3, swa_epochs=2, swa_model=swa_model, max_train_batches=4)
    out = tmp_path / "run"
    tr = Trainer(cfg, str(demo_cache), str(out))
    assert batchnorms(tr.model)
    states, train_epoch = [], tr.train_epoch

    def record(epoch):
        stats = train_epoch(epoch)
        states.append({k: v.detach().clone() for k, v in tr.model.state_dict().items()})
        return stats

    tr.train_epoch = record
    tr.fit()
    swa = load_checkpoint(out / "swa.pt")
    assert swa["swa"]["epochs"] == [1, 2] and swa["swa"]["bn_batches"] == 4
    bn_stats = {k for k in swa["model"] if k.endswith(("running_mean", "running_var"))}
    assert bn_stats
    mean = {k: (states[1][k].float() + states[2][k].float()) / 2 if v.dtype.is_floating_point else states[2][k]
            for k, v in states[2].items()}
    for k, v in swa["model"].items():
        if not v.dtype.is_floating_point:
            continue
        if k in bn_stats:  # recomputed with the averaged weights: not the mean of the epochs' statistics
            assert not torch.allclose(v.float(), mean[k], atol=1e-6), k
        else:
            assert torch.allclose(v.float(), mean[k], atol=1e-6), k
    # the statistics are torch's update_bn over the last epoch's training batches with the averaged weights
    ref = copy.deepcopy(tr.model)
    ref.load_state_dict(mean)
    update_bn(list(tr._bn_batches(2)), ref)
    for k in bn_stats:
        assert torch.allclose(swa["model"][k], ref.state_dict()[k], rtol=1e-4, atol=1e-5), k
    # swa.pt loads like any checkpoint, and its recorded val mAP is that of its weights
    loaded, _ = load_trained(out / "swa.pt")
    assert score(tr.y_val, tr.validate(loaded))["mAP"] == pytest.approx(swa["swa"]["val_mAP"], abs=1e-6)
    r = swa["swa"]
    chosen = {"swa": True, "best": False, "compare": r["val_select_mAP"] >= r["best_epoch_select_mAP"]}[swa_model]
    assert r["chosen"] == chosen
    model = load_checkpoint(out / "model.pt")
    picked = swa if chosen else load_checkpoint(out / "best.pt")
    assert all(torch.equal(model["model"][k], picked["model"][k]) for k in picked["model"])
    assert (model.get("selection", {}).get("weights") == "swa") == chosen
    run = json.loads((out / "run.json").read_text())
    assert run["swa"] == r and r["val_mAP"] is not None


@pytest.mark.slow
def test_swa_off_writes_no_swa_pt(demo_cache, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_cfg(epochs=1, max_train_batches=2), str(demo_cache), str(out)).fit()
    assert not (out / "swa.pt").exists() and "swa" not in json.loads((out / "run.json").read_text())


@pytest.mark.slow
def test_a_run_killed_between_its_last_epoch_and_swa_pt_finishes_swa_on_resume(demo_cache, tmp_path):
    cfg = tiny_cfg(epochs=2, swa_epochs=2, swa_model="swa", max_train_batches=2)
    out = tmp_path / "run"
    Trainer(cfg, str(demo_cache), str(out)).fit()
    want = load_checkpoint(out / "swa.pt")
    (out / "swa.pt").unlink()
    (out / "model.pt").unlink()  # as if killed after the last epoch's last.pt
    Trainer(cfg, str(demo_cache), str(out), resume=True).fit()
    got = load_checkpoint(out / "swa.pt")
    assert got["swa"] == want["swa"] and all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    assert load_checkpoint(out / "model.pt")["swa"]["epochs"] == [0, 1]
