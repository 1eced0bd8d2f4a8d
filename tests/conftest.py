"""Shared fixtures: one small synthetic dataset + cache, built once per test session.

pytest-xdist runs several worker processes; the first one to get the lock builds the data under
the session's base temp folder and the others reuse it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    config.addinivalue_line("markers", "slow: takes more than ~10 s (make test-fast leaves these out)")


def _shared_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by all xdist workers of this session
    return base


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """A small demo dataset in the CXR-LT 2026 layout (200 train / 40 test images)."""
    from cxrlt.demo_data import generate

    base = _shared_dir(tmp_path_factory)
    out = base / "demo_small"
    with FileLock(str(base / "demo_small.lock")):
        if not (out / "train.csv").exists():
            generate(out, n_train=200, n_test=40, seed=1, min_side=64, max_side=128)
    return out


@pytest.fixture(scope="session")
def demo_cache(demo_dataset, tmp_path_factory) -> Path:
    """The demo dataset's cache at 32 px, 4 folds."""
    from cxrlt.cache import build_cache

    base = _shared_dir(tmp_path_factory)
    out = base / f"cache_demo_{TINY_SIZE}"
    with FileLock(str(base / "cache_demo.lock")):
        if not (out / "manifest.json").exists():
            build_cache(
                demo_dataset / "train.csv", demo_dataset / "images", out, size=TINY_SIZE,
                test_csv=demo_dataset / "CXRLT_2026_TEST_ALL_TASK1.csv",
                removal_csv=demo_dataset / "Removal.csv", folds=4, seed=0, workers=1,
            )
    return out


def tiny_cfg(**kw) -> dict:
    """A config for fast CPU tests: tiny timm model, a couple of epochs, no workers."""
    from cxrlt import config

    over = dict(model="test_convnext", pretrained=False, head="linear", loss="bce", epochs=2, batch_size=16,
                lr=2e-3, warmup_epochs=0.5, workers=0, device="cpu", aug_rotate=3.0, crt_epochs=3)
    over.update(kw)
    return config.resolve([], over)


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
