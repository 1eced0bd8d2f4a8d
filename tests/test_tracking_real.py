"""The trackers with their real libraries: a 2-epoch run with `logger` set writes the epoch
metrics of metrics.jsonl, read back with each library's own reader (TensorBoard's
EventAccumulator, an MLflow file-store client, W&B's offline run file). tensorboard is in
requirements-dev.txt; mlflow and wandb (requirements-track.txt) are tested where installed.
A tracker whose import fails costs one warning and the run goes on (always tested)."""
import json
import logging
import struct
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


def _wandb_records(path) -> list[bytes]:
    """The protobuf records of a W&B offline run file (run-*.wandb: a ':W&B' header, then LevelDB-log
    blocks of 32 KiB whose chunks are FULL (1) or FIRST/MIDDLE/LAST (2/3/4) pieces of one record).
    wandb >= 0.2x reads it in its Go core only; the records are parsed with wandb's own protobuf."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero tail
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(buf)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_epoch_metrics(demo_cache, tmp_path, monkeypatch):
    from wandb.proto import wandb_internal_pb2

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recs = _run(demo_cache, tmp_path / "run", "wandb")
    (path,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for data in _wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "run" and rec.run.config.update:
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    assert [h["_step"] for h in history] == [1, 2]
    for k in KEYS:
        assert [h[k] for h in history] == pytest.approx([r[k] for r in recs], rel=1e-6)
    assert config["lr"] == {"value": tiny_cfg()["lr"]} or config["lr"] == tiny_cfg()["lr"]
