"""Pseudo-labels: pseudo_label.py's soft labels round-trip to the cache's rows, and a config trains
on them beside its real labels (pseudo_cache, pseudo_labels, pseudo_weight)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_script_inprocess
from cxrlt.core.errors import InputError
from cxrlt.data.cache import open_cache
from cxrlt.data.cache_build import build_external_cache
from cxrlt.data.dataset import CacheDataset, WeightedConcat
from cxrlt.post.pseudo import read_soft_labels
from test_external import _chexpert


def _tiny_run(tmp_path, capsys, cache, *extra) -> dict:
    rc, _o, _e = run_script_inprocess(
        capsys, "train.py", "--cache", cache, "--out", tmp_path / "run", "--model", "test_convnext",
        "--pretrained", "false", "--epochs", "1", "--batch_size", "16", "--workers", "0", "--device", "cpu",
        "--max_train_batches", "2", *extra)
    assert rc == 0
    return {"model": tmp_path / "run" / "model.pt", "run": tmp_path / "run"}


def test_soft_labels_round_trip(tmp_path, capsys, demo_cache):
    run = _tiny_run(tmp_path, capsys, demo_cache)
    ext = tmp_path / "ext" / "train"
    size = open_cache(demo_cache).size
    build_external_cache("chexpert", _chexpert(tmp_path), ext, size, folds=2, workers=1)
    out = tmp_path / "soft.csv"
    rc, _o, _e = run_script_inprocess(capsys, "pseudo_label.py", "--checkpoint", run["model"],
                                      "--cache", ext, "--out", out, "--device", "cpu")
    assert rc == 0
    labels = open_cache(demo_cache).labels
    cache = open_cache(ext)
    written = pd.read_csv(out)
    assert list(written.columns) == ["ImageID", *labels] and len(written) == len(cache.index)
    rows, y = read_soft_labels(out, cache, labels)
    assert (cache.ids(rows) == written["ImageID"].to_numpy()).all()
    np.testing.assert_allclose(y, written[labels].to_numpy(), atol=1e-6)
    assert ((y >= 0) & (y <= 1)).all() and y.std() > 0
    written.iloc[:1].assign(ImageID="not-there.jpg").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match="not in the cache"):
        read_soft_labels(tmp_path / "bad.csv", cache, labels)


def test_weighted_concat_gives_each_part_its_weight(demo_cache):
    c = open_cache(demo_cache)
    rows = c.rows("train")[:6]
    a = CacheDataset(c.images_path, rows[:4], np.zeros((4, 2), np.float32))
    b = CacheDataset(c.images_path, rows[4:], np.ones((2, 2), np.float32))
    ds = WeightedConcat([(a, 1.0), (b, 0.25)])
    assert len(ds) == 6
    got = [ds[i] for i in range(6)]
    assert [float(w) for _x, _y, w in got] == [1.0] * 4 + [0.25] * 2
    assert torch.equal(got[5][1], torch.ones(2)) and torch.equal(got[5][0], b[1][0])


def test_training_with_pseudo_labels(tmp_path, capsys, demo_cache):
    c = open_cache(demo_cache)
    rows = c.rows("test") if len(c.rows("test")) else c.rows("train")[:40]
    ids = c.ids(rows)
    rng = np.random.default_rng(0)
    soft = pd.DataFrame(rng.random((len(ids), len(c.labels))), columns=c.labels)
    soft.insert(0, "ImageID", ids)
    soft.to_csv(tmp_path / "soft.csv", index=False)
    _tiny_run(tmp_path, capsys, demo_cache, "--pseudo_cache", demo_cache, "--pseudo_labels", tmp_path / "soft.csv",
              "--pseudo_weight", "0.3")
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"pseudo-labels: {len(ids)} images" in log and "weight 0.3" in log
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert np.isfinite(m[-1]["train_loss"])
