"""Studies (cxrlt/studies/spec.py, study.py): expansion into configs, Make's plan, and the comparison report."""

import json
import os
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, run_script
from cxrlt.evaluation import metrics as M
from cxrlt.pipeline import plan
from cxrlt.studies import report as study_report
from cxrlt.studies import spec
from cxrlt.core.errors import InputError

N_BOOT = 200


BASE = f"base: {ROOT / 'configs' / 'demo.yaml'}\n"


def write_study(d: Path, body: str, name="s.yaml") -> Path:
    """A study file in d over configs/demo.yaml."""
    p = d / name
    p.write_text(BASE + textwrap.dedent(body))
    return p


# ---- study files and their expansion -------------------------------------------------------------------
def test_expand_writes_one_config_per_variant_seed_and_only_rewrites_changed_content(tmp_path):
    f = write_study(tmp_path, """
        name: mini
        overrides: {crt_method: none}
        baseline: b
        seeds: [0, 1]
        variants:
          a: {loss: bce, head: linear}
          b: {}
        """)
    s = spec.expand(f, tmp_path / "state")
    assert [r["stem"] for r in s.runs] == ["mini.a", "mini.a.s1", "mini.b", "mini.b.s1"]
    from cxrlt.core import config

    cfg = config.resolve([s.runs[1]["config"]])
    assert (cfg["loss"], cfg["head"], cfg["seed"], cfg["crt_method"], cfg["model"]) == \
        ("bce", "linear", 1, "none", "test_resnet")
    assert config.resolve([s.runs[2]["config"]])["loss"] == "ldam"  # the base's
    man = json.loads((tmp_path / "state" / "studies" / "mini" / "study.json").read_text())
    assert man["baseline"] == "b" and [v["name"] for v in man["variants"]] == ["a", "b"]

    files = sorted((tmp_path / "state" / "studies" / "mini").iterdir())
    times = {p.name: p.stat().st_mtime_ns for p in files}
    spec.expand(f, tmp_path / "state")  # same content: nothing rewritten (Make sees no change)
    assert {p.name: p.stat().st_mtime_ns for p in files} == times
    # a variant dropped from the study: its config disappears, the others stay untouched
    write_study(tmp_path, "name: mini\noverrides: {crt_method: none}\nbaseline: b\nseeds: [0, 1]\n"
                "variants:\n  b: {}\n")
    spec.expand(f, tmp_path / "state")
    left = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "state" / "studies" / "mini").glob("*.yaml")}
    assert left == {k: v for k, v in times.items() if k.startswith("mini.b")}


@pytest.mark.parametrize("body, message", [
    ("variants: {a: {lossy: bce}}", "unknown config key 'lossy'"),
    ("variants: {a: {}}\nbaseline: z", "baseline 'z' is not one of the variants"),
    ("variants: {a: {}}\nseeds: [0, 0]", "'seeds' lists a value twice"),
    ("variants: {a.b: {}}", "variant name 'a.b'"),
    ("variants: {a: {seed: 3}}\nseeds: [1, 2]", "sets 'seed' while the study lists 'seeds'"),
    ("variant: {a: {}}", "unknown key(s) ['variant']"),
    ("variants: {a: {}}\nbaseline: a\nbaseline: a", "duplicate key 'baseline'"),
    ("variants: {a: {lr: 1.0e-5, min_lr: 1.0e-3}}", "(variant 'a'): min_lr = 0.001, lr = 1e-05: min_lr is above lr"),
    # a variant that changes nothing would be compared with a difference of 0 by construction
    ("variants: {a: {}, b: {workers: 0}}", "variant 'b' is identical to the baseline 'a'"),
    ("variants: {a: {lr: 0.5}, b: {}}\nbaseline: b\noverrides: {lr: 0.5}", "variant 'a' is identical to the baseline 'b'"),
    ("variants: {a: {}, b: {lr: 0.5}, c: {lr: 0.5}}", "variant 'c' is identical to variant 'b'"),
])
def test_a_wrong_study_file_is_a_one_line_error_naming_it(tmp_path, body, message):
    f = write_study(tmp_path, body)
    with pytest.raises(InputError) as e:
        spec.run_specs(spec.load_study(f))
    assert message in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


