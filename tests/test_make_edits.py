"""`make all` is always right: after each ordinary edit a participant makes, exactly the stages that
read what changed re-run, the submission reflects the current inputs, and a further `make -n all`
has nothing to do. One test per row of docs/pipeline.md's "What re-runs when you change X" table.

One tiny world (data, caches, a trained run, its submission) is built once per module with a real
`make all`; every test works on a copy of it (`cp -a` keeps file times, so the copy is as up to
date as the original) and asserts which stage outputs were rewritten. Stages run through the fork
server of tests/forkserver.py, so a stage costs a fork, not an interpreter start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from cxrlt.data import identity

from conftest import ROOT
from forkserver import CLIENT, SHIM, ForkServer, make_env

pytestmark = pytest.mark.slow

LABELS = ["Normal", "Atelectasis", "Cardiomegaly", "Effusion"]
SIZE = 32
CONFIG = """\
model: test_resnet
pretrained: false
head: cosine
loss: ldam
ldam_s: 30.0
epochs: 1
batch_size: 16
lr: 3.0e-3
warmup_epochs: 0.5
aug_hflip: 0.0
workers: 0
device: cpu
crt_epochs: 1
tta: none
"""
# The stage outputs whose rewriting the tests follow (paths inside a world copy).
RUN = f"runs/tiny_{SIZE}/tiny"
OUTPUTS = {
    "train_cache": f"data/cache/tiny_{SIZE}/train/manifest.json",
    "train_pixels": f"data/cache/tiny_{SIZE}/train/images.npy",
    "model": f"{RUN}/model.pt",
    "crt": f"{RUN}/crt/model.pt",
    "pred_val": f"{RUN}/pred_val.csv",
    "pred_test": f"{RUN}/pred_test.csv",
    "eval": f"{RUN}/eval/metrics.json",
    "submission": "submissions/tiny.csv",
}
STAGE_SCRIPTS = ("preprocess.py", "train.py", "retrain_head.py", "predict.py", "evaluate.py", "ensemble.py")


def _mirror(repo: Path) -> None:
    """A repo folder whose code is ROOT's (symlinks) and whose data and outputs are its own."""
    repo.mkdir(parents=True)
    for p in ROOT.iterdir():
        if p.name not in {"data", "runs", "submissions", ".git", ".pytest_cache", ".make", "reports"}:
            (repo / p.name).symlink_to(p)
    for d in ("data", "runs", "submissions", "in"):
        (repo / d).mkdir()


class World:
    """A repo copy with its own inputs (in/), caches, runs and submission."""

    def __init__(self, repo: Path, server: ForkServer, client: Path, images: Path):
        self.repo, self.server, self.client, self.images = repo, server, client, images
        self.vars = {"DATASET": "tiny", "TRAIN_CSV": "in/train.csv", "IMAGE_DIR": str(images),
                     "TEST_CSV": "in/test.csv", "REMOVAL_CSV": "in/removal.csv", "TEST_LABELS": "",
                     "IMG_SIZE": str(SIZE), "FOLDS": "3", "CONFIGS": "in/tiny.yaml", "NAME": "tiny",
                     "PREDICT_ARGS": "--workers 0 --batch-size 16"}

    def make(self, *args, **over) -> subprocess.CompletedProcess:
        variables = {**self.vars, **over}
        cmd = ["make", "--no-print-directory", "-o", ".venv/.installed", *args,
               f"PY={self.server.client_command(self.client)}", *[f"{k}={v}" for k, v in variables.items()]]
        return subprocess.run(cmd, cwd=self.repo, env=make_env(), capture_output=True, text=True, timeout=900)

    def make_all(self, **over) -> subprocess.CompletedProcess:
        p = self.make("all", **over)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
        return p

    def stages_planned(self, **over) -> list[str]:
        """The stage commands `make -n all` would run (none once everything is up to date)."""
        p = self.make("-n", "all", **over)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return [line for line in p.stdout.splitlines() if any(s in line for s in STAGE_SCRIPTS)]

    def times(self) -> dict[str, int]:
        return {k: (self.repo / v).stat().st_mtime_ns for k, v in OUTPUTS.items() if (self.repo / v).exists()}

    def path(self, rel) -> Path:
        return self.repo / rel

    def submission_ids(self) -> list[str]:
        return pd.read_csv(self.repo / OUTPUTS["submission"], dtype=str)["ImageID"].tolist()


