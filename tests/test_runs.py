"""Runs you can compare: a run moved aside says which train keys changed, a moved-aside run with
the same keys is taken over by another run folder instead of retrained, and `make runs`
(python -m cxrlt.pipeline.runs) prints runs and submissions in one table."""
import json

from conftest import tiny_cfg
from cxrlt.pipeline import runs as R
from cxrlt.training.run_folder import changed_keys
from cxrlt.training.trainer import Trainer, train


def test_moved_aside_run_names_the_changed_keys_and_is_reused_elsewhere(demo_cache, tmp_path):
    root = tmp_path / "demo_32"
    a, b = tiny_cfg(epochs=1, max_train_batches=2, lr=2e-3), tiny_cfg(epochs=1, max_train_batches=2, lr=1e-3)
    train(a, str(demo_cache), str(root / "x"))
    tag_a = json.loads((root / "x" / "run.json").read_text())["tag"]
    model_a = (root / "x" / "model.pt").read_bytes()
    train(b, str(demo_cache), str(root / "x"), resume=True)
    log = (root / "x" / "train.log").read_text()
    assert f"moved it to {root / f'x@{tag_a}'} (changed: lr 0.002 -> 0.001)" in log
    # a study variant (another folder) with a's keys takes the moved-aside run over: nothing retrained
    tr = Trainer(a, str(demo_cache), str(root / "study_lr2e-3"), resume=True)
    assert tr.up_to_date
    tr.fit()
    assert (root / "study_lr2e-3" / "model.pt").read_bytes() == model_a and not (root / f"x@{tag_a}").exists()
    assert f"restored the earlier run with this config and data from {root / f'x@{tag_a}'}" in \
        (root / "study_lr2e-3" / "train.log").read_text()
    # the table: both runs, their 1-based best epoch and val numbers from run.json
    rows = {r["name"]: r for r in R.run_rows(tmp_path)}
    assert set(rows) == {"demo_32/x", "demo_32/study_lr2e-3"}
    sel = json.loads((root / "x" / "run.json").read_text())["selection"]
    assert rows["demo_32/x"]["full"] == sel["val_mAP"] and rows["demo_32/x"]["best"] == sel["best_epoch"] + 1


def test_changed_keys_text(tmp_path):
    cfg = tiny_cfg()
    (tmp_path / "config.yaml").write_text("lr: 0.01\nloss: ldam\nepochs: 9\nworkers: 3\n")
    text = changed_keys(tmp_path / "config.yaml", cfg)
    assert "loss ldam -> bce" in text and "lr 0.01 -> 0.002" in text
    assert "epochs 9" not in text and "workers" not in text  # extendable and run keys never make another run
    assert changed_keys(tmp_path / "none.yaml", cfg, data_changed=True) == "the training data (cache key)"
    assert changed_keys(tmp_path / "none.yaml", cfg) == "unknown (no config.yaml)"


def test_runs_table_lists_runs_heads_and_submissions(tmp_path, capsys):
    run = tmp_path / "runs" / "nih_256" / "mine"
    (run / "crt").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"tag": "68353df5", "train_key": "0123456789abcdef", "epochs_done": 4,
                                              "best_epoch": 2, "selection": {"val_mAP": 0.31, "val_proxy_mAP": 0.29,
                                                                             "val_honest_mAP": 0.27}}))
    (run / "crt" / "summary.json").write_text(json.dumps({"method": "crt", "val_mAP": 0.33, "val_proxy_mAP": 0.3,
                                                          "val_honest_mAP": None}))
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "try1.json").write_text(json.dumps({"inputs_key": "feedbeef00000000", "method": "mean", "runs": [{}],
                                                "git": {"commit": "a" * 40, "dirty": True},
                                                "val": {"full": 0.34, "proxy": 0.32, "honest": 0.3}}))
    (subs / "try1.score.json").write_text(json.dumps({"mAP": 0.177}))
    assert R.main(["--runs-root", str(tmp_path / "runs"), "--sub-dir", str(subs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "what"]
    row = {x.split()[0]: x.split() for x in lines[2:5]}
    assert row["nih_256/mine"][2:] == ["4", "3", "68353df5", "01234567", "0.3100", "0.2900", "0.2700", "-"]
    assert row["nih_256/mine/crt"][-4:] == ["0.3300", "0.3000", "-", "-"]
    assert row["try1"][-6:] == ["feedbeef", "aaaaaaaa+dirty", "0.3400", "0.3200", "0.3000", "0.1770"]
