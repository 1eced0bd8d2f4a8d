"""evaluate.py end to end on a toy cache index, and its input checks."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from cxrlt.core.cli import main_wrapper

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Normal", "cardiomegaly", "Mass", "Hernia"]
EXPECTED_GROUPS = {"head": ["Normal", "cardiomegaly"], "medium": ["Hernia"], "tail": ["Mass"]}


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_inprocess(script, argv, capsys):
    """Run a script's main under main_wrapper; return (exit code, stdout, stderr)."""
    mod = load_script(script)
    with pytest.raises(SystemExit) as e:
        main_wrapper(lambda: mod.main(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def make_index(tmp_path, n_train=400, n_test=10, seed=0):
    """Toy cache index; fold 0 (the first 40 train rows) is the val fold.

    Training frequencies: Normal ~40% and cardiomegaly ~10% (head, >= 5%), Hernia 8/400 = 2%
    (medium), Mass 1/400 = 0.25% (tail, < 0.5%). Hernia has no positive in the val fold.
    """
    rng = np.random.default_rng(seed)
    y = np.zeros((n_train, len(LABELS)), dtype=int)
    y[:, 0] = rng.random(n_train) < 0.4
    y[:, 1] = rng.random(n_train) < 0.1
    y[5, 2] = 1
    y[50:58, 3] = 1
    ids = [f"{i:04d}_x.png" for i in range(n_train + n_test)]
    rows = []
    for i, image in enumerate(ids):
        train = i < n_train
        lab = [str(v) for v in y[i]] if train else [""] * len(LABELS)
        rows.append([str(i), image, "20170101", "1.23E+38", "train" if train else "test",
                     str(0 if i < 40 else 1) if train else "-1", *lab])
    index = tmp_path / "index.csv"
    header = ["row", "ImageID", "StudyDate_DICOM", "PatientID", "split", "fold", *LABELS]
    index.write_text("\n".join(",".join(r) for r in [header] + rows) + "\n")
    return index, ids, y


def make_pred(path, ids, y, seed=1, noise=0.6, labels=LABELS):
    rng = np.random.default_rng(seed)
    p = np.clip(y * (1 - noise) + rng.random(y.shape) * noise, 0, 1)
    df = pd.DataFrame(p, columns=LABELS)[labels]
    df.insert(0, "ImageID", ids)
    df.to_csv(path, index=False)
    return p


def test_evaluate_end_to_end(tmp_path, capsys):
    index, ids, y = make_index(tmp_path)
    pred = tmp_path / "pred_val.csv"
    p = make_pred(pred, ids[:40], y[:40])
    log = tmp_path / "metrics.jsonl"
    recs = [{"epoch": e, "lr": 1e-3 / (e + 1), "train_loss": 1 / (e + 1), "val_mAP": 0.3 + e / 10,
             "val_mAUC": 0.6, "images_per_s": 100.0, "val_ap": {"Normal": 0.5}} for e in range(3)]
    log.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"epoch": 3, "lr": 0.0')  # torn last line
    out = tmp_path / "eval"
    code, stdout, stderr = run_inprocess(
        "evaluate.py", ["--pred", str(pred), "--labels", str(index), "--out", str(out), "--train-log", str(log)], capsys)
    assert code == 0, stderr
    m = json.loads((out / "metrics.json").read_text())
    for k in ("mAP", "mAUC", "mF1", "mF1_tuned", "ece", "group_mAP", "group_cutoffs", "per_label_AP",
              "skipped_labels", "n_images"):
        assert k in m
    assert m["n_images"] == 40
    assert m["skipped_labels"] == ["Hernia"] and m["per_label_AP"]["Hernia"] is None
    expected = np.mean([average_precision_score(y[:40, c], p[:, c]) for c in range(3)])
    assert m["mAP"] == pytest.approx(expected)
    assert m["mF1_tuned"] >= m["mF1"]
    assert m["group_cutoffs"]["n_train_images"] == 400
    assert m["group_labels"] == EXPECTED_GROUPS
    assert m["group_mAP"]["tail"] == pytest.approx(m["per_label_AP"]["Mass"])
    assert m["group_mAP"]["medium"] is None  # Hernia, its only label, has no val positive
    per_label = pd.read_csv(out / "per_label.csv")
    assert per_label["train_count"].tolist() == y.sum(0).tolist()
    assert per_label["positives"].tolist() == y[:40].sum(0).tolist()
    assert {"label", "train_count", "positives", "AP", "AUC", "F1", "threshold", "group"} <= set(per_label.columns)
    thr = json.loads((out / "thresholds.json").read_text())["thresholds"]
    assert list(thr) == LABELS
    for name in ("ap_vs_frequency.png", "pr_curves_rarest.png", "training_curves.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "ap_vs_frequency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mAP" in stdout and "Hernia" in stdout
    assert not list(out.glob(".*tmp*"))  # no temp files left behind


def test_saved_thresholds_are_applied(tmp_path, capsys):
    index, ids, y = make_index(tmp_path)
    pred = tmp_path / "pred.csv"
    make_pred(pred, ids[:40], y[:40])
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"thresholds": {x: 0.99 for x in LABELS}}))
    code, _, err = run_inprocess("evaluate.py", ["--pred", str(pred), "--labels", str(index), "--out",
                                                 str(tmp_path / "e"), "--thresholds", str(thr)], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["mF1_tuned"] < m["mF1"]  # 0.99 predicts (almost) nothing positive
    assert m["thresholds_source"] == str(thr)
    thr.write_text(json.dumps({"thresholds": {"Normal": 0.5}}))
    code, _, err = run_inprocess("evaluate.py", ["--pred", str(pred), "--labels", str(index), "--out",
                                                 str(tmp_path / "e"), "--thresholds", str(thr)], capsys)
    assert code == 2 and "no threshold for label(s)" in err


def test_training_layout_labels_with_index_frequencies(tmp_path, capsys):
    index, ids, y = make_index(tmp_path)
    labels = tmp_path / "test_labels.csv"
    df = pd.DataFrame(y[:40], columns=LABELS)
    df.insert(0, "PatientID", "1")
    df.insert(0, "StudyDate_DICOM", "2017")
    df.insert(0, "ImageID", ids[:40])
    df.to_csv(labels, index=False)
    pred = tmp_path / "pred.csv"
    make_pred(pred, ids[:40], y[:40], labels=LABELS[::-1])  # columns matched by name
    code, _, err = run_inprocess("evaluate.py", ["--pred", str(pred), "--labels", str(labels), "--out",
                                                 str(tmp_path / "e"), "--index", str(index)], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["group_cutoffs"]["n_train_images"] == 400 and str(index) in m["frequency_source"]
    assert m["group_labels"] == EXPECTED_GROUPS
    code, _, err = run_inprocess("evaluate.py", ["--pred", str(pred), "--labels", str(labels), "--out",
                                                 str(tmp_path / "e2")], capsys)
    assert code == 0
    assert "no --index" in json.loads((tmp_path / "e2" / "metrics.json").read_text())["frequency_source"]
    # A labelled image without a prediction is an error, naming the labels file and row.
    make_pred(pred, ids[:39], y[:39])
    code, _, err = run_inprocess("evaluate.py", ["--pred", str(pred), "--labels", str(labels), "--out",
                                                 str(tmp_path / "e3")], capsys)
    assert code == 2 and f"{labels}: row 41: ImageID '{ids[39]}' has no row in" in err


@pytest.mark.parametrize("case,expected", [
    ("unknown_id", "no row for ImageID 'nope.png' (row 2 of"),
    ("test_row", "blank label"),
    ("nan", "row 3, column 2 ('Normal'): NaN value"),
    ("above_one", "value 1.5 outside [0, 1]"),
    ("extra_column", "header does not match the expected labels (missing [], unexpected ['Other'])"),
    ("duplicate", "duplicate ImageID"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case, expected):
    index, ids, y = make_index(tmp_path)
    pred = tmp_path / "pred.csv"
    make_pred(pred, ids[:10], y[:10])
    df = pd.read_csv(pred, dtype=str)
    if case == "unknown_id":
        df.loc[0, "ImageID"] = "nope.png"
    elif case == "test_row":
        df.loc[0, "ImageID"] = ids[-1]
    elif case == "nan":
        df.loc[1, "Normal"] = "nan"
    elif case == "above_one":
        df.loc[4, "Mass"] = "1.5"
    elif case == "extra_column":
        df["Other"] = "0.5"
    elif case == "duplicate":
        df.loc[3, "ImageID"] = df.loc[2, "ImageID"]
    df.to_csv(pred, index=False)
    code, _, err = run_inprocess("evaluate.py", ["--pred", str(pred), "--labels", str(index), "--out",
                                                 str(tmp_path / "e")], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_cli_subprocess_bad_input_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--pred", str(tmp_path / "missing.csv"),
                        "--labels", str(tmp_path / "x.csv"), "--out", str(tmp_path / "e")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr == f"error: {tmp_path / 'x.csv'}: file not found\n"


def test_bootstrap_interval_and_paired_comparison(tmp_path, capsys):
    index, ids, y = make_index(tmp_path)
    pred, worse = tmp_path / "pred.csv", tmp_path / "worse.csv"
    make_pred(pred, ids[:40], y[:40], noise=0.6)
    make_pred(worse, ids[:40], y[:40], seed=2, noise=0.95)
    code, stdout, err = run_inprocess("evaluate.py", ["--pred", str(pred), "--labels", str(index), "--out",
                                                      str(tmp_path / "e"), "--compare", str(worse)], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    b = m["bootstrap"]
    assert b["unit"] == "images" and b["n_units"] == 40 and b["n_boot"] == 1000  # no cache: no study keys
    assert b["mAP"]["value"] == pytest.approx(m["mAP"]) and b["mAP"]["low"] < m["mAP"] < b["mAP"]["high"]
    assert b["medium"]["value"] is None  # Hernia has no val positive
    worse_map = json.loads((tmp_path / "e" / "metrics.json").read_text())["compare"]
    assert worse_map["other"] == str(worse) and worse_map["mAP"]["diff"] > 0
    assert "paired bootstrap" in stdout and "95% interval" in stdout
    assert "95% interval" in (tmp_path / "e" / "report.md").read_text()
    code, _, err = run_inprocess("evaluate.py", ["--pred", str(pred), "--labels", str(index), "--out",
                                                 str(tmp_path / "same"), "--compare", str(pred), "--n-boot", "50"],
                                 capsys)
    same = json.loads((tmp_path / "same" / "metrics.json").read_text())["compare"]["mAP"]
    assert code == 0 and (same["diff"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    make_pred(worse, ids[:39], y[:39])  # another image set cannot be compared
    code, _, err = run_inprocess("evaluate.py", ["--pred", str(pred), "--labels", str(index), "--out",
                                                 str(tmp_path / "bad"), "--compare", str(worse)], capsys)
    assert code == 2 and str(worse) in err


def test_study_keys_of_the_cache_drive_the_resampling_and_the_proxy(tmp_path, capsys, monkeypatch):
    from conftest import IndexCache

    import cxrlt.data.cache

    index, ids, y = make_index(tmp_path)
    table = pd.read_csv(index, dtype=str).fillna("")
    table["study"] = [f"s{i // 2}" for i in range(len(table))]  # PA + lateral pairs
    table["patient"] = [f"p{i // 6}" for i in range(len(table))]
    table["projection"] = ["PA" if i % 2 == 0 else "L" for i in range(len(table))]
    table["fold"] = table["fold"].astype(int)
    table[LABELS] = table[LABELS].replace("", "0").astype(int)
    monkeypatch.setattr(cxrlt.data.cache, "open_cache", lambda path: IndexCache(table, LABELS))
    pred = tmp_path / "pred.csv"
    make_pred(pred, ids[:40], y[:40])
    code, stdout, err = run_inprocess("evaluate.py", ["--pred", str(pred), "--labels", str(index), "--out",
                                                      str(tmp_path / "e"), "--n-boot", "200"], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["bootstrap"]["unit"] == "studies" and m["bootstrap"]["n_units"] == 20
    assert m["subsets"]["proxy"]["n_images"] == 20  # the PA of each of the 20 studies
    finding = [i for i in range(0, 40, 2) if y[i, 1:].any()]
    assert m["subsets"]["proxy_finding"]["n_images"] == len(finding)
    assert "proxy (frontal, one image per study)" in stdout
