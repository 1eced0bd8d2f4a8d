"""The bad-input corpus, continued: label sets, delimiters, encodings, output paths, configs.

Same rules as test_bad_inputs.py: every case asserts what the message names, and the scripts exit
with status 2 and print exactly one `error:` line, no traceback. Script-level cases run the script
in this process (runpy, same main_wrapper) unless the point is the real process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_script, run_script_inprocess
from cxrlt.core import config
from cxrlt.data.cache_build import build_train_cache
from cxrlt.core.cli import main_wrapper
from cxrlt.core.errors import ConfigError, InputError
from cxrlt.core.labels import CXRLT2026_LABELS
from test_bad_inputs import cxrlt_checkpoint, one_error_line, script_fails_inprocess

OFFICIAL = list(CXRLT2026_LABELS)


def train_csv(path: Path, labels, n=4, sep=",") -> Path:
    """A training CSV with the given label header (0/1 values); the images need not exist: every
    case here stops while reading the CSVs, before any image is opened."""
    rng = np.random.default_rng(0)
    lines = [sep.join(["ImageID", "StudyDate_DICOM", "PatientID", *labels])]
    lines += [sep.join([f"{i}_a.png", "20170101", f"{i}.9E+38", *map(str, rng.integers(0, 2, len(labels)))])
              for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_plan_error(tmp_path, csv: Path, **kw) -> str:
    (tmp_path / "images").mkdir(exist_ok=True)
    with pytest.raises(InputError) as e:
        build_train_cache(csv, tmp_path / "images", tmp_path / "cache", 16, folds=2, workers=1, **kw)
    assert not (tmp_path / "cache").exists()
    return str(e.value)


def write_preds(path: Path, labels, ids, seed=0) -> Path:
    p = np.random.default_rng(seed).random((len(ids), len(labels)))
    df = pd.DataFrame(p, columns=labels)
    df.insert(0, "ImageID", ids)
    df.to_csv(path, index=False, float_format="%.5f")
    return path


def write_list(path: Path, ids) -> Path:
    path.write_text("ImageID,StudyDate_DICOM,PatientID\n" + "".join(f"{i},2017,1\n" for i in ids))
    return path


def write_labels(path: Path, labels) -> Path:
    path.write_text("\n".join(labels) + "\n")
    return path


def runs_ok(capsys, script: str, *args) -> str:
    """Run a script in this process; assert exit status 0; return stdout."""
    code, out, err = run_script_inprocess(capsys, script, *args)
    assert code == 0, err
    return out


IDS = [f"t{i}.png" for i in range(5)]


# ---- label columns -------------------------------------------------------------------------------


def test_padded_label_name_is_refused(tmp_path):
    """`Normal ` would be a label of its own (and normal gating would silently switch off)."""
    csv = train_csv(tmp_path / "train.csv", ["Normal ", "Mass", "Hernia"])
    msg = build_plan_error(tmp_path, csv)
    assert msg == (f"{csv}: row 1, column 4: the name 'Normal ' starts or ends with spaces "
                   f"(names must match exactly: remove the spaces)")


def _misspelt(labels):
    return [("cardiomegally" if x == "cardiomegaly" else x) for x in labels]


@pytest.mark.parametrize("name, labels, expected", [
    ("extra", OFFICIAL + ["Frontal"], "differ: extra 'Frontal'"),
    ("missing", [x for x in OFFICIAL if x != "Mass"], "differ: missing 'Mass'"),
    ("misspelt", _misspelt(OFFICIAL), "differ: misspelt 'cardiomegally' (official 'cardiomegaly')"),
    ("case", ["normal" if x == "Normal" else x for x in OFFICIAL], "misspelt 'normal' (official 'Normal')"),
    ("reordered and one misspelt", [OFFICIAL[1], OFFICIAL[0], *_misspelt(OFFICIAL[2:])],
     "differ: misspelt 'cardiomegally' (official 'cardiomegaly')"),
])
def test_label_set_close_to_the_official_one_stops(tmp_path, name, labels, expected):
    csv = train_csv(tmp_path / "train.csv", labels)
    msg = build_plan_error(tmp_path, csv)
    assert msg.startswith(f"{csv}: row 1 (header): ") and expected in msg, msg
    assert "--labels-file" in msg


def test_preprocess_close_label_set_exits_2_with_one_line(tmp_path, capsys):
    csv = train_csv(tmp_path / "train.csv", OFFICIAL + ["Frontal"])
    (tmp_path / "images").mkdir()
    line = script_fails_inprocess(capsys, "preprocess.py", "train", "--train-csv", csv, "--image-dir", tmp_path / "images",
                                  "--size", 16, "--out", tmp_path / "cache")
    assert line.startswith(f"error: {csv}: row 1 (header): the labels are close to the 30 official CXR-LT labels "
                           f"but differ: extra 'Frontal'")


def test_labels_file_makes_another_set_deliberate(tmp_path):
    """With --labels-file the same CSV is accepted: its labels are taken, in its order."""
    from cxrlt.data.tables import read_training_csv

    csv = train_csv(tmp_path / "train.csv", OFFICIAL + ["Frontal"])
    twenty_nine = [x for x in OFFICIAL if x != "Mass"]
    df, labels = read_training_csv(csv, labels_file=write_labels(tmp_path / "l.txt", twenty_nine))
    assert labels == twenty_nine and list(df.columns)[3:] == twenty_nine


def test_combine_refuses_a_nearly_official_label_set(tmp_path, capsys):
    """An extra 0/1 column (`Frontal`) would become a 31st submission column."""
    lst = write_list(tmp_path / "list.csv", IDS)
    pred = write_preds(tmp_path / "pred.csv", OFFICIAL + ["Frontal"], IDS)
    line = script_fails_inprocess(capsys, "ensemble.py", "combine", "--test", pred, "--test-list", lst,
                                  "--out", tmp_path / "sub.csv")
    assert line.startswith(f"error: {pred}: row 1 (header): the labels are close to the 30 official") and \
        "extra 'Frontal'" in line
    assert not (tmp_path / "sub.csv").exists()


def test_combine_labels_file_sets_the_order(tmp_path, capsys):
    """The official 30 in another order: read by name, written in the official order (with or
    without --labels-file)."""
    lst = write_list(tmp_path / "list.csv", IDS)
    shuffled = OFFICIAL[::-1]
    pred = write_preds(tmp_path / "pred.csv", shuffled, IDS)
    out = tmp_path / "sub.csv"
    for extra in ([], ["--labels-file", write_labels(tmp_path / "official.txt", OFFICIAL)]):
        runs_ok(capsys, "ensemble.py", "combine", "--test", pred, "--test-list", lst, "--out", out, *extra)
        assert runs_ok(capsys, "ensemble.py", "check", out, "--test-list", lst) == "OK: 5 rows x 30 labels\n"
        got, want = pd.read_csv(out), pd.read_csv(pred)
        assert list(got.columns) == ["ImageID", *OFFICIAL]
        assert np.allclose(got[OFFICIAL].to_numpy(), want[OFFICIAL].to_numpy())
    wrong = write_labels(tmp_path / "29.txt", OFFICIAL[:-1])
    line = script_fails_inprocess(capsys, "ensemble.py", "combine", "--test", pred, "--test-list", lst,
                                  "--out", out, "--labels-file", wrong)
    assert f"the label columns differ from {wrong} (missing [], not listed there ['calcified densities'])" in line


def test_check_accepts_any_label_set_from_a_labels_file(tmp_path, capsys):
    """Task 2's six findings (and any other set) are checked against the file given."""
    task2 = ["Scoliosis", "Osteopenia", "Bulla", "Infarction", "Adenopathy", "goiter"]
    lst = write_list(tmp_path / "list.csv", IDS)
    sub = write_preds(tmp_path / "sub.csv", task2, IDS)
    out = runs_ok(capsys, "ensemble.py", "check", sub, "--test-list", lst,
                  "--labels-file", write_labels(tmp_path / "t2.txt", task2))
    assert out == "OK: 5 rows x 6 labels\n"


