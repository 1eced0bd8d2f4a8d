"""The bad-input corpus, round 3, by kind of input: metadata CSVs, the image folder, caches built in
either order, label columns, Make variables, flags, Task-2 files, study files, submissions.

Same rules as test_bad_inputs.py: every case asserts what the message names; scripts exit with
status 2 and print one `error:` line, no traceback. A warning is one `warning:` line on stderr.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxrlt.core.errors import InputError
from cxrlt.data import identity
from cxrlt.data.cache import open_cache
from cxrlt.data.cache_build import build_test_cache, build_train_cache
from test_bad_inputs import SIZE, write_dataset


@pytest.fixture
def ds(tmp_path):
    return write_dataset(tmp_path / "data")


def write_meta(path: Path, ids, projections, patient="P") -> Path:
    lines = ["ImageID,PatientID,StudyDate_DICOM,Projection"]
    lines += [f"{iid},{patient}{k % 4},2016010{k % 9},{pr}" for k, (iid, pr) in enumerate(zip(ids, projections))]
    path.write_text("\n".join(lines) + "\n")
    return path


def train(ds, out, **kw):
    return build_train_cache(ds["train_csv"], ds["image_dir"], out, SIZE, folds=2, workers=1, **kw)


# ---- metadata CSV: the Projection vocabulary ----------------------------------------------------------


@pytest.mark.parametrize("word, canonical", [
    ("POSTEROANTERIOR", "PA"), ("postero-anterior", "PA"), ("PA", "PA"), ("ANTEROPOSTERIOR", "AP"),
    ("AP", "AP"), ("AP_horizontal", "AP_horizontal"), ("AP HORIZONTAL", "AP_horizontal"), ("LATERAL", "L"),
    ("LL", "L"), ("L", "L"), ("COSTAL", "COSTAL"), ("UNK", ""), ("", ""),
])
def test_known_projection_spellings_are_mapped(word, canonical):
    assert identity.projection(word) == canonical


def test_dicom_projection_words_make_images_frontal(ds, tmp_path):
    n = 12
    words = ["POSTEROANTERIOR", "LATERAL", "ANTEROPOSTERIOR"] * 4
    meta = write_meta(tmp_path / "meta.csv", ds["ids"][:n], words)
    train(ds, tmp_path / "c/train", meta_csv=meta)
    cache = open_cache(tmp_path / "c/train")
    assert cache.has_projection
    assert cache.frontal(cache.rows()).sum() == 8  # PA + AP, not the laterals


def test_a_projection_vocabulary_with_no_known_word_is_refused_naming_the_values(ds, tmp_path):
    meta = write_meta(tmp_path / "meta.csv", ds["ids"][:12], ["FRONT", "SIDE"] * 6)
    with pytest.raises(InputError, match=r"column 'Projection': no value is a known projection \(seen: 'FRONT'"):
        train(ds, tmp_path / "c/train", meta_csv=meta)
    assert not (tmp_path / "c/train").exists()


def test_a_few_unknown_projection_words_are_a_warning_naming_them(ds, tmp_path, capsys):
    meta = write_meta(tmp_path / "meta.csv", ds["ids"][:12], ["PA"] * 10 + ["EXCLUDE", "EXCLUDE"])
    train(ds, tmp_path / "c/train", meta_csv=meta)
    err = capsys.readouterr().err
    assert "warning:" in err and "'EXCLUDE' x2" in err and "count as unknown" in err


# ---- metadata CSV: rows that match the images ------------------------------------------------------------


def test_a_metadata_csv_matching_no_training_image_is_refused(ds, tmp_path):
    meta = write_meta(tmp_path / "meta.csv", [f"other_{k}.png" for k in range(12)], ["PA"] * 12)
    with pytest.raises(InputError, match=r"no ImageID of the metadata CSV is one of the 12 training images"):
        train(ds, tmp_path / "c/train", meta_csv=meta)


def test_a_metadata_csv_matching_few_training_images_is_a_warning_with_the_count(ds, tmp_path, capsys):
    meta = write_meta(tmp_path / "meta.csv", ds["ids"][:3] + [f"other_{k}.png" for k in range(9)], ["PA"] * 12)
    train(ds, tmp_path / "c/train", meta_csv=meta)
    assert "only 3 of the 12 training images are in the metadata CSV" in capsys.readouterr().err


def test_test_images_take_only_the_projection_from_the_metadata(ds, tmp_path):
    ids = ds["ids"]
    meta = write_meta(tmp_path / "meta.csv", ids, ["PA"] * len(ids), patient="EXACT")
    train(ds, tmp_path / "c/train", meta_csv=meta)
    build_test_cache(ds["test_csv"], ds["image_dir"], tmp_path / "c/test", SIZE, meta_csv=meta, workers=1)
    tr, te = open_cache(tmp_path / "c/train"), open_cache(tmp_path / "c/test")
    assert all(p.startswith("EXACT") for p in tr.patient_keys(tr.rows()))
    assert set(te.patient_keys(te.rows())) == {"9.9E+38"}  # the test list's own column (docs/rules.md)
    assert set(te.projections(te.rows())) == {"PA"}


# ---- caches built in either order ------------------------------------------------------------------------


def test_overlap_is_refused_when_the_test_cache_is_built_first(ds, tmp_path):
    leaked = ds["ids"][:2]  # two training images also on the test list
    text = ds["test_csv"].read_text() + "".join(f"{i},20200101,9.9E+38,,,\n" for i in leaked)
    ds["test_csv"].write_text(text)
    build_test_cache(ds["test_csv"], ds["image_dir"], tmp_path / "c/test-x", SIZE, workers=1)
    with pytest.raises(InputError, match=rf"ImageID '{leaked[0]}' is a test image \(in .*test-x\); 2 training"):
        train(ds, tmp_path / "c/train")
    assert not (tmp_path / "c/train").exists()


# ---- the image folder -------------------------------------------------------------------------------------


def _move_to_subfolders(ds, names):
    img = ds["image_dir"]
    for k, name in enumerate(names):
        (img / f"part{k % 2}").mkdir(exist_ok=True)
        os.replace(img / name, img / f"part{k % 2}" / name)


def test_two_different_files_with_one_name_in_two_subfolders_are_refused_naming_both(ds, tmp_path):
    img = ds["image_dir"]
    name = ds["ids"][0]
    _move_to_subfolders(ds, ds["ids"][:2])
    (img / "part1" / name).write_bytes((img / "part1" / ds["ids"][1]).read_bytes())  # another image
    with pytest.raises(InputError, match=rf"two different files are named '{name}': .*part\d/{name} and "
                                         rf".*part\d/{name}"):
        train(ds, tmp_path / "c/train")


def test_identical_copies_in_two_subfolders_are_fine(ds, tmp_path):
    img = ds["image_dir"]
    name = ds["ids"][0]
    _move_to_subfolders(ds, [name])
    (img / "part1").mkdir()
    (img / "part1" / name).write_bytes((img / "part0" / name).read_bytes())
    train(ds, tmp_path / "c/train")


def test_images_in_a_symlinked_subfolder_are_found(ds, tmp_path):
    img = ds["image_dir"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ds["ids"][:4]:
        os.replace(img / name, elsewhere / name)
    (img / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(img, target_is_directory=True)  # a loop ends
    train(ds, tmp_path / "c/train")
    assert len(open_cache(tmp_path / "c/train").rows()) == 12


# ---- label columns -----------------------------------------------------------------------------------------


def test_the_30_official_labels_in_another_column_order_are_read_by_name(tmp_path):
    import numpy as np

    from cxrlt.core.labels import CXRLT2026_LABELS as OFFICIAL
    from cxrlt.data.tables import read_training_csv

    shuffled = OFFICIAL[::-1]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (4, 30))
    lines = ["ImageID,StudyDate_DICOM,PatientID," + ",".join(shuffled)]
    lines += [f"{k}_a.png,20170101,{k}," + ",".join(map(str, y[k])) for k in range(4)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    df, labels = read_training_csv(tmp_path / "t.csv")
    assert labels == list(OFFICIAL)  # the official order, whatever the file's
    assert (df[shuffled].to_numpy() == y).all()  # each column by its name


# ---- Make variables ------------------------------------------------------------------------------------------


def _make(*args):
    import subprocess

    from conftest import ROOT

    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("goal, assignment, culprit", [
    ("all", "POSTPROC=on", "POSTPROC=on: expected one of off auto"),
    ("all", "ENSEMBLE=avg", "ENSEMBLE=avg: expected one of mean"),
    ("all", "LOGGER=none,tensorbored", "LOGGER=none,tensorbored: tensorbored is not one of"),
    ("pretrain", "PRETRAIN_DATASET=nih chexpart", "PRETRAIN_DATASET=nih chexpart: chexpart is not one of"),
    ("pretrain", "PRETRAIN_UNCERTAIN=one", "PRETRAIN_UNCERTAIN=one: one is not one of ones zeros ignore"),
    ("pretrain", "PRETRAIN_BLANK=ones", "PRETRAIN_BLANK=ones: ones is not one of zeros ignore"),
    ("pretrain", "PRETRAIN_OFFICIAL_TEST=keep drop", "PRETRAIN_OFFICIAL_TEST=keep drop: expected one of keep drop"),
    ("task2", "ZS_METHOD=dot", "ZS_METHOD=dot: expected one of cosine softmax"),
    ("all", "TASK2=yes", "TASK2=yes: expected one of 1"),
    ("all", "DATA_DIR=my data", "DATA_DIR='my data' contains a space"),
    ("all", "NAME=my try", "NAME='my try' contains a space"),
    ("all", "NAME=demo ", "NAME='demo ' contains a space"),
    ("demo", "STATE=my state", "STATE='my state' contains a space"),
    ("task2", "ZS_PROMPTS=my prompts.yaml", "ZS_PROMPTS='my prompts.yaml' contains a space"),
])
def test_a_make_variable_outside_its_values_stops_every_goal_naming_it(tmp_path, goal, assignment, culprit):
    p = _make("-n", goal, f"STATE={tmp_path}/s", assignment)
    assert p.returncode == 2 and culprit in p.stderr, p.stderr
    assert p.stderr.count("***") == 1 and "preprocess.py" not in p.stdout
    assert not (tmp_path / "s").exists()


def _enumerated_make_variables() -> dict[str, str]:
    """Every Make variable whose comment lists its values as `a | b` -> the Makefile it is in."""
    import re

    from conftest import ROOT

    found = {}
    for mk in [ROOT / "Makefile", *sorted((ROOT / "mk").glob("*.mk"))]:
        for line in mk.read_text().splitlines():
            m = re.match(r"^([A-Z0-9_]+)\s*\?=[^#]*#(.*)$", line)
            if m and re.search(r"\S \| \S", m.group(2)):
                found[m.group(1)] = mk.read_text()
    return found


def test_every_enumerated_make_variable_is_checked_with_the_scripts_own_values():
    import re

    from cxrlt.core.config import ENSEMBLE_METHODS
    from cxrlt.data.external import BLANK_POLICIES, DATASETS, UNCERTAIN_POLICIES
    from cxrlt.training.tracking import BACKENDS
    from cxrlt.zeroshot.scoring import METHODS

    found = _enumerated_make_variables()
    not_an_enum = {"ZS_MODEL"}  # hf-hub:ORG/REPO | local-dir:FOLDER | a config name: a pattern, not a list
    assert {"POSTPROC", "ENSEMBLE", "LOGGER", "ZS_METHOD", "PRETRAIN_DATASET", "TASK2"} <= set(found)
    checked = {}
    for var, text in found.items():
        if var in not_an_enum:
            continue
        m = re.search(rf"\$\(call check_enum(?:_list)?,{var},([^)]*)\)", text)
        assert m, f"{var} lists its values but no check_enum checks them"
        checked[var] = m.group(1).split()
    assert checked["ENSEMBLE"] == list(ENSEMBLE_METHODS)
    assert checked["PRETRAIN_DATASET"] == list(DATASETS)
    assert checked["PRETRAIN_UNCERTAIN"] == list(UNCERTAIN_POLICIES)
    assert checked["PRETRAIN_BLANK"] == list(BLANK_POLICIES)
    assert checked["ZS_METHOD"] == list(METHODS)
    assert checked["LOGGER"] == ["none", *BACKENDS]


def test_the_defaults_and_good_values_pass_the_make_checks(tmp_path):
    for extra in ([], ["POSTPROC=auto", "ENSEMBLE=greedy", "LOGGER=tensorboard,mlflow", "TASK2=1",
                       "PRETRAIN_DATASET=nih chexpert", "PRETRAIN_UNCERTAIN=ones zeros"]):
        p = _make("help", f"STATE={tmp_path}/s", *extra)
        assert p.returncode == 0, p.stderr


# ---- weights files -----------------------------------------------------------------------------------------


def test_task2_weights_that_need_pickled_code_are_one_line_naming_the_file(tmp_path):
    """The rule for every weights file (ours, timm's pretrained_file, open_clip's): weights_only."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from cxrlt.zeroshot.scoring import load_encoder
    from cxrlt.zeroshot.tiny_clip import write_tiny_model
    from test_bad_inputs import NotAllowed

    folder = write_tiny_model(tmp_path / "clip", image_size=16)
    evil = tmp_path / "evil" / "open_clip_pytorch_model.bin"
    evil.parent.mkdir()
    shutil.copy(folder / "open_clip_config.json", evil.parent)
    torch.save({"state_dict": load_file(str(folder / "open_clip_model.safetensors")), "extra": NotAllowed()}, evil)
    with pytest.raises(InputError) as e:
        load_encoder(f"local-dir:{evil.parent}", device="cpu")
    msg = str(e.value)
    assert msg.startswith(f"{evil.parent}: refused to load: the weights file needs pickled Python objects"), msg
    assert "\n" not in msg