def test_every_study_in_the_repo_expands(tmp_path):
    for f in sorted((ROOT / "studies").glob("*.yaml")):
        os.chdir(ROOT)  # base paths are relative to the folder make runs in
        s = spec.expand(f.relative_to(ROOT), tmp_path / "state")
        assert s.baseline in s.variants and len(s.runs) == len(s.variants), f


def run_plan(d: Path, study_file, postproc: str = "off") -> dict[str, str]:
    argv = [f"--state={d / 'state'}", f"--mk={d / 'state' / 'vars.mk'}", "--dataset=demo", f"--train-csv={d / 't.csv'}",
            f"--image-dir={d}", f"--test-csv={d / 'test.csv'}", "--img-size=64", "--folds=5", "--name=demo",
            f"--configs={ROOT / 'configs' / 'demo.yaml'}", "--ensemble=mean", f"--postproc={postproc}",
            f"--study={study_file}"]
    assert plan.main(argv) == 0
    lines = (d / "state" / "vars.mk").read_text().splitlines()
    return dict(line.split(" := ", 1) for line in lines if " := " in line)


def test_plan_adds_the_study_to_stems_and_post_only_variants_share_one_backbone(tmp_path):
    f = write_study(tmp_path, """
        name: post
        variants:
          none: {crt_method: none}
          tau: {crt_method: tau, tta: flip}
          bce: {loss: bce, head: linear, drw_epoch: -1}
        """)
    v = run_plan(tmp_path, f)
    assert v["STUDY_NAME"] == "post" and v["STUDY_STEMS"].split() == ["post.none", "post.tau", "post.bce"]
    assert v["STEMS"].split() == ["demo", "post.none", "post.tau", "post.bce"]
    # none/tau differ from configs/demo.yaml only in post keys: demo's run trains the backbone once
    assert v["BASE_post.none"] == v["BASE_post.tau"] == "demo" and v["BASE_post.bce"] == "post.bce"
    assert Path(v["STUDY_MANIFEST"]).is_file()
    assert not (tmp_path / "state" / "submissions" / "demo.stamp").exists()  # make study builds no submission


def test_make_study_leaves_the_stamps_of_make_all_alone(tmp_path):
    """`make demo` (POSTPROC=auto), then `make demo-study` (POSTPROC=off, same CONFIGS to share their
    backbones), then `make demo` again must find nothing to redo: the study's plan must not re-stamp
    the CONFIGS' predictions nor the submission with its own POSTPROC."""
    f = write_study(tmp_path, """
        name: post
        variants:
          none: {crt_method: none}
          bce: {loss: bce, head: linear, drw_epoch: -1}
        """)
    run_plan(tmp_path, "", postproc="auto")  # make all
    state = tmp_path / "state"
    watched = [state / "demo_64" / "demo" / f"{s}.stamp" for s in ("train", "crt", "predict-val", "predict-test")]
    watched.append(state / "submissions" / "demo.stamp")
    before = {p: (p.read_text(), p.stat().st_mtime_ns) for p in watched}
    v = run_plan(tmp_path, f, postproc="off")  # make study
    assert {p: (p.read_text(), p.stat().st_mtime_ns) for p in watched} == before
    assert v["BASE_post.none"] == "demo"  # the study still shares demo's backbone
    assert json.loads((state / "demo_64" / "post.none" / "predict-val.stamp").read_text())["postproc"] == "off"

# ---- the report ---------------------------------------------------------------------------------------------
LABELS4 = ["effusion", "nodule", "mass", "Normal"]