# ---- delimiters and encodings --------------------------------------------------------------------------


def test_semicolon_separated_training_csv_is_named(tmp_path):
    csv = train_csv(tmp_path / "train.csv", ["Normal", "Mass"], sep=";")
    msg = build_plan_error(tmp_path, csv)
    assert msg.startswith(f"{csv}: row 1: the header is one column 'ImageID;StudyDate_DICOM;PatientID;Normal;Mass': "
                          f"the file is separated by semicolons (';'), not commas")


def test_tab_separated_test_list_is_named(tmp_path, capsys):
    lst = tmp_path / "list.tsv"
    lst.write_text("ImageID\tStudyDate_DICOM\tPatientID\n" + "".join(f"{i}\t2017\t1\n" for i in IDS))
    sub = write_preds(tmp_path / "sub.csv", ["A", "B"], IDS)
    line = script_fails_inprocess(capsys, "ensemble.py", "check", sub, "--test-list", lst,
                                  "--labels-file", write_labels(tmp_path / "l.txt", ["A", "B"]))
    assert line.startswith(f"error: {lst}: row 1: the header is one column") and "separated by tabs ('\\t')" in line


def latin1(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1"))
    return path


def test_check_non_utf8_submission_one_line(tmp_path, capsys):
    lst = write_list(tmp_path / "list.csv", ["é.png"])
    sub = latin1(tmp_path / "sub.csv", "ImageID,A\né.png,0.5\n")
    line = script_fails_inprocess(capsys, "ensemble.py", "check", sub, "--test-list", lst,
                                  "--labels-file", write_labels(tmp_path / "l.txt", ["A"]))
    assert line == f"error: {sub}: not UTF-8 text (invalid continuation byte at byte 10); save it as UTF-8 CSV"


def test_check_non_utf8_labels_file_one_line(tmp_path, capsys):
    lst = write_list(tmp_path / "list.csv", IDS)
    sub = write_preds(tmp_path / "sub.csv", ["Ödem"], IDS)
    lab = latin1(tmp_path / "labels.txt", "Ödem\n")
    line = script_fails_inprocess(capsys, "ensemble.py", "check", sub, "--test-list", lst, "--labels-file", lab)
    assert line.startswith(f"error: {lab}: not UTF-8 text (")


@pytest.mark.parametrize("which", ["labels", "pred"])
def test_evaluate_non_utf8_input_one_line(tmp_path, capsys, which):
    labels = tmp_path / "labels.csv"
    labels.write_text("ImageID,StudyDate_DICOM,PatientID,A,B\na.png,1,1,1,0\nb.png,1,1,0,1\n")
    pred = tmp_path / "pred.csv"
    pred.write_text("ImageID,A,B\na.png,0.9,0.1\nb.png,0.2,0.8\n")
    bad = labels if which == "labels" else pred
    latin1(bad, bad.read_text().replace("a.png", "à.png"))
    line = script_fails_inprocess(capsys, "evaluate.py", "--pred", pred, "--labels", labels, "--out", tmp_path / "e")
    assert line.startswith(f"error: {bad}: not UTF-8 text (")
    assert not (tmp_path / "e" / "metrics.json").exists()


# ---- output paths -----------------------------------------------------------------------------------------


def test_evaluate_out_naming_a_file(tmp_path, capsys):
    pred = write_preds(tmp_path / "pred.csv", ["A", "B"], ["a.png", "b.png"])
    labels = tmp_path / "labels.csv"
    labels.write_text("ImageID,StudyDate_DICOM,PatientID,A,B\na.png,1,1,1,0\nb.png,1,1,0,1\n")
    out = tmp_path / "report.txt"
    out.write_text("keep me")
    line = script_fails_inprocess(capsys, "evaluate.py", "--pred", pred, "--labels", labels, "--out", out)
    assert line == f"error: --out {out}: is a file; give a folder (it is created if missing)"
    assert out.read_text() == "keep me"


def test_combine_out_naming_a_folder(tmp_path, capsys):
    lst = write_list(tmp_path / "list.csv", IDS)
    pred = write_preds(tmp_path / "pred.csv", ["A", "B"], IDS)
    (tmp_path / "subs").mkdir()
    line = script_fails_inprocess(capsys, "ensemble.py", "combine", "--test", pred, "--test-list", lst,
                                  "--out", tmp_path / "subs")
    assert line == (f"error: --out {tmp_path / 'subs'}: is a folder; give the path of a file "
                    f"(a new name or one to replace)")
    assert list((tmp_path / "subs").iterdir()) == []


# ---- configs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("epochs: three\n", "config key 'epochs' must be int, got 'three' (str)"),
    ("lr: [1, 2]\n", "config key 'lr' must be float, got [1, 2] (list)"),
    ("ema: maybe\n", "config key 'ema' must be bool, got 'maybe' (str)"),
    ("loss: hinge\n",
     "config key 'loss' = 'hinge' is not one of ['asl', 'bce', 'bce_pw', 'cb', 'db', 'focal', 'ldam', 'margin_bce']"),
    ("- a\n- b\n", "a config file must be a mapping of key: value"),
    ("lr: -0.001\n", "config key 'lr' = -0.001 must be > 0"),
    ("batch_size: 0\n", "config key 'batch_size' = 0 must be >= 1"),
    ("accum_steps: 0\n", "config key 'accum_steps' = 0 must be >= 1"),
    ("workers: -1\n", "config key 'workers' = -1 must be >= 0"),
    ("seed: -1\n", "config key 'seed' = -1 must be in [0, 4294967295]"),
    ("crt_epochs: 0\n", "config key 'crt_epochs' = 0 must be >= 1"),
    ("crt_batch_size: 0\n", "config key 'crt_batch_size' = 0 must be >= 1"),
    ("ema_decay: 1.0\n", "config key 'ema_decay' = 1.0 must be in (0, 1)"),
    ("ema_decay: 0\n", "config key 'ema_decay' = 0.0 must be in (0, 1)"),
    ("aug_hflip: 1.5\n", "config key 'aug_hflip' = 1.5 must be in [0, 1]"),
    ("epochs: 0\n", "config key 'epochs' = 0 must be >= 1"),
    ("max_train_batches: -1\n", "config key 'max_train_batches' = -1 must be >= 0"),
    ("drw_lr_factor: -0.1\n", "config key 'drw_lr_factor' = -0.1 must be > 0"),
    ("lr: .nan\n", "config key 'lr' = nan must be a finite number"),
    ("study_pool_weight: 2\n", "config key 'study_pool_weight' = 2.0 must be in [0, 1]"),
    ("lr: 0.001\nmin_lr: 0.01\n",
     "min_lr = 0.01, lr = 0.001: min_lr is above lr: the cosine schedule would rise instead of decay"),
    ("lr: 0.1\nepochs: 2\nlr: 0.2\n", "line 3, column 1: duplicate key 'lr' (first at line 1): give each key once"),
    ("{lr: 0.1, lr: 0.2}\n", "line 1, column 11: duplicate key 'lr' (first at line 1): give each key once"),
    ("lr: [\n", "line 2, column 1: not valid YAML (while parsing a flow node: expected the node content, "
                "but found '<stream end>')"),
    ("model: \"a\\nb\"\n", "config key 'model' = 'a\\nb' must be one line"),
    ("\"lr\\n\": 1\n", "unknown config key 'lr\\n' (did you mean 'lr'?)"),
    ("device: gpu\n", "config key 'device' = 'gpu' is not one of: auto | cpu | cuda | cuda:N"),
])
def test_config_values_are_checked_in_one_line(tmp_path, text, expected):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.resolve([f])
    assert str(e.value) == f"{f}: {expected}"


