"""Make's plan (cxrlt/pipeline/plan.py): a stamp changes exactly when what its stage reads changes."""

import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT
from cxrlt.pipeline import plan
from cxrlt.core.errors import InputError

STAGES = ["cache-train", "cache-test", "demo/train", "demo/crt", "demo/predict-val", "demo/predict-test"]


@pytest.fixture
def setup(tmp_path):
    for name in ("train.csv", "test.csv", "removal.csv"):
        (tmp_path / name).write_text(f"ImageID\n{name}.png\n")
    (tmp_path / "images").mkdir()
    cfg = tmp_path / "demo.yaml"
    shutil.copy(ROOT / "configs" / "demo.yaml", cfg)
    return tmp_path


def with_values(cfg: Path, **values) -> str:
    """The text of a YAML config with each key's line set to the value (a key may appear once)."""
    lines = [x for x in cfg.read_text().splitlines() if x.split(":")[0].strip() not in values]
    return "\n".join(lines + [f"{k}: {v}" for k, v in values.items()]) + "\n"


def run_plan(d: Path, **over) -> dict[str, int]:
    """Run the plan with the given Make variables; -> {stamp: mtime_ns} (plus the submission's)."""
    args = dict(state=d / ".make", mk=d / ".make" / "vars.mk", dataset="demo", train_csv=d / "train.csv",
                image_dir=d / "images", test_csv=d / "test.csv", removal_csv=d / "removal.csv", img_size="64",
                folds="5", configs=str(d / "demo.yaml"), name="demo", ensemble="mean", postproc="off")
    args.update(over)
    argv = []
    for k, v in args.items():
        argv.append(f"--{k.replace('_', '-')}={v}")
    assert plan.main(argv) == 0
    size = over.get("img_size", "64")
    out = {s: (d / ".make" / f"demo_{size}" / f"{s}.stamp").stat().st_mtime_ns for s in STAGES}
    out["submission"] = (d / ".make" / "submissions" / f"{args['name']}.stamp").stat().st_mtime_ns
    return out


def changed(before, after) -> set[str]:
    return {k for k in before if before[k] != after.get(k)}


def test_each_edit_changes_exactly_the_stamps_of_the_stages_that_read_it(setup):
    d = setup
    first = run_plan(d)
    assert changed(first, run_plan(d)) == set()  # nothing edited: nothing rewritten

    current = {}

    def edit(expected, **over):  # Make variables accumulate, as on a user's command line
        nonlocal first
        current.update(over)
        os.utime(d / "train.csv", None)  # a newer file time alone never counts
        now = run_plan(d, **current)
        assert changed(first, now) == expected, over
        first = now

    cfg = d / "demo.yaml"
    cfg.write_text(cfg.read_text() + "\n# a comment\n")
    edit(set())
    cfg.write_text(with_values(cfg, tta="flip"))
    edit({"demo/predict-val", "demo/predict-test"})
    cfg.write_text(with_values(cfg, crt_lr=0.5))
    edit({"demo/crt"})
    # the selection keys: cRT chooses its head on the selection set, predict its post-processing,
    # the ensemble its weights (with the first config's keys, passed on by vars.mk)
    cfg.write_text(with_values(cfg, select_on="full"))
    edit({"demo/crt", "demo/predict-val", "demo/predict-test", "submission"})
    cfg.write_text(with_values(cfg, proxy_require_finding="true"))
    edit({"demo/crt", "demo/predict-val", "demo/predict-test", "submission"})
    assert "ENSEMBLE_SELECT := --select-on full --proxy-require-finding true" in (d / ".make" / "vars.mk").read_text()
    cfg.write_text(with_values(cfg, lr=0.01))
    edit({"demo/train"})
    (d / "removal.csv").write_text("ImageID\nother.png\n")
    edit({"cache-train"})
    (d / "test.csv").write_text("ImageID\nnew.png\n")
    edit({"cache-test", "demo/predict-test", "submission"})
    edit({"cache-train"}, folds="3")
    edit({"cache-train", "cache-test"}, preprocess_args="--skip-bad")
    edit(set(), preprocess_args="--skip-bad --workers 3")  # workers never change a result
    edit({"demo/train", "submission"}, train_args="--epochs 3")
    edit(set(), train_args="--epochs 3 --workers 0")  # a run key: no stage re-runs
    edit({"demo/predict-val", "demo/predict-test", "submission"}, predict_args="--tta none")
    edit(set(), predict_args="--tta none --batch-size 8")
    edit({"submission"}, ensemble="rank")


def test_vars_mk_names_the_test_cache_by_content_and_each_config_size(setup):
    d = setup
    run_plan(d)
    mk = (d / ".make" / "vars.mk").read_text()
    key = next(line.split(":= ")[1] for line in mk.splitlines() if line.startswith("TEST_KEY"))
    from cxrlt.data.identity import test_cache_key

    assert key == test_cache_key(d / "test.csv")  # the folder preprocess.py and the plan agree on
    assert len(key) == 12 and "SIZE_demo := 64" in mk and "STEMS := demo" in mk
    shutil.copy(d / "test.csv", d / "test_copy.csv")  # same content elsewhere: same cache
    run_plan(d, test_csv=d / "test_copy.csv")
    assert f"TEST_KEY := {key}" in (d / ".make" / "vars.mk").read_text()


