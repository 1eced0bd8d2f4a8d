"""The trackers with their real libraries: a 2-epoch run with `logger` set writes the epoch
metrics of metrics.jsonl, read back with each library's own reader (TensorBoard's
EventAccumulator, an MLflow file-store client, W&B's offline run file). tensorboard is in
requirements-dev.txt; mlflow and wandb (requirements-track.txt) are tested where installed.
A tracker whose import fails costs one warning and the run goes on (always tested)."""
import json
import logging
import sys

import pytest

from conftest import tiny_cfg
from cxrlt.core.fileio import read_jsonl
from cxrlt.training.trainer import train

KEYS = ("train_loss", "val_mAP", "lr", "images_per_s")


def _run(demo_cache, out, logger):
    train(tiny_cfg(epochs=2, max_train_batches=2, logger=logger), str(demo_cache), str(out))
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1]
    return recs


def test_tracker_import_failure_is_one_warning_and_the_run_goes_on(demo_cache, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of these now fails
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with caplog.at_level(logging.WARNING, logger="cxrlt"):
        recs = _run(demo_cache, tmp_path / "run", "tensorboard,mlflow")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "cxrlt"]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("logger tensorboard cannot start (ModuleNotFoundError") and "mlflow" in warnings[1]
    assert all("the run goes on" in w for w in warnings)
    assert (tmp_path / "run" / "model.pt").is_file() and len(recs) == 2 and not (tmp_path / "run" / "tb").exists()


def test_tensorboard_event_files_hold_the_epoch_metrics(demo_cache, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (requirements-dev.txt) not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recs = _run(demo_cache, tmp_path / "run", "tensorboard")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    for k in KEYS:
        events = acc.Scalars(k)
        assert [e.step for e in events] == [1, 2]  # epochs shown from 1, as on the console
        assert [e.value for e in events] == pytest.approx([r[k] for r in recs], rel=1e-6)
    assert [e.value for e in acc.Scalars("best_epoch")] == [r["best_epoch"] + 1 for r in recs]
    assert "config" in "".join(acc.Tags()["tensors"])  # the resolved config, as text


def test_mlflow_file_store_holds_the_epoch_metrics(demo_cache, tmp_path):
    pytest.importorskip("mlflow", reason="mlflow (requirements-track.txt) not installed")
    from mlflow.tracking import MlflowClient

    recs = _run(demo_cache, tmp_path / "run", "mlflow")
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "cxrlt"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["lr"] == str(tiny_cfg()["lr"]) and run.info.run_name == "run"
    for k in KEYS:
        hist = sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
        assert [m.step for m in hist] == [1, 2]
        assert [m.value for m in hist] == pytest.approx([r[k] for r in recs], rel=1e-6)


def test_wandb_offline_run_holds_the_epoch_metrics(demo_cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb (requirements-track.txt) not installed")
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recs = _run(demo_cache, tmp_path / "run", "wandb")
    (path,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    ds = datastore.DataStore()
    ds.open_for_scan(str(path))
    history = []
    while True:
        data = ds.scan_data()
        if data is None:
            break
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key: json.loads(i.value_json) for i in rec.history.item})
    assert [h["_step"] for h in history] == [1, 2]
    for k in KEYS:
        assert [h[k] for h in history] == pytest.approx([r[k] for r in recs], rel=1e-6)