@pytest.fixture(scope="module")
def label_cache(tmp_path_factory) -> Path:
    """A train cache of 240 tiny images in 160 studies (1-2 images each) with 4 common labels: every
    label has many positives in every fold, so that the intervals are about the predictions and not
    about tail labels that a resample may lack (predictions are made up by the tests, not trained)."""
    from cxrlt.data.cache_build import build_train_cache

    d = tmp_path_factory.mktemp("label_cache")
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for s in range(160):
        y = (rng.random(4) < [0.4, 0.3, 0.25, 0.3]).astype(int)
        for k in range(1 + (s % 3 == 0)):
            image_id = f"img{s:03d}_{k}.png"
            cv2.imwrite(str(d / "images" / image_id), rng.integers(0, 255, (16, 16), dtype=np.uint8))
            rows.append([image_id, f"2015{s % 12 + 1:02d}01", f"P{s}", *y])
    pd.DataFrame(rows, columns=["ImageID", "StudyDate_DICOM", "PatientID", *LABELS4]).to_csv(d / "train.csv", index=False)
    build_train_cache(d / "train.csv", d / "images", d / "cache", 8, folds=2, seed=0, workers=1)
    return d / "cache"


def fake_runs(tmp_path, cache_dir, preds: dict[str, np.ndarray], study_file) -> tuple[Path, list]:
    """Expand the study, write each run's pred_val.csv (val fold 0 of the cache); -> (manifest, --run triples)."""
    from cxrlt.data.cache import open_cache

    s = spec.expand(study_file, tmp_path / "state")
    cache = open_cache(cache_dir)
    rows = cache.rows("train", fold=0)
    ids = cache.index.set_index("row").loc[rows, "ImageID"].to_numpy()
    runs = []
    for r in s.runs:
        d = tmp_path / "runs" / r["stem"]
        d.mkdir(parents=True)
        df = pd.DataFrame(preds[r["stem"]], columns=cache.labels)
        df.insert(0, "ImageID", ids)
        df.to_csv(d / "pred_val.csv", index=False, float_format="%.6f")
        runs.append((r["stem"], str(d), str(cache_dir)))
    return tmp_path / "state" / "studies" / s.name / "study.json", runs


def val_targets(cache_dir):
    from cxrlt.data.cache import open_cache

    cache = open_cache(cache_dir)
    return cache.targets(cache.rows("train", fold=0))


def noisy(y, noise, seed):
    rng = np.random.default_rng(seed)
    return np.clip(0.25 + 0.5 * y + noise * rng.standard_normal(y.shape), 0, 1)