# ---- the plan: a dataset name that does not fit its labels ---------------------------------------------------


def _plan(tmp_path, dataset, header):
    import shutil

    from conftest import ROOT
    from cxrlt.pipeline import plan

    (tmp_path / "train.csv").write_text(",".join(["ImageID", "StudyDate_DICOM", "PatientID", *header]) + "\n")
    (tmp_path / "test.csv").write_text("ImageID\nx.png\n")
    (tmp_path / "images").mkdir(exist_ok=True)
    shutil.copy(ROOT / "configs" / "demo.yaml", tmp_path / "demo.yaml")
    argv = [f"--state={tmp_path}/.make", f"--mk={tmp_path}/.make/vars.mk", f"--dataset={dataset}",
            f"--train-csv={tmp_path}/train.csv", f"--image-dir={tmp_path}/images", f"--test-csv={tmp_path}/test.csv",
            "--img-size=64", "--folds=5", f"--configs={tmp_path}/demo.yaml", "--name=x", "--ensemble=mean",
            "--postproc=off"]
    assert plan.main(argv) == 0


NIH14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
         "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def test_dataset_cxrlt2026_for_another_label_set_is_a_warning(tmp_path, capsys):
    from cxrlt.core.labels import CXRLT2026_LABELS

    _plan(tmp_path, "cxrlt2026", NIH14)
    err = capsys.readouterr().err
    assert "warning: DATASET=cxrlt2026 but TRAIN_CSV=" in err and "has 14 labels that are not CXR-LT 2026's" in err
    _plan(tmp_path, "nih", NIH14)  # its own name: nothing to say
    _plan(tmp_path, "cxrlt2026", CXRLT2026_LABELS[::-1])  # the 30, in any order
    assert "warning" not in capsys.readouterr().err


