"""Submissions that say what produced them: NAME.json beside NAME.csv, the resolved configs (and an
untracked config file) in NAME.zip, and a submission from other inputs keeps the old one aside."""
import json
import shutil
import subprocess
import zipfile

import numpy as np
import yaml

from cxrlt.core import provenance
from cxrlt.evaluation.submission import write_zip
from test_ensemble import run, setup, write_pred  # noqa: F401  (setup: the fixture)


def _runs(s):
    """Two run folders holding the fixture's predictions: r0 trained (run.json, resolved config
    beside its test predictions), r1 a cRT-only variant of r0 (crt/summary.json names r0's model)."""
    runs = s["tmp"] / "runs"
    test, val = [], []
    for k in range(2):
        d = runs / f"r{k}"
        d.mkdir(parents=True)
        test.append(str(shutil.copy(s["test"][k], d / "pred_test.csv")))
        val.append(str(shutil.copy(s["val"][k], d / "pred_val.csv")))
    (runs / "r0" / "run.json").write_text(json.dumps({"train_key": "aaaa1111bbbb2222", "data_key": "dk", "tag": "t0",
                                                       "epochs_done": 3, "best_epoch": 1}))
    (runs / "r0" / "pred_test.csv.config.yaml").write_text(yaml.safe_dump({"lr": 0.002, "model": "test_convnext"}))
    (runs / "r1" / "crt").mkdir()
    (runs / "r1" / "crt" / "summary.json").write_text(json.dumps({"source": str(runs / "r0" / "model.pt")}))
    return test, val


def _combine(s, test, val, out, capsys):
    argv = ["combine", "--method", "weighted", "--test", *test, "--val", *val, "--val-labels", s["index"],
            "--test-list", s["list"], "--out", str(out), "--zip", str(out.with_suffix(".zip")),
            "--make-var", "NAME=sub", "--make-var", "CONFIGS=configs/demo.yaml configs/x.yaml",
            "--make-var", "TRAIN_ARGS=--epochs 3"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    return stdout


def test_record_beside_the_submission_and_in_the_zip(setup, capsys):  # noqa: F811
    s = setup
    test, val = _runs(s)
    out = s["tmp"] / "subs" / "sub.csv"
    out.parent.mkdir()
    stdout = _combine(s, test, val, out, capsys)
    rec = json.loads((s["tmp"] / "subs" / "sub.json").read_text())
    assert rec["make"] == {"NAME": "sub", "CONFIGS": "configs/demo.yaml configs/x.yaml", "TRAIN_ARGS": "--epochs 3"}
    assert rec["config_files"] == ["configs/demo.yaml", "configs/x.yaml"]
    assert rec["git"] == provenance.git_state() and rec["method"] == "weighted"
    r0, r1 = rec["runs"]
    assert r0["train_key"] == "aaaa1111bbbb2222" and r0["config"] == {"lr": 0.002, "model": "test_convnext"}
    assert r1["backbone_run"] == r0["run"] and r1["train_key"] == "aaaa1111bbbb2222" and r1["config"] is None
    assert abs(r0["weight"] + r1["weight"] - 1) < 1e-9
    # the val numbers are those printed: 'val mAP full X  proxy Y  honest Z  name'
    lines = [x.split() for x in stdout.splitlines() if x.startswith("val mAP")]
    for got, line in zip([r0["val"], r1["val"], rec["val"]], lines):
        assert [round(got[k], 4) for k in ("full", "proxy", "honest")] == [float(line[i]) for i in (3, 5, 7)]
    z = zipfile.ZipFile(out.with_suffix(".zip"))
    names = z.namelist()
    assert names[:2] == ["sub.csv", "sub.json"] and json.loads(z.read("sub.json")) == rec
    assert yaml.safe_load(z.read("configs_resolved/r0.yaml")) == r0["config"]
    assert "configs_resolved/r1.yaml" not in names and "code/configs/demo.yaml" in names


def test_other_inputs_keep_the_old_submission_aside(setup, capsys):  # noqa: F811
    s = setup
    test, val = _runs(s)
    out = s["tmp"] / "sub.csv"
    _combine(s, test, val, out, capsys)
    first = json.loads(out.with_suffix(".json").read_text())
    stdout = _combine(s, test, val, out, capsys)  # the same inputs: rebuilt in place, nothing aside
    assert "kept it aside" not in stdout and not list(s["tmp"].glob("sub@*"))
    assert json.loads(out.with_suffix(".json").read_text())["inputs_key"] == first["inputs_key"]
    old_csv = out.read_bytes()
    write_pred(test[0], s["test_ids"], np.random.default_rng(9).random((20, 3)))  # r0 retrained
    stdout = _combine(s, test, val, out, capsys)
    tag = first["inputs_key"][:8]
    assert f"kept it aside as {s['tmp'] / f'sub@{tag}'}{{.csv,.zip,.json}}" in stdout
    assert (s["tmp"] / f"sub@{tag}.csv").read_bytes() == old_csv
    assert json.loads((s["tmp"] / f"sub@{tag}.json").read_text())["inputs_key"] == first["inputs_key"]
    assert json.loads(out.with_suffix(".json").read_text())["inputs_key"] != first["inputs_key"]
    assert out.read_bytes() != old_csv and out.with_suffix(".zip").is_file()


def test_zip_adds_untracked_config_files(tmp_path):
    root = tmp_path / "proj"
    (root / "configs").mkdir(parents=True)
    (root / "train.py").write_text("x = 1\n")
    (root / "configs" / "mine.yaml").write_text("lr: 0.001\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "train.py"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"], cwd=root, check=True)
    sub = tmp_path / "s.csv"
    sub.write_text("ImageID,a\nx.png,0.5\n")
    n = write_zip(sub, tmp_path / "s.zip", root, {"s.json": "{}"}, also=[root / "configs" / "mine.yaml",
                                                                       tmp_path / "elsewhere.yaml"])
    names = zipfile.ZipFile(tmp_path / "s.zip").namelist()
    assert names == ["s.csv", "s.json", "code/train.py", "code/configs/mine.yaml"] and n == 4
    assert sorted(zipfile.ZipFile(tmp_path / "t.zip" if write_zip(sub, tmp_path / "t.zip", root) else "").namelist()) \
        == ["code/train.py", "s.csv"]  # untracked files stay out unless named
