"""Ensemble methods on toy inputs and `ensemble.py combine` end to end."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlt.evaluation import ensembling as E
from cxrlt.evaluation import metrics as M
from cxrlt.core.cli import main_wrapper
from cxrlt.evaluation.metrics import macro_map
from cxrlt.evaluation.submission import validate_submission

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Normal", "Mass", "Hernia"]


def toy_models(n=120, seed=0):
    """Ground truth and three models: good (AP high), weak (noisy), and anti-informative."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.4, 0.2, 0.1]).astype(int)
    good = np.clip(0.55 * y + 0.45 * rng.random(y.shape), 0, 1)
    weak = np.clip(0.15 * y + 0.85 * rng.random(y.shape), 0, 1)
    bad = np.clip(1 - good + 0.01 * rng.random(y.shape), 0, 1)
    return y, [good, weak, bad]


def test_mean_and_weighted_mean():
    a = np.array([[0.0, 1.0], [0.5, 0.5]])
    b = np.array([[1.0, 0.0], [0.5, 0.1]])
    np.testing.assert_allclose(E.mean_ensemble([a, b]), [[0.5, 0.5], [0.5, 0.3]])
    np.testing.assert_allclose(E.weighted_mean([a, b], [3, 1]), 0.75 * a + 0.25 * b)
    with pytest.raises(ValueError):
        E.weighted_mean([a, b], [1.0])
    with pytest.raises(ValueError):
        E.weighted_mean([a, b], [-1.0, 2.0])


def test_rank_ensemble_normalises_ranks_with_ties():
    a = np.array([[0.1], [0.2], [0.2], [0.9]])
    np.testing.assert_allclose(E.rank_normalise(a)[:, 0], [0.0, 0.5, 0.5, 1.0])
    b = np.array([[0.001], [0.002], [0.003], [0.004]])  # same order, other scale
    np.testing.assert_allclose(E.rank_ensemble([a, b])[:, 0], [0.0, (0.5 + 1 / 3) / 2, (0.5 + 2 / 3) / 2, 1.0])
    np.testing.assert_allclose(E.rank_normalise(np.full((3, 1), 0.7)), 0.5)  # constant column


def test_single_model_is_returned_unchanged():
    y, (good, *_) = toy_models()
    for method in E.METHODS:
        out, w, _ = E.combine(method, [good], [good], y)
        np.testing.assert_allclose(out, good)


def test_fitted_weights_prefer_the_better_model():
    y, (good, weak, bad) = toy_models()
    w = E.fit_weights([weak, good, bad], y)
    assert w[1] > w[0] and w[1] > w[2]
    assert w.sum() == pytest.approx(1.0)
    assert macro_map(y, E.weighted_mean([weak, good, bad], w))[0] >= macro_map(y, good)[0] - 1e-12


def test_greedy_picks_the_better_model_and_never_loses_to_best_single():
    y, models = toy_models()
    w, history = E.greedy_selection(models, y)
    assert history[0]["model"] == 0  # the good model first
    assert w[2] == 0  # the anti-informative model never helps
    best_single = max(macro_map(y, m)[0] for m in models)
    assert macro_map(y, E.weighted_mean(models, w))[0] >= best_single - 1e-12
    assert [h["val_mAP"] for h in history] == sorted(h["val_mAP"] for h in history)


def test_greedy_repeats_a_model_when_that_helps():
    # Here AP(a) < AP(a + b) < AP(2a + b): the 2:1 mix needs model a selected twice.
    y = np.array([[1], [0], [1], [0], [0], [1], [0], [1]])
    a = np.array([[0.8], [0.6], [0.2], [0.6], [0.0], [0.7], [0.7], [0.6]])
    b = np.array([[0.6], [0.1], [0.2], [0.6], [0.4], [1.0], [0.9], [0.2]])
    w, history = E.greedy_selection([a, b], y, max_steps=10)
    assert [h["model"] for h in history] == [0, 1, 0]
    np.testing.assert_allclose(w, [2 / 3, 1 / 3])
    assert history[-1]["val_mAP"] == pytest.approx(macro_map(y, (2 * a + b) / 3)[0])
    assert macro_map(y, a)[0] < macro_map(y, (a + b) / 2)[0] < history[-1]["val_mAP"]


# ---- CLI -------------------------------------------------------------------------------------------
def write_pred(path, ids, p, labels=LABELS):
    df = pd.DataFrame(p, columns=labels)
    df.insert(0, "ImageID", ids)
    df.to_csv(path, index=False)
    return str(path)


