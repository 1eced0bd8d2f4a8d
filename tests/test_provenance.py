"""provenance.json: the commit of the code (a temporary repository made here), dirty or not,
unknown outside a repository; the versions and the command line; written by the trainer and
shown by evaluate.py's report.md and a study's table.md footnote."""
import json
import shlex
import subprocess
import sys

import numpy as np
import pandas as pd
import timm
import torch

from conftest import tiny_cfg
from cxrlt.core import provenance
from cxrlt.training.trainer import train


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "first")
    return repo


def test_commit_dirty_and_unknown(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    head = _git(repo, "rev-parse", "HEAD")
    g = provenance.git_state(repo)
    assert g["commit"] == head and len(head) == 40 and g["dirty"] is False
    (repo / "untracked.yaml").write_text("lr: 1\n")  # untracked files do not make the tree dirty
    assert provenance.git_state(repo)["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.git_state(repo) == {**g, "dirty": True}
    plain = tmp_path / "plain"
    plain.mkdir()
    assert provenance.git_state(plain) == {"commit": None, "dirty": None, "branch": None}
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no git at all: unknown, never an error
    assert provenance.git_state(repo)["commit"] is None
    assert "commit unknown" in provenance.summary(provenance.collect(["x"], root=repo))


def test_fields_and_earlier_records(tmp_path):
    repo = _repo(tmp_path)
    argv = ["train.py", "--config", "my config.yaml", "--lr", "1e-3"]
    path = tmp_path / "provenance.json"
    first = provenance.write(path, argv, root=repo)
    p = json.loads(path.read_text())
    assert p == first
    assert p["git"]["commit"] == _git(repo, "rev-parse", "HEAD")
    assert shlex.split(p["command"]) == argv and p["python_executable"] == sys.executable
    assert p["versions"] == {"python": sys.version.split()[0], "torch": torch.__version__,
                             "timm": timm.__version__, "numpy": np.__version__}
    assert p["cuda"] == torch.version.cuda and p["gpu_count"] == len(p["gpus"])
    assert p["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert p["hostname"] and "earlier" not in p
    provenance.write(path, ["train.py", "--resume"], root=repo)
    again = json.loads(path.read_text())
    assert again["command"] == "train.py --resume" and again["earlier"][0]["command"] == p["command"]
    line = provenance.summary(again)
    assert line.startswith(f"commit {p['git']['commit'][:8]}, python ") and f"torch {torch.__version__}" in line


def test_trainer_writes_it_and_the_report_shows_it(demo_cache, tmp_path, capsys):
    from cxrlt.evaluation.report import evaluate
    from cxrlt.studies.report import provenance_footnote

    out = tmp_path / "run"
    train(tiny_cfg(epochs=1, max_train_batches=1), str(demo_cache), str(out))
    p = json.loads((out / "provenance.json").read_text())
    assert p["git"] == provenance.git_state()  # the project's own checkout (or unknown outside git)
    assert p["versions"]["torch"] == torch.__version__
    # evaluate.py: report.md's Provenance section shows the training's and the predictions' records
    index = pd.read_csv(demo_cache / "index.csv")
    labels = (demo_cache / "labels.txt").read_text().splitlines()
    val = index[(index["split"] == "train") & (index["fold"] == 0)]
    pred = out / "pred_val.csv"
    df = pd.DataFrame(np.random.default_rng(0).random((len(val), len(labels))), columns=labels)
    df.insert(0, "ImageID", val["ImageID"].to_numpy())
    df.to_csv(pred, index=False)
    provenance.write(provenance.beside(pred), ["predict.py", "--split", "val"])
    summary = evaluate(pred, demo_cache / "index.csv", out / "eval", train_log=out / "metrics.jsonl", n_boot=10)
    assert set(summary["provenance"]) == {"predictions", "training"}
    report = (out / "eval" / "report.md").read_text()
    assert "## Provenance" in report and "`predict.py --split val`" in report
    assert f"- training: {provenance.summary(p)}" in report
    # a study's footnote: one line per distinct record, naming the runs it covers
    lines = provenance_footnote({"a": (out, demo_cache), "b": (tmp_path / "none", demo_cache)})
    assert f"- training: {provenance.summary(p)} (a)" in lines
    assert "- training: unknown (no provenance.json) (b)" in lines