def test_every_numeric_key_has_a_range_rule():
    """A new numeric key must say which values are allowed (RANGES next to SCHEMA)."""
    numeric = {k for k, (_, typ, _) in config.SCHEMA.items() if typ in (int, float)}
    assert numeric - set(config.RANGES) == set()
    assert set(config.RANGES) - numeric == set()
    for key, rule in config.RANGES.items():  # every rule parses, and admits the default
        assert config._in_range(config.DEFAULTS[key], rule), key


def test_relation_is_checked_on_the_command_line_too():
    with pytest.raises(ConfigError, match=r"^command line: min_lr = 0\.5, lr = 0\.0001: min_lr is above lr"):
        config.resolve([], {"min_lr": "0.5"})
    with pytest.raises(ConfigError, match=r"^command line: config key 'lr' = -1\.0 must be > 0"):
        config.apply_overrides(config.DEFAULTS, {"lr": "-1"})


def test_train_out_of_range_value_writes_nothing(tmp_path):
    p = run_script("train.py", "--config", "configs/demo.yaml", "--cache", tmp_path / "c", "--out", tmp_path / "run",
                   "--max_train_batches", "-1", check=False)
    assert p.returncode == 2
    assert one_error_line(p.stderr) == "error: command line: config key 'max_train_batches' = -1 must be >= 0"
    assert not (tmp_path / "run").exists()