def test_a_two_variant_study_gives_one_row_each_with_intervals_around_the_estimates(tmp_path, label_cache):
    from cxrlt.evaluation.report import compute_metrics, load_eval_data

    f = write_study(tmp_path, "name: two\nbaseline: good\nvariants: {good: {}, weak: {loss: bce, head: linear}}\n")
    y = val_targets(label_cache)
    man, runs = fake_runs(tmp_path, label_cache, {"two.good": noisy(y, 0.3, 1), "two.weak": noisy(y, 0.9, 2)}, f)
    out = tmp_path / "report"
    study_report.report(man, runs, out, n_boot=N_BOOT)
    t = pd.read_csv(out / "table.csv")
    assert list(t["variant"]) == ["good", "weak"] and list(t["baseline"]) == [1, 0] and list(t["runs"]) == [1, 1]
    for _, r in t.iterrows():
        assert r["mAP_low"] <= r["mAP"] <= r["mAP_high"] and r["mAP_high"] - r["mAP_low"] > 0.005
        for g in M.GROUPS:
            if np.isfinite(r[f"{g}_mAP"]):
                assert r[f"{g}_low"] <= r[f"{g}_mAP"] <= r[f"{g}_high"]
    weak = t.iloc[1]
    assert weak["diff_low"] <= weak["diff_mAP"] <= weak["diff_high"]
    assert weak["diff_mAP"] == pytest.approx(weak["mAP"] - t.iloc[0]["mAP"], abs=2e-6)  # table.csv: 6 digits
    assert weak["diff_high"] < 0 and weak["p_better"] < 0.05  # far noisier predictions: clearly worse
    assert np.isnan(t.iloc[0]["diff_mAP"])
    # the numbers are evaluate.py's numbers for the same file
    ref, _ = compute_metrics(load_eval_data(Path(runs[1][1]) / "pred_val.csv", Path(label_cache) / "index.csv"))
    assert weak["mAP"] == pytest.approx(ref["mAP"]) and weak["mF1_tuned"] == pytest.approx(ref["mF1_tuned"])
    md = (out / "table.md").read_text()
    assert "| **good** (baseline) |" in md and "| weak |" in md
    pl = pd.read_csv(out / "per_label.csv")
    assert list(pl.columns[-2:]) == ["good", "weak"] and pl["train_count"].is_monotonic_decreasing
    for png in ("map.png", "groups.png", "per_label_ap.png"):
        assert (out / png).stat().st_size > 5000
    # same inputs again: only touched (Make settles); an edited prediction file: redone
    text = (out / "table.csv").read_text()
    assert study_report.report(man, runs, out, n_boot=N_BOOT) == {"up_to_date": True}
    pd.DataFrame(pd.read_csv(Path(runs[1][1]) / "pred_val.csv")).assign(**{pl["label"][0]: 0.5}).to_csv(
        Path(runs[1][1]) / "pred_val.csv", index=False)
    assert "table" in study_report.report(man, runs, out, n_boot=N_BOOT)
    assert (out / "table.csv").read_text() != text


def test_the_paired_difference_of_a_run_with_itself_is_zero_with_a_zero_width_interval(tmp_path, label_cache):
    f = write_study(tmp_path, "name: same\nvariants: {a: {}, b: {tta: flip}}\n")
    p = noisy(val_targets(label_cache), 0.5, 3)
    man, runs = fake_runs(tmp_path, label_cache, {"same.a": p, "same.b": p.copy()}, f)
    study_report.report(man, runs, tmp_path / "r", n_boot=N_BOOT)
    b = pd.read_csv(tmp_path / "r" / "table.csv").iloc[1]
    assert (b["diff_mAP"], b["diff_low"], b["diff_high"], b["p_better"]) == (0, 0, 0, 0)


def test_several_seeds_report_mean_and_sd_and_the_interval_of_the_mean(tmp_path, label_cache):
    f = write_study(tmp_path, "name: seeds\nseeds: [0, 1]\nvariants: {a: {}, b: {loss: bce, head: linear}}\n")
    y = val_targets(label_cache)
    pa, pb0, pb1 = noisy(y, 0.4, 4), noisy(y, 0.6, 5), noisy(y, 0.6, 6)
    preds = {"seeds.a": pa, "seeds.a.s1": pa.copy(), "seeds.b": pb0, "seeds.b.s1": pb1}
    man, runs = fake_runs(tmp_path, label_cache, preds, f)
    study_report.report(man, runs, tmp_path / "r", n_boot=N_BOOT)
    t = pd.read_csv(tmp_path / "r" / "table.csv")
    a, b = t.iloc[0], t.iloc[1]
    assert list(t["runs"]) == [2, 2] and a["mAP_sd"] == 0 and b["mAP_sd"] > 0
    # two identical runs: the mean's interval is exactly metrics.bootstrap_map's for one run
    from cxrlt.evaluation.report import load_eval_data

    data = load_eval_data(Path(runs[0][1]) / "pred_val.csv", Path(label_cache) / "index.csv")
    keys = data.keys.study if data.keys is not None else None  # the units evaluate.py resamples
    ci = M.bootstrap_map(y, pa, keys, None, N_BOOT, M.BOOT_SEED)["mAP"]
    assert (a["mAP_low"], a["mAP"], a["mAP_high"]) == pytest.approx((ci["low"], ci["value"], ci["high"]), abs=2e-6)
    # b's difference: the mean of the two paired differences, inside its own interval
    d0 = M.paired_bootstrap(y, pb0, pa, keys, None, N_BOOT)["mAP"]["diff"]
    d1 = M.paired_bootstrap(y, pb1, pa, keys, None, N_BOOT)["mAP"]["diff"]
    assert b["diff_mAP"] == pytest.approx((d0 + d1) / 2, abs=2e-6) and b["diff_sd"] > 0
    assert b["diff_low"] <= b["diff_mAP"] <= b["diff_high"]
    # b's interval is that of the mean of its two runs' mAP on each resample of the val studies
    w = M.resample_weights(keys if keys is not None else np.arange(len(y)), N_BOOT, M.BOOT_SEED)
    per_resample = [np.nanmean(M.resampled_ap(y, q, w), axis=1) for q in (pb0, pb1)]
    lo, hi = np.percentile((per_resample[0] + per_resample[1]) / 2, [2.5, 97.5])
    assert (b["mAP_low"], b["mAP_high"]) == pytest.approx((lo, hi), abs=2e-6)
    assert "± " in (tmp_path / "r" / "table.md").read_text()