def test_a_pretrained_file_that_needs_pickled_code_is_one_line_naming_the_file(tmp_path):
    import torch

    from cxrlt.core import config
    from cxrlt.models.model import build_model
    from test_bad_inputs import NotAllowed

    evil = tmp_path / "evil.pth"
    torch.save({"stem.0.weight": torch.zeros(1), "extra": NotAllowed()}, evil)
    cfg = config.resolve([], {"model": "test_convnext", "pretrained": True, "pretrained_file": str(evil)})
    with pytest.raises(InputError) as e:
        build_model(cfg, 3, labels=["a", "b", "c"])
    assert str(e.value).startswith(f"{evil}: refused to load: the pretrained_file needs pickled Python objects")


# ---- count flags -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["zeroshot.py", "--cache", "c", "--model", "m", "--out", "o.csv", "--batch-size", "0"],
     "argument --batch-size: expected a whole number >= 1, got 0"),
    (["zeroshot.py", "--cache", "c", "--model", "m", "--out", "o.csv", "--workers", "-1"],
     "argument --workers: expected a whole number >= 0, got -1"),
    (["pseudo_label.py", "--checkpoint", "m.pt", "--cache", "c", "--out", "o.csv", "--workers", "-2"],
     "argument --workers: expected a whole number >= 0, got -2"),
    (["preprocess.py", "train", "--train-csv", "t.csv", "--image-dir", ".", "--out", "c", "--folds", "0"],
     "argument --folds: expected a whole number >= 1, got 0"),
])
def test_count_flags_of_every_script_are_usage_errors_naming_the_flag(capsys, argv, message):
    from conftest import run_script_inprocess

    code, _, err = run_script_inprocess(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_no_script_reads_a_count_flag_as_a_bare_int():
    """The class: a count flag parsed with type=int lets 0 or -1 reach a DataLoader as a traceback."""
    import re

    from conftest import ROOT

    counts = r"--(batch-size|workers|n-boot|folds|epochs|n|n-train|n-test|max-images)"
    bare = []
    for f in [*ROOT.glob("*.py"), *(ROOT / "cxrlt").rglob("*.py")]:
        if "synth" in f.parts or "tiny_clip" in f.name:
            continue  # the demo generators: developer tools
        for m in re.finditer(rf'add_argument\("{counts}",\s*type=int\b', f.read_text()):
            bare.append(f"{f.relative_to(ROOT)}: {m.group(0)}")
    assert not bare, bare


def test_a_metadata_csv_matching_no_test_image_is_a_warning(ds, tmp_path, capsys):
    meta = write_meta(tmp_path / "meta.csv", ds["ids"][:12], ["PA"] * 12)  # the training images only
    build_test_cache(ds["test_csv"], ds["image_dir"], tmp_path / "c/test", SIZE, meta_csv=meta, workers=1)
    assert "only 0 of the 3 test-list images are in the metadata CSV" in capsys.readouterr().err