def test_retrain_head_bad_value_before_out_is_touched(tmp_path, capsys):
    line = script_fails_inprocess(capsys, "retrain_head.py", "--run", tmp_path / "run", "--cache", tmp_path / "c",
                                  "--out", tmp_path / "crt", "--crt_epochs", "0")
    assert line == "error: command line: config key 'crt_epochs' = 0 must be >= 1"
    assert not (tmp_path / "crt").exists()


def test_train_device_gpu_one_line(tmp_path, capsys):
    line = script_fails_inprocess(capsys, "train.py", "--config", "configs/demo.yaml", "--cache", tmp_path / "c",
                                  "--out", tmp_path / "run", "--device", "gpu")
    assert line == "error: command line: config key 'device' = 'gpu' is not one of: auto | cpu | cuda | cuda:N"
    assert not (tmp_path / "run").exists()


def test_device_cuda_without_a_gpu(monkeypatch):
    from cxrlt.training.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"^--device cuda: no CUDA GPU is usable here"):
        pick_device("cuda")
    with pytest.raises(InputError, match=r"^--device cuda:1: no CUDA GPU is usable here"):
        pick_device("cuda:1")
    with pytest.raises(InputError, match=r"^--device: config key 'device' = 'gpu' is not one of"):
        pick_device("gpu")
    assert pick_device("auto").type == "cpu" and pick_device("cpu").type == "cpu"


