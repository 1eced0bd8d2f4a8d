"""Experiment trackers behind one interface: the `logger` run key (none, tensorboard, wandb, mlflow,
comma-separated). Every backend is imported only when chosen, writes offline under the run folder
(TensorBoard event files in RUN/tb, W&B offline in RUN/wandb, an MLflow file store in RUN/mlruns) and
is rank 0's alone. A backend that cannot import or start costs one warning line; the run goes on.

    t = start(run_dir, cfg)             # a Tracker (no-op when logger is none)
    t.log_metrics(step, {"val_mAP": 0.3, ...})
    t.log_text("per_label_ap", markdown)
    t.log_artifact(path)
    t.finish()
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("cxrlt")


def _numbers(metrics: dict) -> dict:
    """The scalar numbers of a metrics record (nested dicts, lists, bools and NaN-as-None left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def _flat(cfg: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.items()}


class _TensorBoard:
    def __init__(self, run_dir: Path, cfg: dict):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        self.w = SummaryWriter(log_dir=str(run_dir / "tb"))
        self.w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(cfg.items())), 0)

    def log_metrics(self, step, m):
        for k, v in m.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def log_text(self, name, text):
        self.w.add_text(name, text, 0)

    def log_artifact(self, path):
        pass  # TensorBoard has no files; the text and scalars carry the numbers

    def finish(self):
        self.w.close()


class _Wandb:
    def __init__(self, run_dir: Path, cfg: dict):
        import wandb
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir), name=run_dir.name, project="cxrlt", config=_flat(cfg),
                              reinit=True)

    def log_metrics(self, step, m):
        self.run.log(m, step=step)

    def log_text(self, name, text):
        self.run.summary[name] = text

    def log_artifact(self, path):
        self.run.save(str(path), base_path=str(Path(path).parent), policy="now")

    def finish(self):
        self.run.finish()
        # finish() hands the last records to W&B's service process; teardown waits for it to write
        # them (an offline run file is complete when the run returns) and stops it
        teardown = getattr(self.wandb, "teardown", None)
        if teardown is not None:
            teardown()


class _MLflow:
    def __init__(self, run_dir: Path, cfg: dict):
        import mlflow
        self.m = mlflow
        # MLflow >= 3.x refuses the file store unless asked for it (it wants a database server);
        # a file store under the run folder is what works offline with mlflow-skinny alone
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment("cxrlt")
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:500] for k, v in cfg.items()})

    def log_metrics(self, step, m):
        self.m.log_metrics(m, step=step)

    def log_text(self, name, text):
        self.m.log_text(text, f"{name}.md")

    def log_artifact(self, path):
        self.m.log_artifact(str(path))

    def finish(self):
        self.m.end_run()


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}


class Tracker:
    """The chosen backends; each call goes to every one that started, a failing one is dropped
    with one warning."""

    def __init__(self, backends: dict):
        self.backends = backends

    def _each(self, what, *args):
        for name, b in list(self.backends.items()):
            try:
                getattr(b, what)(*args)
            except Exception as e:  # a tracker never costs the run
                log.warning(f"logger {name}: {what} failed ({type(e).__name__}: {e}); it is switched off")
                del self.backends[name]

    def log_metrics(self, step: int, metrics: dict) -> None:
        m = _numbers(metrics)
        if m:
            self._each("log_metrics", int(step), m)

    def log_text(self, name: str, text: str) -> None:
        self._each("log_text", name, text)

    def log_artifact(self, path) -> None:
        if Path(path).exists():
            self._each("log_artifact", path)

    def finish(self) -> None:
        self._each("finish")
        self.backends = {}


def start(run_dir, cfg: dict, is_main: bool = True) -> Tracker:
    """The trackers that cfg['logger'] names, started for run_dir (none off rank 0)."""
    names = [n.strip() for n in str(cfg.get("logger", "none")).split(",") if n.strip() not in ("", "none")]
    backends = {}
    if not is_main:
        return Tracker(backends)
    run_dir = Path(run_dir)
    for n in dict.fromkeys(names):
        try:
            backends[n] = BACKENDS[n](run_dir, cfg)
        except Exception as e:
            log.warning(f"logger {n} cannot start ({type(e).__name__}: {e}); the run goes on without it "
                        f"(pip install -r requirements-track.txt)")
    return Tracker(backends)
