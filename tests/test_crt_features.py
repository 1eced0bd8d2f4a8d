"""cRT's head inputs: cached on disk (float32 / float16) or recomputed every epoch, keyed by fingerprints.

One small CSRA run (timm's test_vit: its head input is a (64, 1, 4) token map at 32 px), on raw
scores (csra_normalize false), the form tau-normalisation applies to.
"""

import json
import os

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from cxrlt.models.checkpoint import load_checkpoint
from cxrlt.post.retrain_head import run as run_crt
from cxrlt.post.retrain_head import tau_normalise
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import torch_save
from cxrlt.post.inference import load_trained
from cxrlt.training.trainer import train


@pytest.fixture(scope="module")
def csra_run(demo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("crt_features") / "csra"
    train(tiny_cfg(model="test_vit", head="csra", csra_lambda=1.0, csra_normalize=False, epochs=2, crt_epochs=2, crt_batch_size=32),
          str(demo_cache), str(out))
    return out


def _crt(run, cache, out, log=None, **over):
    said = []
    s = run_crt(run, cache, out, {"workers": 0, "device": "cpu", **over}, log=said.append if log is None else log)
    return s, said


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _head_state(path):
    return {k: v for k, v in load_checkpoint(path)["model"].items() if k.startswith("head.")}


def test_feature_cache_off_trains_the_same_head_as_the_float32_cache(csra_run, demo_cache, tmp_path):
    cached, said = _crt(csra_run, demo_cache, tmp_path / "f32", crt_feature_cache="float32", crt_lr=0.05)
    off, said_off = _crt(csra_run, demo_cache, tmp_path / "off", crt_feature_cache="off", crt_lr=0.05)
    assert (cached["feature_cache"], off["feature_cache"]) == ("float32", "off")
    assert cached["head_input"] == off["head_input"] == [64, 1, 4]
    f = np.load(tmp_path / "f32" / "features_train.npy", mmap_mode="r")
    assert f.dtype == np.float32 and f.shape[1:] == (64, 1, 4)
    assert not list((tmp_path / "off").glob("features_*"))  # off: nothing on disk
    assert any("crt_feature_cache off: the frozen backbone runs every cRT epoch" in x for x in said_off)
    # the same head epochs on the same inputs: the same curve and the same head
    a, b = _jsonl(tmp_path / "f32" / "metrics.jsonl"), _jsonl(tmp_path / "off" / "metrics.jsonl")
    assert len(a) == 2 and [r["val_mAP"] for r in a] == pytest.approx([r["val_mAP"] for r in b], abs=1e-6)
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-5)
    ha, hb = _head_state(tmp_path / "f32" / "model.pt"), _head_state(tmp_path / "off" / "model.pt")
    assert all(torch.allclose(ha[k], hb[k], atol=1e-5) for k in ha)
    # float32 features reproduce the run's val mAP with its own head
    assert cached["original_mAP"] == pytest.approx(load_checkpoint(csra_run / "model.pt")["best_map"], abs=1e-6)


def test_auto_caches_maps_in_float16(csra_run, demo_cache, tmp_path):
    s, said = _crt(csra_run, demo_cache, tmp_path / "auto")
    assert s["feature_cache"] == "float16"
    assert any("map head inputs 64x1x4; crt_feature_cache auto -> float16 cache on disk" in x for x in said)
    tr = np.load(tmp_path / "auto" / "features_train.npy", mmap_mode="r")
    va = np.load(tmp_path / "auto" / "features_val.npy", mmap_mode="r")
    assert tr.dtype == va.dtype == np.float16 and tr.shape[1:] == (64, 1, 4)
    assert s["original_mAP"] == pytest.approx(load_checkpoint(csra_run / "model.pt")["best_map"], abs=0.02)


