"""The trainer's best epoch is chosen on the selection set (cxrlt/evaluation/selection.py), with honest numbers.

The val predictions are scripted (Trainer.validate overridden; training itself runs as usual, one
batch per epoch): epoch 0 ranks the frontal images well and the laterals at random, epoch 1 the
reverse with somewhat worse frontals, epoch 2 is mediocre everywhere. The demo cache knows the
projection (built with its padchest_metadata.csv), so the default selection set is the proxy
(frontal, one image per study), which prefers epoch 0, while the full val fold prefers epoch 1.
"""

import json

import numpy as np
import pytest

from conftest import tiny_cfg
from cxrlt.evaluation import selection as V
from cxrlt.data.cache import open_cache
from cxrlt.models.checkpoint import load_checkpoint
from cxrlt.core.fileio import read_jsonl
from cxrlt.training.trainer import Trainer

TIMING = {"images_per_s", "data_wait_frac", "train_time_s"}


@pytest.fixture(scope="module")
def script(demo_cache):
    """Per-epoch val predictions (val-row order) and the premise: proxy and full disagree."""
    cache = open_cache(demo_cache)
    rows = cache.rows("train", fold=0)
    keys = V.val_keys(cache, rows)
    assert keys.frontal is not None and keys.frontal.any() and (~keys.frontal).any()
    y = keys.y.astype(np.float64)
    rng = np.random.default_rng(0)
    good, medium, bad = (0.8 * y + 0.2 * rng.random(y.shape), 0.25 * y + 0.75 * rng.random(y.shape),
                         rng.random(y.shape))
    front = keys.frontal[:, None]
    preds = [np.where(front, good, bad), np.where(front, medium, good), 0.1 * y + 0.9 * rng.random(y.shape)]
    preds = [p.astype(np.float32) for p in preds]
    sets = V.val_sets(cache, rows, {"select_on": "auto", "proxy_require_finding": False})
    table = [V.score_row(keys.y, sets, lambda idx, p=p: p[idx]) for p in preds]
    assert sets["select_on"] == "proxy"
    assert int(np.argmax([t["proxy"] for t in table])) == 0 and int(np.argmax([t["full"] for t in table])) == 1
    return preds, table


class Scripted(Trainer):
    """A trainer whose validation returns the scripted predictions of the epoch it validates
    (and is interrupted, as by Ctrl-C, at the epochs in `stop_at`)."""

    preds: list = []
    stop_at: set = set()

    def validate(self):
        if self.start_epoch in self.stop_at:
            raise KeyboardInterrupt
        return self.preds[self.start_epoch]


@pytest.fixture
def fit(demo_cache):
    """fit(preds, out, resume=False, stop_at=(), **config) -> the scripted run's result."""

    def run(preds, out, resume=False, stop_at=(), **kw):
        cls = type("S", (Scripted,), {"preds": preds, "stop_at": set(stop_at)})
        return cls(tiny_cfg(epochs=3, max_train_batches=1, **kw), str(demo_cache), str(out), resume=resume).fit()

    return run


def _without_timing(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def test_best_epoch_is_chosen_on_the_proxy_with_the_honest_number_beside(script, fit, tmp_path):
    preds, table = script
    out = tmp_path / "run"
    res = fit(preds, out)
    assert res["best_epoch"] == 0
    assert load_checkpoint(out / "model.pt")["epoch"] == 0  # model.pt holds epoch 0's weights
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["select_on"] for r in recs] == ["proxy"] * 3 and [r["best_epoch"] for r in recs] == [0, 0, 0]
    for e, r in enumerate(recs):
        assert r["val_mAP"] == pytest.approx(table[e]["full"])
        assert r["val_proxy_mAP"] == pytest.approx(table[e]["proxy"])
        assert r["val_select_mAP"] == r["val_proxy_mAP"]
        honest = V.choose(table[:e + 1], "proxy", reference=e)["honest"]
        assert r["val_honest_mAP"] == pytest.approx(honest)
    assert recs[0]["val_honest_mAP"] == pytest.approx(recs[0]["val_select_mAP"])  # one epoch: no choice
    sel = json.loads((out / "run.json").read_text())["selection"]
    assert (sel["select_on"], sel["best_epoch"]) == ("proxy", 0)
    assert sel["val_mAP"] == pytest.approx(table[0]["full"])
    assert sel["val_proxy_mAP"] == pytest.approx(table[0]["proxy"])
    assert sel["val_honest_mAP"] == pytest.approx(recs[-1]["val_honest_mAP"])
    assert sel["sets"]["proxy"] < sel["sets"]["full"]
    assert load_checkpoint(out / "model.pt")["selection"] == sel
    assert res["best_map"] == pytest.approx(table[0]["full"])  # best_map stays the full val mAP of the choice
    last = (out / "train.log").read_text().strip().splitlines()[-1]
    assert (f"done: epoch 1 chosen on proxy: val mAP full {table[0]['full']:.4f}, proxy {table[0]['proxy']:.4f}, "
            f"honest {sel['val_honest_mAP']:.4f}") in last


def test_select_on_full_chooses_the_epoch_the_full_fold_prefers(script, fit, tmp_path):
    preds, table = script
    res = fit(preds, tmp_path / "run", select_on="full")
    assert res["best_epoch"] == 1 and res["selection"]["select_on"] == "full"
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["val_select_mAP"] for r in recs] == [r["val_mAP"] for r in recs]


def test_patience_counts_epochs_without_gain_on_the_selection_set(script, fit, tmp_path):
    preds, _ = script
    res = fit(preds, tmp_path / "proxy", patience=1)  # epoch 1 is worse on the proxy: stop there
    assert res["best_epoch"] == 0 and len(read_jsonl(tmp_path / "proxy" / "metrics.jsonl")) == 2
    res = fit(preds, tmp_path / "full", patience=1, select_on="full")  # better on full: goes on
    assert res["best_epoch"] == 1 and len(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == 3


def test_an_interrupted_run_resumes_to_the_same_choice_and_numbers(script, fit, tmp_path):
    preds, _ = script
    ref = tmp_path / "ref"
    fit(preds, ref)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(preds, out, stop_at={1})  # epoch 0 done (last.pt), interrupted validating epoch 1
    assert load_checkpoint(out / "last.pt")["epoch"] == 0
    # select_on edited in between: a post key, the run keeps choosing as it started (and says so)
    res = fit(preds, out, resume=True, select_on="full")
    assert res["best_epoch"] == 0 and res["selection"]["select_on"] == "proxy"
    assert "this run chooses its best epoch with {'select_on': 'auto'" in (out / "train.log").read_text()
    assert _without_timing(read_jsonl(out / "metrics.jsonl")) == _without_timing(read_jsonl(ref / "metrics.jsonl"))
    run, run_ref = (json.loads((d / "run.json").read_text()) for d in (out, ref))
    assert run["selection"] == run_ref["selection"] and run["best_epoch"] == run_ref["best_epoch"] == 0
    assert load_checkpoint(out / "model.pt")["epoch"] == 0
