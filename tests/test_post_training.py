"""retrain_head.py (cRT, tau-norm) and predict.py (TTA) on a small trained demo run."""

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_script, run_script_inprocess, tiny_cfg
from cxrlt.data.cache import open_cache
from cxrlt.models.checkpoint import load_checkpoint
from cxrlt.data.dataset import CacheDataset, make_loader
from cxrlt.post.inference import load_trained, predict_tta
from cxrlt.training.trainer import train


@pytest.fixture(scope="module")
def trained_run(demo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ldam"
    train(tiny_cfg(epochs=3, loss="ldam", head="cosine", drw_epoch=2, crt_epochs=4), str(demo_cache), str(out))
    return out


def _digest(folder):
    """sha256 of each file in folder (new files may appear beside: fingerprint caches, output locks)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow  # an end-to-end run: make test runs it, make test-fast skips it
def test_crt_writes_beside_the_run_and_never_loses_val_map(trained_run, demo_cache, tmp_path):
    before = _digest(trained_run)
    cfg = tmp_path / "current.yaml"  # as Make passes it: the post keys come from here, not from the run
    cfg.write_text("crt_epochs: 2\ncrt_lr: 0.01\n")
    p = run_script("retrain_head.py", "--run", trained_run, "--cache", demo_cache, "--out", trained_run / "crt",
                   "--config", cfg, "--workers", "0", "--epochs", "7")
    after = _digest(trained_run)
    assert {k: after[k] for k in before} == before  # the backbone run's files are untouched
    ck = load_checkpoint(trained_run / "crt" / "model.pt")
    src = load_checkpoint(trained_run / "model.pt")
    # the head kept is never worse than the source run's on the selection set (the demo: the proxy)
    s = ck["crt"]
    assert s["select_on"] == "proxy" and s["val_select_mAP"] >= s["original"]["val_select_mAP"]
    assert s["original"]["val_proxy_mAP"] == pytest.approx(src["selection"]["val_proxy_mAP"], abs=1e-6)
    assert 0 < s["val_honest_mAP"] <= 1 and s["val_proxy_mAP"] == s["best"]["val_proxy_mAP"]
    assert ck["crt"]["original_mAP"] == pytest.approx(src["best_map"], abs=1e-6)  # float32 features: exact
    assert (ck["config"]["crt_epochs"], ck["config"]["crt_lr"]) == (2, 0.01) and src["config"]["crt_epochs"] == 4
    assert "ignoring train keys given on the command line (the run's values apply): epochs" in p.stdout
    assert len((trained_run / "crt" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (trained_run / "crt" / "features_train.npy").exists()
    # backbone weights are the source run's, bit for bit
    for k, v in src["model"].items():
        if k.startswith("backbone."):
            assert torch.equal(v, ck["model"][k]), k


def test_crt_refuses_to_write_into_the_run(trained_run, demo_cache):
    p = run_script("retrain_head.py", "--run", trained_run, "--cache", demo_cache, "--out", trained_run, check=False)
    assert p.returncode == 2 and "never writes into the backbone run folder" in p.stderr


@pytest.mark.slow  # an end-to-end run: make test runs it, make test-fast skips it
def test_predict_writes_leaderboard_format(trained_run, demo_cache, demo_test_cache, demo_dataset, tmp_path):
    out = tmp_path / "pred_test.csv"
    run_script("predict.py", "--checkpoint", trained_run / "model.pt", "--cache", demo_test_cache, "--split", "test",
               "--out", out, "--workers", "0", "--tta", "flip_scale")
    df = pd.read_csv(out)
    cache = open_cache(demo_cache)
    assert list(df.columns) == ["ImageID", *cache.labels]
    test_ids = pd.read_csv(demo_dataset / "CXRLT_2026_TEST_ALL_TASK1.csv", usecols=[0])["ImageID"]
    assert sorted(df["ImageID"]) == sorted(test_ids)
    vals = df[cache.labels].to_numpy()
    assert np.isfinite(vals).all() and vals.min() >= 0 and vals.max() <= 1


def test_val_prediction_reports_postprocessing_grid(trained_run, demo_cache, tmp_path, capsys):
    import json

    out = tmp_path / "pred_val.csv"
    code, stdout, err = run_script_inprocess(capsys, "predict.py", "--checkpoint", trained_run / "model.pt", "--cache",
                                             demo_cache, "--split", "val", "--out", out, "--workers", "0", "--tta", "none")
    assert code == 0, err
    info = json.loads(open(str(out) + ".postproc.json").read())
    sel = info["select_on"]
    assert info["chosen"][sel] >= info["raw"][sel]  # chosen on the selection set
    assert {"full", "proxy", "half_a", "half_b"} <= set(info["grid"][0]) and len(info["grid"]) >= 24
    assert info["sets"]["half_a"] + info["sets"]["half_b"] == info["sets"][sel]
    assert "honest (cross-fitted" in stdout and "selection on proxy" in stdout  # the demo has projections
    assert "reported only, not applied" in stdout  # without --apply-choice (POSTPROC=off)
    # the full-fold mAP predict.py reports equals the trainer's val mAP for the same weights (no TTA)
    assert info["raw"]["full"] == pytest.approx(load_checkpoint(trained_run / "model.pt")["best_map"], abs=1e-5)


def test_postproc_from_applies_the_val_choice_to_test_predictions(trained_run, demo_test_cache, tmp_path, capsys):
    import json

    from cxrlt.post.postproc import Context, normal_gating
    from cxrlt.evaluation.selection import val_keys

    raw, gated = tmp_path / "raw.csv", tmp_path / "gated.csv"
    choice = tmp_path / "pred_val.csv.postproc.json"
    choice.write_text(json.dumps({"choice": {"normal_gating_alpha": 2.0, "study_pool_weight": 0.0,
                                             "patient_context_weight": 0.0}}))
    common = ["--checkpoint", trained_run / "model.pt", "--cache", demo_test_cache, "--split", "test", "--workers", "0",
              "--tta", "none"]
    assert run_script_inprocess(capsys, "predict.py", *common, "--out", raw)[0] == 0
    assert run_script_inprocess(capsys, "predict.py", *common, "--out", gated, "--postproc-from", choice)[0] == 0
    a, b = pd.read_csv(raw), pd.read_csv(gated)
    labels = list(a.columns[1:])
    expected = normal_gating(a[labels].to_numpy(), labels, 2.0)
    assert not np.allclose(a[labels].to_numpy(), b[labels].to_numpy(), atol=1e-4)
    assert np.allclose(b[labels].to_numpy(), expected, atol=2e-6)
    # patient context on the test list: the training labels come from the sibling train cache
    choice.write_text(json.dumps({"choice": {"normal_gating_alpha": 0.0, "study_pool_weight": 0.0,
                                             "patient_context_weight": 0.5}}))
    ctx = tmp_path / "ctx.csv"
    # refused unless the user opts in to linking test images to training patients (docs/rules.md)
    code, _out, err = run_script_inprocess(capsys, "predict.py", *common, "--out", ctx, "--postproc-from", choice)
    assert code == 2 and "allow_patient_linking: true" in err and not ctx.exists()
    assert run_script_inprocess(capsys, "predict.py", *common, "--out", ctx, "--postproc-from", choice,
                                "--allow_patient_linking", "true")[0] == 0
    c = pd.read_csv(ctx)
    test_cache = open_cache(demo_test_cache)
    keys = val_keys(test_cache, test_cache.rows("test"))
    train = open_cache(demo_test_cache.parent / "train")
    mean, has = Context.from_cache(train, csv_patient=True).mean_labels(keys.patient, keys.study)
    # the test images' patients are the test list's own PatientID, never META_CSV's (docs/rules.md)
    assert not set(keys.patient) & set(train.patient_keys(train.rows()))
    assert 0 < has.sum() < len(has)  # the demo's test patients with earlier training studies
    assert list(c["ImageID"]) == list(keys.ids)
    q = a[labels].to_numpy()
    assert np.allclose(c[labels].to_numpy()[~has], q[~has], atol=2e-6)
    assert np.allclose(c[labels].to_numpy()[has], 0.5 * q[has] + 0.5 * mean[has], atol=2e-6)


def test_flip_tta_is_invariant_to_flipping_the_input(trained_run, demo_cache, tmp_path):
    model, _ = load_trained(trained_run / "model.pt")
    imgs = np.load(demo_cache / "images.npy")[:12]
    np.save(tmp_path / "a.npy", imgs)
    np.save(tmp_path / "b.npy", np.ascontiguousarray(imgs[:, :, ::-1]))
    res = []
    for f in ("a.npy", "b.npy"):
        loader = make_loader(CacheDataset(tmp_path / f, np.arange(12), num_classes=30), 6, workers=0)
        res.append(predict_tta(model, loader, torch.device("cpu"), "flip", progress=False)[1])
    assert np.allclose(res[0], res[1], atol=1e-5)
    loader = make_loader(CacheDataset(tmp_path / "a.npy", np.arange(12), num_classes=30), 6, workers=0)
    none = predict_tta(model, loader, torch.device("cpu"), "none", progress=False)[1]
    assert not np.allclose(none, res[0], atol=1e-5)  # the flip view really contributes


@pytest.mark.slow  # an end-to-end run: make test runs it, make test-fast skips it
def test_predict_reads_post_keys_from_the_current_config_and_settles(trained_run, demo_test_cache, tmp_path):
    """Make passes the config file: its post keys apply (not the checkpoint's copy), train keys are
    ignored, and a re-run with the same inputs only touches the output."""
    import os

    from cxrlt.pipeline.fingerprints import recorded_inputs

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("tta: none\nworkers: 0\n")
    out = tmp_path / "pred.csv"
    args = ["predict.py", "--checkpoint", trained_run / "model.pt", "--cache", demo_test_cache, "--split", "test",
            "--out", out, "--config", cfg, "--epochs", "7"]
    first = run_script(*args)
    assert "ignoring train keys" in first.stdout + first.stderr and "epochs" in first.stdout + first.stderr
    assert recorded_inputs(out)["post"]["tta"] == "none"
    content, t = out.read_bytes(), out.stat().st_mtime_ns
    os.utime(out, ns=(t - 10**9, t - 10**9))
    again = run_script(*args)
    assert "up to date" in again.stdout and out.read_bytes() == content
    assert out.stat().st_mtime_ns > t - 10**9  # touched, so that make settles
    cfg.write_text("tta: flip\nworkers: 0\n")
    run_script(*args)
    assert recorded_inputs(out)["post"]["tta"] == "flip"


def test_crt_method_none_from_the_config_keeps_the_runs_own_head(trained_run, demo_cache, tmp_path):
    """A study's "no post-training" variant: crt_method none in the current config writes the run's
    model unchanged as the head stage's output (and the config's choice is what counts)."""
    from cxrlt.post.retrain_head import run

    cfg = tmp_path / "none.yaml"
    cfg.write_text("crt_method: none\nworkers: 0\n")
    s = run(trained_run, demo_cache, tmp_path / "none", {}, config_files=[cfg], log=lambda *_: None)
    src, out = load_checkpoint(trained_run / "model.pt"), load_checkpoint(tmp_path / "none" / "model.pt")
    assert s["method"] == "none" and out["config"]["crt_method"] == "none"
    sel = src["selection"]  # the run's own numbers: how it chose its epoch, and the honest value of that
    assert (s["select_on"], s["val_proxy_mAP"], s["val_honest_mAP"]) == (sel["select_on"], sel["val_proxy_mAP"],
                                                                       sel["val_honest_mAP"])
    assert all(torch.equal(v, out["model"][k]) for k, v in src["model"].items())
    assert not (tmp_path / "none" / "features_train.npy").exists()