def test_features_are_reused_only_for_the_same_weights_and_rows(csra_run, demo_cache, tmp_path):
    out = tmp_path / "crt"
    _crt(csra_run, demo_cache, out, crt_feature_cache="float32")
    feats = np.load(out / "features_train.npy")
    # another crt_* key: the head is re-trained, the features are reused
    s, said = _crt(csra_run, demo_cache, out, crt_feature_cache="float32", crt_epochs=1)
    assert "cRT features: features_train.npy matches the weights and rows: reused" in said
    assert len(_jsonl(out / "metrics.jsonl")) == 1
    # other backbone weights in the run: the features are extracted again
    other = tmp_path / "other_run"
    other.mkdir()
    ck = load_checkpoint(csra_run / "model.pt")
    ck["model"] = {k: (v * 1.5 if k.startswith("backbone.") and v.is_floating_point() else v)
                   for k, v in ck["model"].items()}
    torch_save(ck, other / "model.pt")
    s, said = _crt(other, demo_cache, out, crt_feature_cache="float32", crt_epochs=1)
    assert ("cRT features: features_train.npy was computed from other weights, rows or precision: re-extracting"
            in said)
    assert not np.allclose(np.load(out / "features_train.npy"), feats)
    # and a float16 request does not read the float32 file
    s, said = _crt(other, demo_cache, out, crt_feature_cache="float16", crt_epochs=1)
    assert np.load(out / "features_train.npy", mmap_mode="r").dtype == np.float16


def test_an_up_to_date_output_is_only_touched(csra_run, demo_cache, tmp_path):
    out = tmp_path / "crt"
    first, _ = _crt(csra_run, demo_cache, out, crt_epochs=1)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    old = os.stat(out / "model.pt").st_mtime_ns
    os.utime(out / "model.pt", ns=(old - 10**9, old - 10**9))
    again, said = _crt(csra_run, demo_cache, out, crt_epochs=1)
    assert said == [f"{out / 'model.pt'}: up to date (same weights, cache and crt_* keys)"]
    assert again == first
    assert os.stat(out / "model.pt").st_mtime_ns > old  # touched, so that make settles
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    _, said = _crt(csra_run, demo_cache, out, crt_epochs=2)  # a crt_* key changed: built again
    assert not any("up to date" in x for x in said) and len(_jsonl(out / "metrics.jsonl")) == 2
    s, said = _crt(csra_run, demo_cache, out, crt_epochs=2, select_on="full")  # so does the selection set
    assert not any("up to date" in x for x in said) and s["select_on"] == "full"
    assert any("the backbone run chose its best epoch on proxy" in x for x in said)


def test_tau_on_a_csra_head_keeps_the_best_tau_of_the_grid(csra_run, demo_cache, tmp_path):
    s = run_crt(csra_run, demo_cache, tmp_path / "tau", {"workers": 0, "device": "cpu",
                                                         "crt_feature_cache": "float32"}, method="tau",
                log=lambda *_: None)
    assert [g["tau"] for g in s["grid"]][0] == 0.0 and s["original_mAP"] == s["grid"][0]["val_mAP"]
    # kept on the selection set (the demo knows projections: the proxy), the honest number beside it
    assert s["select_on"] == "proxy" and s["best"]["val_select_mAP"] == max(g["val_select_mAP"] for g in s["grid"])
    assert s["best"]["val_select_mAP"] == s["best"]["val_proxy_mAP"] and 0 < s["val_honest_mAP"] <= 1
    assert s["val_mAP"] == pytest.approx(s["best"]["val_mAP"], abs=1e-6)
    model, _ = load_trained(csra_run / "model.pt")
    want = tau_normalise(model.head, s["best"]["tau"]).state_dict()
    got = _head_state(tmp_path / "tau" / "model.pt")
    assert all(torch.allclose(got[f"head.{k}"], v) for k, v in want.items())


def test_tau_on_a_cosine_head_is_refused_before_any_work(demo_cache, csra_run, tmp_path):
    run = tmp_path / "cos"
    run.mkdir()
    ck = load_checkpoint(csra_run / "model.pt")
    ck["config"] = {**ck["config"], "head": "cosine"}
    torch_save(ck, run / "model.pt")
    with pytest.raises(InputError, match="--method tau: the cosine head normalises every class weight"):
        run_crt(run, demo_cache, tmp_path / "out", {"workers": 0}, method="tau", log=lambda *_: None)
    assert not (tmp_path / "out" / "model.pt").exists()