def test_bad_variables_and_configs_are_one_line_errors(setup):
    d = setup
    with pytest.raises(InputError, match="IMG_SIZE"):
        run_plan(d, img_size="big")
    with pytest.raises(InputError, match="TRAIN_ARGS"):
        run_plan(d, train_args="--not_a_key 3")
    (d / "bad.yaml").write_text("lr: fast\n")
    with pytest.raises(InputError, match="bad.yaml"):
        run_plan(d, configs=str(d / "bad.yaml"))
    (d / "x").mkdir()
    shutil.copy(d / "demo.yaml", d / "x" / "demo.yaml")
    with pytest.raises(InputError, match="same name"):
        run_plan(d, configs=f"{d / 'demo.yaml'} {d / 'x' / 'demo.yaml'}")


def test_configs_differing_only_in_post_training_keys_share_one_backbone(setup):
    d = setup
    (d / "tta.yaml").write_text(with_values(d / "demo.yaml", tta="flip", crt_lr=0.5))
    (d / "other.yaml").write_text(with_values(d / "demo.yaml", lr=0.5))
    run_plan(d, configs=f"{d / 'demo.yaml'} {d / 'tta.yaml'} {d / 'other.yaml'}")
    mk = (d / ".make" / "vars.mk").read_text().splitlines()
    assert {"BASE_demo := demo", "BASE_tta := demo", "BASE_other := other"} <= set(mk)


@pytest.mark.parametrize("over,culprit", [
    (dict(postproc="on"), "POSTPROC=on: expected one of off, auto"),
    (dict(ensemble="avg"), "ENSEMBLE=avg: expected one of mean"),
    (dict(name="my try"), "NAME='my try' contains a space"),
    (dict(dataset="demo "), "DATASET='demo ' contains a space"),
    (dict(meta_csv="no/such/meta.csv"), "META_CSV=no/such/meta.csv: no such file"),
    (dict(test_labels="missing.csv"), "TEST_LABELS=missing.csv: no such file"),
])
def test_make_variables_no_stage_could_use_are_refused_naming_the_variable(setup, over, culprit):
    with pytest.raises(InputError) as e:
        run_plan(setup, **over)
    assert culprit in str(e.value) and "\n" not in str(e.value)
    assert not (setup / ".make" / "vars.mk").exists()  # refused before any stamp is written


def test_make_show_plan_prints_the_generated_variables_and_rules(tmp_path):
    import subprocess

    from conftest import ROOT

    state = tmp_path / "state"
    p = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "show-plan", f"STATE={state}",
                        "CONFIGS=configs/demo.yaml configs/bce.yaml", "DATASET=nih", "IMG_SIZE=64"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.index("STEMS := demo bce") < out.index("runs/nih_64/demo/model.pt:")  # variables, then rules
    for target in ("runs/nih_64/bce/model.pt:", "runs/nih_64/demo/crt/model.pt:", "runs/nih_64/bce/pred_test.csv:",
                   "data/cache/nih_64/train/manifest.json:"):
        assert target in out, target
    assert not (ROOT / "runs" / "nih_64").exists()  # printed, not run


def test_make_clean_removes_the_state_and_never_outputs(tmp_path):
    import subprocess

    from conftest import ROOT

    state = tmp_path / "state"
    (state / "demo_64").mkdir(parents=True)
    (state / "vars.mk").write_text("STEMS :=\n")
    runs = tmp_path / "runs"
    (runs / "x").mkdir(parents=True)
    p = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "clean", f"STATE={state}",
                        f"RUNS_ROOT={runs}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert not state.exists() and (runs / "x").is_dir()


@pytest.mark.parametrize("var, attr, expect", [
    ("REMOVAL_CSV", "removal_csv", "REMOVAL_CSV={p}: no such file; check the path (or leave it empty"),
    ("TEST_CSV", "test_csv", "TEST_CSV={p}: no such file"),
    ("TRAIN_CSV", "train_csv", "TRAIN_CSV={p}: no such file"),
    ("IMAGE_DIR", "image_dir", "IMAGE_DIR={p}: no such folder"),
])
def test_a_path_variable_the_user_set_must_exist_before_any_stamp(setup, var, attr, expect):
    typo = setup / "Removel.csv"
    with pytest.raises(InputError) as e:
        run_plan(setup, explicit=var, **{attr: typo})
    assert str(e.value).startswith(expect.format(p=typo))
    assert not (setup / ".make").exists()  # nothing written
    run_plan(setup, **{attr: typo} if var == "REMOVAL_CSV" else {})  # a default that does not exist: not given


def test_a_test_list_without_an_imageid_column_is_refused_up_front(setup):
    (setup / "test.csv").write_text("Image Index,Finding Labels\n00000001_000.png,Mass\n")
    with pytest.raises(InputError, match=r"TEST_CSV=.*test.csv: row 1 has no 'ImageID' column \(found: Image Index"):
        run_plan(setup)
    assert not (setup / ".make").exists()


def test_make_stops_on_a_mistyped_removal_csv_before_any_stage(tmp_path):
    import subprocess

    from conftest import ROOT

    p = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "-n", "all", f"STATE={tmp_path}/s",
                        f"REMOVAL_CSV={tmp_path}/Removel.csv"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and f"REMOVAL_CSV={tmp_path}/Removel.csv: no such file" in p.stderr
    assert "preprocess.py" not in p.stdout


@pytest.mark.parametrize("pair", [False, True])
def test_an_init_from_cycle_is_refused_naming_the_configs(setup, pair):
    a = setup / "a.yaml"
    b = setup / "b.yaml"
    a.write_text(with_values(setup / "demo.yaml", init_from="b" if pair else "a"))
    b.write_text(with_values(setup / "demo.yaml", init_from="a"))
    configs = f"{a} {b}" if pair else str(a)
    loop = f"{a} -> {b} -> {a}" if pair else f"{a} -> {a}"
    with pytest.raises(InputError, match=f"init_from forms a cycle \\({loop}\\)"):
        run_plan(setup, configs=configs)
    assert not (setup / ".make").exists()