# ---- predict --postproc-from ----------------------------------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    (None, "post-processing file not found"),
    ("{not json", "not JSON (line 1, column 2: Expecting property name enclosed in double quotes)"),
    ('{"raw": {}}', "no 'choice' object"),
    ('{"choice": {"normal_gating_alpha": 1.0, "patient_context_weight": 0}}', "'choice' has no 'study_pool_weight'"),
    ('{"choice": {"normal_gating_alpha": 9, "study_pool_weight": 0.5, "patient_context_weight": 0}}',
     "choice: config key 'normal_gating_alpha' = 9.0 must be in [-8, 8]"),
])
def test_predict_postproc_from_bad_file_one_line(tmp_path, capsys, content, expected):
    ck = cxrlt_checkpoint(tmp_path / "model.pt")
    pp = tmp_path / "pred_val.csv.postproc.json"
    if content is not None:
        pp.write_text(content)
    line = script_fails_inprocess(capsys, "predict.py", "--checkpoint", ck, "--cache", tmp_path / "c",
                                  "--split", "test", "--out", tmp_path / "p.csv", "--postproc-from", pp)
    assert line.startswith(f"error: {pp}: {expected}"), line


# ---- one line, whatever the message holds ---------------------------------------------------------------


def test_error_with_a_newline_is_printed_as_one_line(capsys):
    def main():
        raise InputError("x.csv: row 2: ImageID 'a\nb.png' not found")

    with pytest.raises(SystemExit) as e:
        main_wrapper(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: x.csv: row 2: ImageID 'a\\nb.png' not found\n"


def test_postproc_json_written_by_predict_is_accepted(tmp_path):
    """The reader takes what predict.py --split val writes (the keys it needs, the rest ignored)."""
    pp = tmp_path / "v.postproc.json"
    pp.write_text(json.dumps({"raw": {"full": 0.1, "proxy": 0.1},
                              "choice": {"normal_gating_alpha": -0.5, "study_pool_weight": 0.25,
                                         "patient_context_weight": 0.1},
                              "grid": [], "tta": "flip"}))
    assert config.load_postproc(pp) == {"normal_gating_alpha": -0.5, "study_pool_weight": 0.25,
                                        "patient_context_weight": 0.1}


@pytest.mark.parametrize("argv,flag", [
    (["predict.py", "--checkpoint", "m.pt", "--cache", "c", "--split", "val", "--out", "o.csv", "--batch-size", "0"],
     "--batch-size"),
    (["evaluate.py", "--pred", "p.csv", "--labels", "l.csv", "--out", "e", "--n-boot", "-5"], "--n-boot"),
    (["preprocess.py", "train", "--train-csv", "t.csv", "--image-dir", ".", "--out", "c", "--workers", "0"],
     "--workers"),
    (["study.py", "report", "--manifest", "m.json", "--out", "r", "--n-boot", "zero"], "--n-boot"),
])
def test_count_flags_below_one_are_usage_errors_naming_the_flag(capsys, argv, flag):
    code, _, err = run_script_inprocess(capsys, *argv)
    assert code == 2 and f"argument {flag}: expected a whole number >= 1" in err
    assert "Traceback" not in err