def rewritten(before: dict, after: dict) -> set[str]:
    return {k for k in after if before.get(k) != after[k]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from cxrlt.synth import generate

    tmp = tmp_path_factory.mktemp("make_edits")
    src = tmp / "src"
    generate(src, n_train=80, n_test=16, seed=5, min_side=40, max_side=64, labels=LABELS, workers=1, progress=False)
    shim, client = tmp / "shim.py", tmp / "client.py"
    shim.write_text(SHIM)
    client.write_text(CLIENT)
    server = ForkServer(shim, tmp)
    repo = tmp / "world"
    _mirror(repo)
    for name, dest in (("train.csv", "train.csv"), ("CXRLT_2026_TEST_ALL_TASK1.csv", "test.csv"),
                       ("Removal.csv", "removal.csv"), ("test_labels.csv", "test_labels.csv")):
        shutil.copy(src / name, repo / "in" / dest)
    (repo / "in" / "tiny.yaml").write_text(CONFIG)
    world = World(repo, server, client, src / "images")
    world.make_all()
    yield world, tmp
    server.close()


@pytest.fixture
def world(base, tmp_path) -> World:
    """A private copy of the built world: as up to date as the original."""
    w, _ = base
    repo = tmp_path / "world"
    subprocess.run(["cp", "-a", str(w.repo), str(repo)], check=True)
    return World(repo, w.server, w.client, w.images)


def settled(w: World, **over) -> None:
    assert w.stages_planned(**over) == [], "a further make would run stages"


# ---- the rows of the table -------------------------------------------------------------------------


def test_a_copy_of_a_finished_world_has_nothing_to_do(world):
    settled(world)
    before = world.times()
    world.make_all()
    assert rewritten(before, world.times()) == set()


def test_a_tar_copy_of_project_and_data_has_nothing_to_do_and_moved_data_decodes_nothing(world, tmp_path):
    # the data inside the project, named by a relative IMAGE_DIR (as `make demo` does)
    subprocess.run(["cp", "-a", str(world.images), str(world.path("in/images"))], check=True)
    world.make_all(IMAGE_DIR="in/images")
    settled(world, IMAGE_DIR="in/images")
    # tar keeps bytes and times (to the second): the copy's stamps, caches and runs stay valid
    dest = tmp_path / "elsewhere"
    dest.mkdir()
    subprocess.run(f"tar -C {world.repo.parent} -cf - {world.repo.name} | tar -C {dest} -xf -", shell=True,
                   check=True)
    copy = World(dest / world.repo.name, world.server, world.client, world.images)
    settled(copy, IMAGE_DIR="in/images")
    # the data moved again, this time with new file times: hashed again, nothing decoded or retrained
    subprocess.run(["cp", "-r", str(copy.path("in/images")), str(copy.path("in/moved"))], check=True)
    model = copy.path(OUTPUTS["model"]).read_bytes()
    copy.make_all(IMAGE_DIR="in/moved")
    manifest = json.loads(copy.path(OUTPUTS["train_cache"]).read_text())
    assert manifest["decoded_this_run"] == 0 and manifest["copied_rows"] == 0, manifest
    assert copy.path(OUTPUTS["model"]).read_bytes() == model
    settled(copy, IMAGE_DIR="in/moved")


def test_a_dry_run_with_a_changed_variable_leaves_the_next_real_run_nothing_to_do(world):
    assert world.stages_planned(FOLDS="4")  # a dry run that would re-run stages
    settled(world)  # ... and changes nothing a real `make all` with the old variables would see
    before = world.times()
    world.make_all()
    assert rewritten(before, world.times()) == set()


def test_comment_in_training_config_runs_nothing(world):
    cfg = world.path("in/tiny.yaml")
    cfg.write_text(cfg.read_text() + "# tried lr 1e-3 too\n")
    settled(world)


def test_post_training_keys_rerun_only_the_stages_that_read_them(world):
    before = world.times()
    cfg = world.path("in/tiny.yaml")
    cfg.write_text(cfg.read_text().replace("tta: none", "tta: flip"))
    world.make_all()
    after = world.times()
    assert rewritten(before, after) == {"pred_val", "pred_test", "eval", "submission"}
    settled(world)
    from cxrlt.pipeline.fingerprints import recorded_inputs

    assert "flip" in json.dumps(recorded_inputs(world.path(OUTPUTS["pred_test"])))
    cfg.write_text(cfg.read_text().replace("crt_epochs: 1", "crt_epochs: 2"))
    world.make_all()
    assert rewritten(after, world.times()) == {"crt", "pred_val", "pred_test", "eval", "submission"}
    settled(world)


def test_raised_epochs_continue_the_finished_run(world):
    log = world.path(f"{RUN}/metrics.jsonl")
    first = log.read_text().splitlines()
    cfg = world.path("in/tiny.yaml")
    cfg.write_text(cfg.read_text().replace("epochs: 1", "epochs: 2"))
    world.make_all()
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == first[0], "the run was redone instead of continued"
    settled(world)


def test_training_key_edit_retrains_beside_the_old_run_and_an_undo_restores_it(world):
    model = world.path(OUTPUTS["model"])
    original = model.read_bytes()
    cfg = world.path("in/tiny.yaml")
    text = cfg.read_text()
    cfg.write_text(text.replace("lr: 3.0e-3", "lr: 1.0e-3"))
    world.make_all()
    aside = [p for p in model.parent.parent.iterdir() if p.name.startswith("tiny@")]
    assert len(aside) == 1 and (aside[0] / "model.pt").read_bytes() == original
    assert model.read_bytes() != original
    settled(world)
    cfg.write_text(text)  # undo: the earlier run comes back, nothing is trained
    p = world.make_all()
    assert "train.py" in p.stdout and model.read_bytes() == original
    assert "epoch 1/1" not in p.stderr, "the undone edit retrained instead of restoring the earlier run"
    settled(world)


def test_new_test_list_decodes_only_its_new_images_and_redoes_only_test_stages(world):
    old_ids = world.submission_ids()
    old_sub = world.path(OUTPUTS["submission"]).read_bytes()
    removed = pd.read_csv(world.path("in/removal.csv"), dtype=str)["ImageID"]
    fresh = [i for i in removed if i not in set(old_ids)][:3]  # never decoded: removed from training
    test = pd.read_csv(world.path("in/test.csv"), dtype=str, keep_default_na=False)
    new = pd.concat([test.iloc[:6], pd.DataFrame({"ImageID": fresh})], ignore_index=True).fillna("")
    new.to_csv(world.path("in/test_b.csv"), index=False)
    before = world.times()
    world.make_all(TEST_CSV="in/test_b.csv")
    assert rewritten(before, world.times()) == {"pred_test", "submission"}
    assert world.submission_ids() == new["ImageID"].tolist()
    caches = sorted(p for p in world.path(f"data/cache/tiny_{SIZE}").glob("test-*") if p.is_dir())
    assert len(caches) == 2
    newest = max(caches, key=lambda p: (p / "manifest.json").stat().st_mtime_ns)
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["decoded_this_run"] == len(fresh), manifest
    settled(world, TEST_CSV="in/test_b.csv")
    world.make_all()  # back to the first list: nothing decoded, the old submission again
    assert world.path(OUTPUTS["submission"]).read_bytes() == old_sub
    settled(world)


def test_label_fold_and_removal_edits_decode_nothing_and_retrain(world):
    pixels = world.path(OUTPUTS["train_pixels"])
    pixel_time = pixels.stat().st_mtime_ns
    train = pd.read_csv(world.path("in/train.csv"), dtype=str, keep_default_na=False)
    train.loc[train.index[0], LABELS[2]] = "1" if train.loc[train.index[0], LABELS[2]] == "0" else "0"
    train.to_csv(world.path("in/train.csv"), index=False)
    for step in ({}, {"FOLDS": "4"}):
        before = world.times()
        world.make_all(**step)
        manifest = json.loads(world.path(OUTPUTS["train_cache"]).read_text())
        assert manifest["decoded_this_run"] == 0, manifest
        assert {"model", "crt", "pred_val", "pred_test", "submission"} <= rewritten(before, world.times())
        settled(world, **step)
    removal = pd.read_csv(world.path("in/removal.csv"), dtype=str, keep_default_na=False)
    kept = train["ImageID"][~train["ImageID"].isin(set(removal["ImageID"]))]
    pd.concat([removal, pd.DataFrame({"ImageID": kept.iloc[:2]})]).fillna("").to_csv(
        world.path("in/removal.csv"), index=False)
    before = world.times()
    world.make_all(FOLDS="4")
    index = pd.read_csv(world.path(f"data/cache/tiny_{SIZE}/train/index.csv"), dtype=str)
    assert not set(kept.iloc[:2]) & set(index["ImageID"])
    assert "model" in rewritten(before, world.times())
    assert json.loads(world.path(OUTPUTS["train_cache"]).read_text())["decoded_this_run"] == 0
    assert pixels.stat().st_mtime_ns == pixel_time, "a label/fold/Removal edit rewrote the pixels"
    settled(world, FOLDS="4")


def test_submission_always_reflects_the_current_variables(world):
    sub = world.path(OUTPUTS["submission"])
    first = sub.read_bytes()
    world.make_all(IMG_SIZE="16")
    assert sub.read_bytes() != first
    world.make_all()  # back to 32 px: the 32 px models' submission again, nothing retrained
    assert sub.read_bytes() == first
    settled(world)
    before = world.times()
    world.make_all(ENSEMBLE="rank")
    assert rewritten(before, world.times()) == {"submission"}
    settled(world, ENSEMBLE="rank")


def test_image_dir_change_decodes_only_images_whose_file_changed(world, tmp_path):
    images = tmp_path / "images"
    subprocess.run(["cp", "-a", str(world.images), str(images)], check=True)  # same files, same times
    before = world.times()
    model = world.path(OUTPUTS["model"]).read_bytes()
    p = world.make_all(IMAGE_DIR=str(images))
    assert "cache up to date" in p.stdout  # every source file is the same: nothing decoded or copied
    assert "train_pixels" not in rewritten(before, world.times())
    assert world.path(OUTPUTS["model"]).read_bytes() == model  # nor retrained
    settled(world, IMAGE_DIR=str(images))
    # another folder where one training image is another picture: only it is decoded again (Make sees
    # IMAGE_DIR; a file edited in place in the same folder needs `preprocess.py --force`, see docs/pipeline.md)
    other = tmp_path / "images2"
    subprocess.run(["cp", "-a", str(images), str(other)], check=True)
    train = pd.read_csv(world.path("in/train.csv"), dtype=str)
    top = train["ImageID"][train["ImageID"].map(identity.centre) == "padchest"]  # NIH's are in subfolders
    a, b = (other / top.iloc[0]), (other / top.iloc[1])
    a.write_bytes(b.read_bytes())
    world.make_all(IMAGE_DIR=str(other))
    assert json.loads(world.path(OUTPUTS["train_cache"]).read_text())["decoded_this_run"] == 1
    assert world.path(OUTPUTS["model"]).read_bytes() != model  # one image's pixels changed: retrained
    settled(world, IMAGE_DIR=str(other))


def test_preprocess_args_pass_through_make(world, tmp_path):
    images = tmp_path / "images"
    subprocess.run(["cp", "-a", str(world.images), str(images)], check=True)
    train = pd.read_csv(world.path("in/train.csv"), dtype=str)
    train = train[train["ImageID"].map(identity.centre) == "padchest"]  # files at the top of IMAGE_DIR
    bad = images / train["ImageID"].iloc[3]
    bad.write_bytes(b"not a png")
    p = world.make("all", IMAGE_DIR=str(images))
    assert p.returncode != 0 and "--skip-bad" in p.stderr
    world.make_all(IMAGE_DIR=str(images), PREPROCESS_ARGS="--skip-bad")
    manifest = json.loads(world.path(OUTPUTS["train_cache"]).read_text())
    assert [f["ImageID"] for f in manifest["failures"]] == [train["ImageID"].iloc[3]]
    settled(world, IMAGE_DIR=str(images), PREPROCESS_ARGS="--skip-bad")


def test_a_broken_config_stops_make_with_one_line(world):
    cfg = world.path("in/tiny.yaml")
    cfg.write_text(cfg.read_text() + "lr: fast\n")
    p = world.make("all")
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors and "tiny.yaml" in errors[0] and "Traceback" not in p.stderr


def test_stage_outputs_are_refused_when_run_by_hand_on_other_inputs(world):
    """predict.py by hand on a checkpoint trained at another size: a clear message, not garbage."""
    world.make_all(IMG_SIZE="16")
    p = world.make("-n", "all")  # the 32 px world is still complete
    assert p.returncode == 0
    env = dict(make_env())
    q = subprocess.run([str(ROOT / ".venv/bin/python"), "predict.py", "--checkpoint", "runs/tiny_16/tiny/crt/model.pt",
                        "--cache", f"data/cache/tiny_{SIZE}/train", "--split", "val", "--out", "x.csv"],
                       cwd=world.repo, env=env, capture_output=True, text=True, timeout=300)
    assert q.returncode == 2 and "size" in q.stderr and "Traceback" not in q.stderr
    assert not (world.repo / "x.csv").exists()
    assert os.path.exists(world.path(OUTPUTS["model"]))