@pytest.fixture
def setup(tmp_path):
    y, models = toy_models(n=60)
    val_ids = [f"v{i:03d}.png" for i in range(60)]
    test_ids = [f"t{i:03d}.png" for i in range(20)]
    index = tmp_path / "index.csv"
    rows = ["row,ImageID,StudyDate_DICOM,PatientID,split,fold," + ",".join(LABELS)]
    rows += [f"{i},{v},2017,1,train,0," + ",".join(map(str, y[i])) for i, v in enumerate(val_ids)]
    rows += [f"{60 + i},{t},2017,1,test,-1,,," for i, t in enumerate(test_ids)]
    index.write_text("\n".join(rows) + "\n")
    lst = tmp_path / "list.csv"
    lst.write_text("ImageID,StudyDate_DICOM,PatientID" + "," * 30 + "\n"
                   + "".join(f"{t},2017,1" + "," * 30 + "\n" for t in test_ids[::-1]))
    rng = np.random.default_rng(5)
    val = [write_pred(tmp_path / f"val{k}.csv", val_ids, m) for k, m in enumerate(models[:2])]
    test_p = [rng.random((20, 3)) for _ in range(2)]
    test = [write_pred(tmp_path / f"test{k}.csv", test_ids, p) for k, p in enumerate(test_p)]
    return dict(tmp=tmp_path, index=str(index), list=str(lst), val=val, test=test, test_p=test_p,
                test_ids=test_ids, labels_file=tmp_path / "labels.txt")


