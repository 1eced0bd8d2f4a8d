"""Shared fixtures: one small synthetic dataset + cache, built once per test session.

pytest-xdist runs several worker processes; the first one to get the lock builds the data under
the session's base temp folder and the others reuse it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_SIZE = 32

# pytest-xdist runs one worker per core: each worker gets one torch thread, or the two
# workers' OpenMP pools fight over the cores and everything runs 10x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


def pytest_configure(config):
    # `make test` (CI) runs everything; `make test-fast` skips these for a developer's loop
    config.addinivalue_line("markers", "slow: takes more than ~10 s (end-to-end make runs, training)")


def _shared_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by all xdist workers of this session
    return base


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """A small demo dataset in the CXR-LT 2026 layout (200 train / 40 test images)."""
    from cxrlt.synth import generate

    base = _shared_dir(tmp_path_factory)
    out = base / "demo_small"
    with FileLock(str(base / "demo_small.lock")):
        if not (out / "train.csv").exists():
            generate(out, n_train=200, n_test=40, seed=1, min_side=64, max_side=128)
    return out


def build_caches(data: Path, root: Path, size: int, folds: int = 4, workers: int = 1, **kw) -> tuple[Path, Path]:
    """The train cache and the test cache of a demo-layout dataset in cache root `root`, with its
    metadata CSV when it has one (as `make demo` does) -> (train cache folder, test cache folder)."""
    from cxrlt.data import identity
    from cxrlt.data.cache_build import build_test_cache, build_train_cache

    test_csv = data / "CXRLT_2026_TEST_ALL_TASK1.csv"
    meta = data / "padchest_metadata.csv"
    meta = meta if meta.is_file() else None
    train, test = root / "train", root / f"test-{identity.test_cache_key(test_csv, meta)}"
    build_train_cache(data / "train.csv", data / "images", train, size, removal_csv=data / "Removal.csv",
                      meta_csv=meta, folds=folds, seed=0, workers=workers, **kw)
    build_test_cache(test_csv, data / "images", test, size, meta_csv=meta, workers=workers, **kw)
    return train, test


@pytest.fixture(scope="session")
def demo_recipe_run(tmp_path_factory) -> dict:
    """The real demo recipe (configs/demo.yaml: test_resnet, cosine head, LDAM-DRW, 15 epochs at 64 px)
    trained once on a default-size demo set (1,500 + 300 images, rendered at 64-128 px instead of
    256-640: ~6x cheaper to generate, the 64 px cache is the same kind), with its metadata (so
    selection uses the proxy, as `make demo` does). Shared by the slow tests that need a model that
    has learnt the demo (cRT, explain); treat it as read-only. -> {"data", "cache", "run", "cfg"}."""
    from cxrlt.core import config
    from cxrlt.synth import generate
    from cxrlt.training.trainer import train

    base = _shared_dir(tmp_path_factory)
    out = base / "demo_recipe"
    cfg = config.resolve(["configs/demo.yaml"], {"workers": 0, "device": "cpu"})
    with FileLock(str(base / "demo_recipe.lock")):
        if not (out / "run" / "model.pt").exists():
            generate(out / "demo", min_side=64, max_side=128, progress=False)
            build_caches(out / "demo", out / "cache", 64, folds=5)
            train(cfg, str(out / "cache" / "train"), str(out / "run"))
    return {"data": out / "demo", "cache": out / "cache" / "train", "run": out / "run", "cfg": cfg}


@pytest.fixture(scope="session")
def demo_caches(demo_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """The demo dataset's train and test caches at 32 px, 4 folds."""
    base = _shared_dir(tmp_path_factory)
    root = base / f"cache_demo_{TINY_SIZE}"
    with FileLock(str(base / "cache_demo.lock")):
        return build_caches(demo_dataset, root, TINY_SIZE)


@pytest.fixture(scope="session")
def demo_cache(demo_caches) -> Path:
    """The demo dataset's train cache folder (32 px, 4 folds)."""
    return demo_caches[0]


@pytest.fixture(scope="session")
def demo_test_cache(demo_caches) -> Path:
    """The demo dataset's test cache folder (32 px)."""
    return demo_caches[1]


class IndexCache:
    """The Cache API (rows, targets, ids, study/patient keys, projections, centres, frontal) over a hand-made
    index DataFrame (row == position; columns split, fold, ImageID, study, patient, projection and
    the labels), for tests of code that reads keys without building a cache."""

    def __init__(self, index, labels):
        self.index, self.labels = index.reset_index(drop=True), list(labels)

    @property
    def has_projection(self) -> bool:
        return bool((self.index["projection"] != "").any())

    def rows(self, split=None, fold=None):
        keep = (self.index["split"] == split).to_numpy() if split else np.ones(len(self.index), bool)
        if fold is not None:
            keep &= (self.index["fold"] == fold).to_numpy()
        return np.flatnonzero(keep)

    def _col(self, name, rows):
        return self.index[name].to_numpy()[np.asarray(rows)]

    def ids(self, rows):
        return self._col("ImageID", rows)

    def study_keys(self, rows):
        return self._col("study", rows)

    def patient_keys(self, rows):
        return self._col("patient", rows)

    def projections(self, rows):
        return self._col("projection", rows)

    def centres(self, rows):
        if "centre" in self.index:
            return self._col("centre", rows)
        from cxrlt.data.identity import centre

        return np.array([centre(i) for i in self.ids(rows)], dtype=object)

    def frontal(self, rows):
        proj = self.projections(rows)
        return np.isin(proj, ["PA", "AP", "AP_horizontal"]) | (not self.has_projection)

    def targets(self, rows):
        return self.index[self.labels].to_numpy(np.float32)[np.asarray(rows)]


def tiny_cfg(**kw) -> dict:
    """A config for fast CPU tests: tiny timm model, a couple of epochs, no workers."""
    from cxrlt.core import config

    over = dict(model="test_convnext", pretrained=False, head="linear", loss="bce", epochs=2, batch_size=16,
                lr=2e-3, warmup_epochs=0.5, workers=0, device="cpu", aug_rotate=3.0, crt_epochs=3)
    over.update(kw)
    return config.resolve([], over)


def run_script_inprocess(capsys, script: str, *args) -> tuple[int, str, str]:
    """Run a top-level script in this process as `python script args` would (runpy, its own
    main_wrapper), without the interpreter and torch start-up; -> (exit status, stdout, stderr)."""
    import runpy

    old = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def run_script(*args, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """Run a top-level script with the test interpreter; capture output."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("OMP_NUM_THREADS", "1")
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p