def test_report_cli_names_a_missing_run(tmp_path, label_cache):
    f = write_study(tmp_path, "name: miss\nvariants: {a: {}, b: {tta: flip}}\n")
    p = noisy(val_targets(label_cache), 0.5, 3)
    man, runs = fake_runs(tmp_path, label_cache, {"miss.a": p, "miss.b": p}, f)
    r = run_script("study.py", "report", "--manifest", man, "--out", tmp_path / "r", "--run", *runs[0], check=False)
    assert r.returncode == 2 and "no --run given for miss.b" in r.stderr


def test_make_study_dry_run_trains_each_distinct_backbone_once_then_reports(tmp_path):
    import subprocess

    for p in ROOT.iterdir():
        if p.name not in {"data", "runs", "submissions", "reports", ".git", ".make", ".pytest_cache"}:
            (tmp_path / p.name).symlink_to(p)
    f = write_study(tmp_path, """
        name: dry
        baseline: ldam
        variants:
          ldam: {}
          ldam_tau: {crt_method: tau}
          bce: {loss: bce, head: linear, drw_epoch: -1}
          bce_flip: {loss: bce, head: linear, drw_epoch: -1, tta: flip}
        """)
    (tmp_path / "t.csv").write_text("ImageID\n")
    args = ["make", "--no-print-directory", "--dry-run", "study", f"STUDY={f.name}", "DATASET=dry", "IMG_SIZE=32",
            "TRAIN_CSV=t.csv", "IMAGE_DIR=.", "TEST_CSV=t.csv", "CONFIGS=configs/bce.yaml"]
    p = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stdout.replace("\\\n", " ").splitlines()  # recipes continue lines with a backslash
    trained = sorted(x.split("--out ")[1].split()[0] for x in lines if "train.py" in x)
    # ldam = configs/demo.yaml's training; the tau/flip variants only change post-training keys
    assert trained == ["runs/dry_32/dry.bce", "runs/dry_32/dry.ldam"], trained
    heads = sorted(x.split("--out ")[1].split()[0] for x in lines if "retrain_head.py" in x)
    assert heads == [f"runs/dry_32/dry.{v}/crt" for v in ("bce", "bce_flip", "ldam", "ldam_tau")]
    assert "runs/dry_32/dry.ldam " in next(x for x in lines if "retrain_head.py" in x and "ldam_tau" in x)
    report = [x for x in lines if "study.py report" in x]
    assert len(report) == 1 and report[0].count("--run ") == 4 and "--out reports/dry" in report[0]
    assert not any("ensemble.py" in x for x in lines)
    q = subprocess.run(["make", "--no-print-directory", "study", "DATASET=dry"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert q.returncode != 0 and "make study needs STUDY=" in q.stderr