def run(argv, capsys):
    spec = importlib.util.spec_from_file_location("ensemble_cli", REPO / "ensemble.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        main_wrapper(lambda: mod.main(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def combine_args(s, method, out, *extra):
    return ["combine", "--method", method, "--test", *s["test"], "--test-list", s["list"], "--out", str(out), *extra]


def test_combine_mean_writes_validated_submission_and_zip(setup, capsys):
    s = setup
    out, z = s["tmp"] / "sub.csv", s["tmp"] / "sub.zip"
    code, stdout, err = run(combine_args(s, "mean", out, "--zip", str(z)), capsys)
    assert code == 0, err
    df = validate_submission(out, s["list"], LABELS)
    assert list(df.index) == s["test_ids"][::-1]  # test-list order
    expected = (s["test_p"][0] + s["test_p"][1]) / 2
    np.testing.assert_allclose(df.loc[s["test_ids"]].to_numpy(), expected, rtol=1e-12)
    names = zipfile.ZipFile(z).namelist()
    assert names[0] == "sub.csv" and any(n.startswith("code/cxrlt/") for n in names)


def test_combine_greedy_and_fitted_weighted_print_val_scores(setup, capsys):
    s = setup
    for method in ("greedy", "weighted"):
        out = s["tmp"] / f"{method}.csv"
        code, stdout, err = run(combine_args(s, method, out, "--val", *s["val"], "--val-labels", s["index"]), capsys)
        assert code == 0, err
        lines = [x for x in stdout.splitlines() if x.startswith("val mAP")]
        assert len(lines) == 3 and "ensemble" in lines[-1]
        single = [float(x.split()[3]) for x in lines[:2]]  # val mAP full X  proxy Y  honest Z  name
        assert float(lines[-1].split()[3]) >= max(single)
        assert "selection on full" in stdout  # no cache keys, no projection: the full fold
        weights_line = next(x for x in stdout.splitlines() if x.startswith("weights: "))
        w = [float(x.split("=")[1]) for x in weights_line.removeprefix("weights: ").split(", ")]
        assert w[0] > w[1]  # the good model (val0) gets the larger weight


def test_combine_weighted_with_given_weights_and_rank(setup, capsys):
    s = setup
    out = s["tmp"] / "w.csv"
    assert run(combine_args(s, "weighted", out, "--weights", "3", "1"), capsys)[0] == 0
    df = pd.read_csv(out).set_index("ImageID").loc[s["test_ids"]]
    np.testing.assert_allclose(df.to_numpy(), 0.75 * s["test_p"][0] + 0.25 * s["test_p"][1], rtol=1e-12)
    assert run(combine_args(s, "rank", s["tmp"] / "r.csv"), capsys)[0] == 0
    r = pd.read_csv(s["tmp"] / "r.csv").set_index("ImageID").loc[s["test_ids"]].to_numpy()
    assert r.min() >= 0 and r.max() <= 1


def _weights(stdout):
    line = next(x for x in stdout.splitlines() if x.startswith("weights: "))
    return [float(x.split("=")[1]) for x in line.removeprefix("weights: ").split(", ")]


def test_weights_are_fitted_on_the_selection_set_with_an_honest_number(setup, capsys, monkeypatch):
    # PA + lateral pairs: model 0 is good on the frontal images only, model 1 is fair on all. On the
    # test-like proxy (frontal, one per study) greedy takes model 0; on the full fold, model 1.
    from conftest import IndexCache

    import cxrlt.data.cache

    s = setup
    rng = np.random.default_rng(7)
    n = 60
    y = np.repeat((rng.random((n // 2, 3)) < [0.4, 0.3, 0.3]).astype(int), 2, 0)
    frontal = np.tile([True, False], n // 2)
    good_on_pa = np.where(frontal[:, None], 0.5 * y + 0.5 * rng.random(y.shape), rng.random(y.shape))
    fair = 0.3 * y + 0.7 * rng.random(y.shape)
    val_ids = [f"v{i:03d}.png" for i in range(n)]
    table = pd.DataFrame(y, columns=LABELS)
    table.insert(0, "ImageID", val_ids)
    table = table.assign(split="train", fold=0, study=[f"s{i // 2}" for i in range(n)],
                         patient=[f"p{i // 4}" for i in range(n)], projection=np.where(frontal, "PA", "L"))
    monkeypatch.setattr(cxrlt.data.cache, "open_cache", lambda path: IndexCache(table, LABELS))
    index = pd.read_csv(s["index"], dtype=str, keep_default_na=False)
    index.loc[:n - 1, LABELS] = y.astype(str)  # the labels the cache's index.csv holds
    index.to_csv(s["index"], index=False)
    s["val"] = [write_pred(s["tmp"] / f"pv{k}.csv", val_ids, m) for k, m in enumerate([good_on_pa, fair])]
    val_args = ["--val", *s["val"], "--val-labels", s["index"]]
    code, stdout, err = run(combine_args(s, "greedy", s["tmp"] / "g.csv", *val_args), capsys)
    assert code == 0, err
    assert "proxy 30 (frontal, one per study); selection on proxy, halves 16/14 images" in stdout
    assert _weights(stdout) == [1.0, 0.0]
    lines = [x.split() for x in stdout.splitlines() if x.startswith("val mAP")]
    assert [lines[-1][k] for k in (2, 4, 6)] == ["full", "proxy", "honest"] and "ensemble" in lines[-1]
    assert lines[-1][3:8] == lines[0][3:8]  # the ensemble is model 0 (so is each half's choice)
    assert float(lines[0][5]) > float(lines[1][5]) and float(lines[0][3]) < float(lines[1][3])
    code, stdout, err = run(combine_args(s, "greedy", s["tmp"] / "g2.csv", *val_args, "--select_on", "full"), capsys)
    assert code == 0, err
    assert "selection on full" in stdout and _weights(stdout)[1] > 0


def test_cross_fitted_weights_never_see_the_half_they_are_scored_on():
    y, models = toy_models(n=80)
    a, b = np.arange(0, 40), np.arange(40, 80)
    sets = {"halves": (a, b), "selection": np.arange(80)}
    res = E.cross_fitted("weighted", models, y, sets)
    w_a = E.fit_weights([m[a] for m in models], y[a])
    w_b = E.fit_weights([m[b] for m in models], y[b])
    assert res["half_weights"] == [w_a.tolist(), w_b.tolist()]
    ap_a = M.average_precision_per_label(y[a], E.weighted_mean([m[a] for m in models], w_b))
    ap_b = M.average_precision_per_label(y[b], E.weighted_mean([m[b] for m in models], w_a))
    ens = E.mean_ensemble(models)  # the reference: equal weights, nothing fitted
    ref_halves = np.nanmean(np.nanmean([M.average_precision_per_label(y[a], ens[a]),
                                        M.average_precision_per_label(y[b], ens[b])], 0))
    gain = np.nanmean(np.nanmean([ap_a, ap_b], 0)) - ref_halves
    assert res["honest_gain"] == pytest.approx(gain) and gain > 0.1  # the bad model is dropped
    assert res["honest"] == pytest.approx(macro_map(y, ens)[0] + gain)
    mean = E.cross_fitted("mean", models, y, sets)  # nothing fitted: the selection set's mAP
    assert mean["honest"] == pytest.approx(macro_map(y, ens)[0]) and mean["honest_gain"] == 0


@pytest.mark.parametrize("case,expected", [
    ("ids", "ImageID 'zzz.png' is not in"),
    ("columns", "label columns differ from"),
    ("order", "label columns differ from"),
    ("greedy_no_val", "--method greedy needs --val"),
    ("weights_count", "--weights: 3 weights given for 2 models"),
    ("nan", "NaN value"),
])
def test_combine_rejects_mismatched_inputs(setup, capsys, case, expected):
    s = setup
    second = Path(s["test"][1])
    df = pd.read_csv(second, dtype=str)
    extra = []
    method = "mean"
    if case == "ids":
        df.loc[3, "ImageID"] = "zzz.png"
    elif case == "columns":
        df = df.rename(columns={"Hernia": "Other"})
    elif case == "order":
        df = df[["ImageID", "Mass", "Normal", "Hernia"]]
    elif case == "greedy_no_val":
        method = "greedy"
    elif case == "weights_count":
        method, extra = "weighted", ["--weights", "1", "1", "1"]
    elif case == "nan":
        df.loc[2, "Mass"] = "nan"
    df.to_csv(second, index=False)
    out = s["tmp"] / "bad.csv"
    code, _, err = run(combine_args(s, method, out, *extra), capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    if case in ("ids", "columns", "order", "nan"):
        assert str(second) in err  # names the file that differs
    assert not out.exists()


def test_combine_rejects_predictions_not_matching_test_list(setup, capsys):
    s = setup
    lst = Path(s["list"])
    lst.write_text("\n".join(lst.read_text().splitlines()[:-1]) + "\n")  # one image fewer
    code, _, err = run(combine_args(s, "mean", s["tmp"] / "x.csv"), capsys)
    assert code == 2 and "ImageIDs differ from" in err


def test_cli_subprocess_one_line_error(setup):
    s = setup
    r = subprocess.run([sys.executable, str(REPO / "ensemble.py"), *combine_args(s, "greedy", s["tmp"] / "g.csv")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr == "error: --method greedy needs --val and --val-labels\n"
