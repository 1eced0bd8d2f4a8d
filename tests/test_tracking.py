"""The `logger` key: validated, backends started only when chosen, a failing one costs a warning."""
import logging

import pytest

from cxrlt.core import config
from cxrlt.core.errors import ConfigError
from cxrlt.training import tracking


def test_logger_key_accepts_lists_and_refuses_unknown():
    assert config.coerce("logger", "tensorboard,mlflow", "x.yaml") == "tensorboard,mlflow"
    with pytest.raises(ConfigError, match="x.yaml.*logger.*tensorbord"):
        config.coerce("logger", "tensorbord", "x.yaml")
    assert config.group("logger") == "run"


class _Rec:
    def __init__(self, run_dir, cfg):
        self.cfg, self.steps, self.done = cfg, [], False

    def log_metrics(self, step, m):
        self.steps.append((step, m))

    def log_text(self, name, text):
        pass

    def log_artifact(self, path):
        pass

    def finish(self):
        self.done = True


def test_chosen_backend_gets_numbers_and_none_gets_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", _Rec)
    t = tracking.start(tmp_path, {"logger": "tensorboard", "lr": 1e-3})
    rec = t.backends["tensorboard"]
    t.log_metrics(0, {"val_mAP": 0.25, "val_ap": {"a": 1.0}, "drw_active": True, "x": float("nan")})
    t.finish()
    assert rec.steps == [(0, {"val_mAP": 0.25})] and rec.done
    assert tracking.start(tmp_path, {"logger": "none"}).backends == {}
    assert tracking.start(tmp_path, {"logger": "tensorboard"}, is_main=False).backends == {}


def test_backend_that_cannot_start_is_one_warning(tmp_path, monkeypatch, caplog):
    def broken(run_dir, cfg):
        raise ImportError("No module named 'wandb'")
    monkeypatch.setitem(tracking.BACKENDS, "wandb", broken)
    with caplog.at_level(logging.WARNING, logger="cxrlt"):
        t = tracking.start(tmp_path, {"logger": "wandb"})
        t.log_metrics(1, {"loss": 1.0})
        t.finish()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "wandb" in warnings[0].getMessage()
