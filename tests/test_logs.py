"""Logs that read well in a file: plain periodic progress lines off a terminal (one helper for every
bar), the per-label table in report.md only, a group rule whose counts match the groups, 1-based
epochs in the plots, and `make clean-demo` removing the demo's study reports."""
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrlt.core import progress
from cxrlt.evaluation import metrics as M
from cxrlt.evaluation import report

ROOT = Path(__file__).resolve().parents[1]


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_bar_prints_periodic_lines_without_carriage_returns():
    clock, out = _Clock(), io.StringIO()
    b = progress.PlainBar(total=100, desc="epoch 1/3", unit="batch", every=10, stream=out, clock=clock)
    for i in range(100):
        clock.t += 1.0  # one batch a second: a line every 10 batches
        b.update(1)
        if i == 50:
            b.set_postfix(loss="0.4100")
    b.close()
    b.close()  # once only
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 11
    assert lines[0] == "epoch 1/3: 10/100 batch (10%), 1.0 batch/s, 10 s"
    assert lines[-1] == "epoch 1/3: 100/100 batch (100%), 1.0 batch/s, 100 s, loss=0.4100"
    # a short step prints nothing; an early stop (greedy: 3 of 25 steps) is never shown as stuck at 0/25
    quick = io.StringIO()
    assert list(progress.PlainBar(range(25), desc="greedy", every=10, stream=quick, clock=_Clock())) == list(range(25))
    assert quick.getvalue() == ""


def test_bar_is_tqdm_on_a_terminal_and_plain_in_a_file(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress.bar(range(3), desc="x"), progress.PlainBar)
    monkeypatch.setattr(sys, "stderr", Tty())
    b = progress.bar(range(3), desc="x", leave=False)
    assert isinstance(b, tqdm)
    b.close()


def test_every_bar_of_the_project_comes_from_the_helper():
    users = []
    for f in list((ROOT / "cxrlt").rglob("*.py")) + list(ROOT.glob("*.py")):
        text = f.read_text(encoding="utf-8")
        if f.name != "progress.py" and re.search(r"\btqdm\b", text):
            users.append(str(f.relative_to(ROOT)))
    assert users == []


def test_group_rule_counts_match_the_groups():
    for n in (1400, 1480, 200, 7):
        cut = {"n_train_images": n, "head_min_fraction": M.HEAD_MIN_FRACTION, "tail_max_fraction": M.TAIL_MAX_FRACTION}
        head, tail = report.count_cutoffs(cut)
        groups = M.frequency_groups(np.arange(n + 1), n)
        assert groups[tail] == "tail" and groups[tail + 1] != "tail"
        assert groups[head] == "head" and groups[head - 1] != "head"
        assert f"(<= {tail} images)" in report.group_rule(cut) and f"(>= {head} images)" in report.group_rule(cut)
    cut = {"n_train_images": 1480, "head_min_fraction": 0.05, "tail_max_fraction": 0.005}
    assert report.count_cutoffs(cut) == (74, 7)  # 7 / 1480 < 0.5%: a label with 7 images is tail, and says so


def test_per_label_table_in_report_only_and_plots_count_epochs_from_1(tmp_path, capsys, monkeypatch):
    from test_evaluate import make_index, make_pred

    index, ids, y = make_index(tmp_path)
    pred = tmp_path / "pred_val.csv"
    make_pred(pred, ids[:40], y[:40])
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(f'{{"epoch": {e}, "train_loss": 1.0, "lr": 0.001}}\n' for e in range(3)))
    xs = []
    real = report.plot_training_curves

    def spy(records, path):
        import matplotlib.axes

        orig = matplotlib.axes.Axes.plot
        monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, *a, **k: (xs.append(list(x)), orig(ax, x, *a, **k))[1])
        real(records, path)
    monkeypatch.setattr(report, "plot_training_curves", spy)
    report.evaluate(pred, index, tmp_path / "eval", train_log=log, n_boot=10)
    stdout = capsys.readouterr().out
    labels = pd.read_csv(tmp_path / "eval" / "per_label.csv")["label"].tolist()
    assert not [x for x in stdout.splitlines() if x.split() and x.split()[0] in labels]  # no table rows
    assert f"per-label table: {tmp_path / 'eval' / 'report.md'}" in stdout
    md = (tmp_path / "eval" / "report.md").read_text()
    assert all(f"| {lab} |" in md for lab in labels)
    assert xs and all(x == [1, 2, 3] for x in xs)


def test_clean_demo_removes_the_demo_study_reports():
    out = subprocess.run(["make", "-n", "clean-demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "reports/demo_*" in out and "runs/demo_*" in out
