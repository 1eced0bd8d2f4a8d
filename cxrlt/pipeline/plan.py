"""Make's plan: content stamps for every stage and the variables Make cannot compute itself.

The Makefile includes `.make/vars.mk`, whose rule runs this module on every `make` (before any
stage is considered). It reads the Make variables (passed as flags), the config files and the
input CSVs, and writes:

  .make/vars.mk    TEST_KEY (which test cache the test list maps to), STEMS, and per config
                   stem: SIZE_<stem> (its image size), INIT_<stem> (the stem whose model.pt it
                   starts from, resolution ladder), CFG_<stem> (its file), BASE_<stem> (the stem
                   whose run trains this config's backbone: configs that differ only in
                   post-training keys share one trained backbone); ENSEMBLE_SELECT (the
                   first config's selection keys, for the ensemble). A broken config or
                   variable is a one-line error and exit status 2: make stops there.
  .make/<dataset>_<size>/cache-train.stamp    what the train cache is built from
  .make/<dataset>_<size>/cache-test.stamp     what the test cache is built from
  .make/<dataset>_<size>/<stem>/{train,crt,predict-val,predict-test}.stamp
  .make/submissions/<NAME>.stamp              the variables the submission depends on
  .make/stamps/<name>.stamp                   any other stage's variables (`--stamp name=TEXT`,
                                              e.g. Task 2's model, method and test cache) and
                                              input files (`--stamp-inputs name=FILES`: their
                                              content hashes, e.g. the scoring labels)
  .make/studies/<study>/                       with --study (make study): the study's generated
                   configs (one per variant, seed and fold; they join CONFIGS' configs in STEMS)
                   and study.json; vars.mk then also sets STUDY_NAME, STUDY_STEMS, STUDY_MANIFEST
                   (cxrlt/studies/spec.py). The study's plan writes the CONFIGS' train and crt
                   stamps (its variants may share their backbones) but not their predict
                   stamps nor the submission stamp: `make study POSTPROC=off` between two
                   `make all` leaves `make all` nothing to redo.

A stamp holds, as JSON, exactly what its stage reads besides upstream stage outputs: content
hashes of input files (not their times), the config keys of the stage's group (cxrlt/core/config.py:
train keys for training, crt_* and the selection keys (select_on, proxy_require_finding) for
cRT, the post keys other than crt_* for predict) and the Make variables
it uses. It is rewritten only when that content changes, so Make's time comparison re-runs a
stage exactly when something it reads changed: a comment in a config, `touch train.csv` or a
post-training key edit leave the training stamp alone. Upstream outputs are ordinary
prerequisites; a stage that runs and finds its output already built from the same inputs only
touches it (cxrlt/pipeline/fingerprints.py), so a second `make` has nothing to do.

Runs in well under a second: no torch, no pandas; file hashes are cached by (path, size, mtime).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
from pathlib import Path

from cxrlt.core import config as config_mod
from cxrlt.core.config import ENSEMBLE_METHODS
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import write_if_changed
from cxrlt.core.hashing import file_key, json_key
from cxrlt.data.identity import test_cache_key
from cxrlt.pipeline import stage_inputs
from cxrlt.pipeline.stamps import Stamps
from cxrlt.studies.spec import expand, study_dir

STATE = Path(".make")


# ---- small pieces ---------------------------------------------------------------------------------
def portable_path(path: str) -> str:
    """How a stamp names a folder: relative to the project when it lies inside it (a copied or
    moved project keeps its stamps), else absolute. Never its time or inode."""
    if not path:
        return ""
    full = os.path.abspath(path)
    rel = os.path.relpath(full, os.getcwd())
    return full if rel == ".." or rel.startswith(".." + os.sep) else rel


def file_content(path) -> str | None:
    """The content key of an input file, None when it is not given or not a file."""
    return file_key(path) if path and os.path.isfile(path) else None


def _check_init_chain(stem: str, cfgs: dict, files: dict) -> None:
    """init_from must lead to a config that starts from pretrained weights, never back to itself."""
    chain, cur = [stem], str(cfgs[stem].get("init_from", "") or "")
    while cur and cur in cfgs:
        if cur in chain:
            loop = " -> ".join(files[s] for s in chain[chain.index(cur):] + [cur])
            raise InputError(f"{files[stem]}: init_from forms a cycle ({loop}): each run would start from "
                             f"another that is not trained yet; one config of the chain must start from "
                             f"pretrained weights (no init_from)")
        chain.append(cur)
        cur = str(cfgs[cur].get("init_from", "") or "")


def test_list_key(test_csv, meta_csv) -> str:
    """Names the test cache of a test list: the contents of the list and of META_CSV (not their
    paths or times); `none` when there is no test list."""
    if not file_content(test_csv):
        return "none"
    return test_cache_key(test_csv, meta_csv or None)


def config_overrides(args_text: str, source: str) -> dict:
    """`--key value` pairs of a Make variable such as TRAIN_ARGS, checked against the schema."""
    parser = argparse.ArgumentParser(prog=source, add_help=False, exit_on_error=False)
    config_mod.add_config_flags(parser)
    try:
        ns, rest = parser.parse_known_args(shlex.split(args_text))
    except (argparse.ArgumentError, ValueError) as e:
        raise InputError(f"{source}: {e}") from None
    if rest:
        raise InputError(f"{source}: not config flags: {' '.join(rest)} (expected --key value pairs)")
    return config_mod.overrides_from_args(ns)


def significant_args(args_text: str, ignore: dict[str, int]) -> list[str]:
    """A flag string without the flags that do not change results (flag -> number of values)."""
    words, out, i = shlex.split(args_text), [], 0
    while i < len(words):
        w = words[i]
        name = w.split("=", 1)[0]
        if name in ignore:
            i += 1 + (0 if "=" in w else ignore[name])
            continue
        out.append(w)
        i += 1
    return out


# ---- the plan -------------------------------------------------------------------------------------
def plan(a: argparse.Namespace) -> list[str]:
    """Write every stamp; return the lines of vars.mk."""
    state = Path(a.state)
    stamps = Stamps(state, dry_run=a.dry_run)
    mk: list[str] = []
    test_key = test_list_key(a.test_csv, a.meta_csv)
    mk.append(f"TEST_KEY := {test_key}")

    overrides = config_overrides(a.train_args, "TRAIN_ARGS")
    study = None
    if a.study:  # `make study`: the study's generated configs join CONFIGS (cxrlt/studies/spec.py)
        study = expand(a.study, state)
    stems, cfgs, files = [], {}, {}
    for f in a.configs.split() + [r["config"] for r in (study.runs if study else [])]:
        stem = Path(f).stem
        if stem in cfgs:
            raise InputError(f"CONFIGS: {files[stem]} and {f} have the same name '{stem}' (run folders are named "
                             f"after the config file); rename one")
        cfgs[stem] = config_mod.resolve([f], overrides)
        files[stem] = f
        stems.append(stem)
    mk.append(f"STEMS := {' '.join(stems)}")
    mk += [f"STUDY_NAME := {study.name if study else ''}",
           f"STUDY_STEMS := {' '.join(r['stem'] for r in study.runs) if study else ''}",
           f"STUDY_MANIFEST := {study_dir(state, study.name) / 'study.json' if study else ''}"]

    sizes, bases, owner = {}, {}, {}
    for stem, cfg in cfgs.items():
        size = int(cfg.get("img_size", 0) or 0) or int(a.img_size)
        sizes[stem] = size
        init = str(cfg.get("init_from", "") or "")
        if init and init not in cfgs:
            raise InputError(f"{files[stem]}: init_from '{init}' is not one of CONFIGS ({' '.join(stems)}): "
                             f"add its config to CONFIGS so that its run is trained first")
        _check_init_chain(stem, cfgs, files)
        # the first config with exactly this training owns the run; later ones reuse its backbone
        training = json_key({"train": config_mod.train_part(cfg), "size": size, "init": init})
        bases[stem] = owner.setdefault(training, stem)
        mk += [f"CFG_{stem} := {files[stem]}", f"SIZE_{stem} := {size}", f"INIT_{stem} := {init}",
               f"BASE_{stem} := {bases[stem]}"]
    mk.append("SIZES := " + " ".join(str(s) for s in sorted(set(sizes.values()) | {int(a.img_size)})))

    preprocess = significant_args(a.preprocess_args, {"--workers": 1})
    data = {"train_csv": file_content(a.train_csv), "removal_csv": file_content(a.removal_csv),
            "meta_csv": file_content(a.meta_csv), "labels_file": file_content(a.labels_file),
            "image_dir": portable_path(a.image_dir), "folds": a.folds, "preprocess_args": preprocess}
    for size in sorted(set(sizes.values()) | {int(a.img_size)}):
        root = state / f"{a.dataset}_{size}"
        stamps.write(root / "cache-train.stamp", {**data, "size": size})
        stamps.write(root / "cache-test.stamp", {
            "test_key": test_key, "meta_csv": data["meta_csv"], "image_dir": data["image_dir"], "size": size,
            "preprocess_args": preprocess})

    predict_args = significant_args(a.predict_args, {"--workers": 1, "--batch-size": 1, "--device": 1})
    study_stems = {r["stem"] for r in study.runs} if study else set()
    for stem, cfg in cfgs.items():
        d = state / f"{a.dataset}_{sizes[stem]}" / stem
        init = cfgs.get(str(cfg.get("init_from", "") or ""))
        stamps.write(d / "train.stamp", {
            "train": stage_inputs.train_keys(cfg), "size": sizes[stem],
            "init_from": stage_inputs.train_keys(init) if init else None})
        stamps.write(d / "crt.stamp", {"crt": stage_inputs.crt_keys(cfg)})
        if study and stem not in study_stems:
            # `make study` predicts only its variants (CONFIGS are there to share their backbones):
            # its POSTPROC / PREDICT_ARGS must not re-stamp the predictions `make all` made
            continue
        common = {"post": stage_inputs.predict_keys(cfg), "predict_args": predict_args, "postproc": a.postproc}
        stamps.write(d / "predict-val.stamp", common)
        stamps.write(d / "predict-test.stamp", {**common, "test_key": test_key})

    ensembled = stems[:len(a.configs.split())]  # CONFIGS' stems; a study's runs are never ensembled
    # the ensemble's weights are chosen on the first config's selection set
    selection = {k: cfgs[ensembled[0]][k] for k in config_mod.SELECTION_KEYS} if ensembled else {}
    mk.append(f"ENSEMBLE_SELECT := {config_mod.as_flags(selection)}")
    if not study:  # `make study` builds no submission: leave its stamp as `make all` wrote it
        stamps.write(state / "submissions" / f"{a.name}.stamp", {
            "dataset": a.dataset, "img_size": a.img_size, "configs": [files[s] for s in ensembled],
            "sizes": {s: sizes[s] for s in ensembled}, "ensemble": a.ensemble, "postproc": a.postproc,
            "predict_args": predict_args, "selection": selection,
            "train_args": {k: v for k, v in overrides.items() if config_mod.group(k) != "run"},
            "test_key": test_key})
    generic: dict[str, dict] = {}
    for item in a.stamp:
        name, _, text = item.partition("=")
        generic.setdefault(name, {})["text"] = text
    for item in a.stamp_inputs:  # content hashes, so that a touch re-runs nothing
        name, _, paths = item.partition("=")
        generic.setdefault(name, {})["inputs"] = {f: file_content(f) for f in shlex.split(paths)}
    for name, content in generic.items():
        stamps.write(state / "stamps" / f"{name}.stamp", content)
    stamps.close()
    return mk


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Write Make's stamps and vars.mk (run by the Makefile).")
    p.add_argument("--state", default=str(STATE))
    p.add_argument("--mk", required=True, help="the vars.mk to write")
    for name in ("dataset", "train-csv", "image-dir", "test-csv", "removal-csv", "meta-csv", "labels-file",
                 "test-labels", "img-size", "folds", "configs", "name", "ensemble", "postproc", "study"):
        p.add_argument(f"--{name}", default="")
    for name in ("train-args", "predict-args", "preprocess-args"):
        p.add_argument(f"--{name}", default="")
    p.add_argument("--explicit", default="", metavar="VARS",
                   help="the path variables the user set (Make's origin: command line or environment): each "
                        "must name an existing file or folder")
    p.add_argument("--dry-run", action="store_true",
                   help="make -n: stamps changed now get their old time back when a later plan restores them")
    p.add_argument("--stamp", action="append", default=[], metavar="NAME=TEXT",
                   help="also write STATE/stamps/NAME.stamp holding TEXT (rewritten only when it changes)")
    p.add_argument("--stamp-inputs", action="append", default=[], metavar="NAME=FILES",
                   help="the content hashes of FILES (space-separated; a missing or empty one is null) "
                        "join STATE/stamps/NAME.stamp")
    return p.parse_args(argv)


# Make variables with a fixed set of values (empty: the Makefile's default applies)
ENUM_VARIABLES = {"postproc": ("POSTPROC", ("off", "auto")), "ensemble": ("ENSEMBLE", ENSEMBLE_METHODS)}
# variables that name one file or folder, or a name that becomes one: a space would split them
SINGLE_WORD = {"dataset": "DATASET", "name": "NAME", "train_csv": "TRAIN_CSV", "image_dir": "IMAGE_DIR",
               "test_csv": "TEST_CSV", "removal_csv": "REMOVAL_CSV", "meta_csv": "META_CSV",
               "labels_file": "LABELS_FILE", "test_labels": "TEST_LABELS"}
# optional inputs: empty is fine, a path that is set must be a readable file
OPTIONAL_FILES = {"meta_csv": "META_CSV", "labels_file": "LABELS_FILE", "test_labels": "TEST_LABELS"}


# path variables with a default: a default that does not exist is "not given" (e.g. no Removal.csv),
# a value the user typed must exist (a typo must not silently drop the removal list)
EXPLICIT_PATHS = {"TRAIN_CSV": ("train_csv", "file"), "TEST_CSV": ("test_csv", "file"),
                  "REMOVAL_CSV": ("removal_csv", "file"), "IMAGE_DIR": ("image_dir", "folder")}


def _check_test_list_header(path: str) -> None:
    """The test list is read by the last stages: a wrong file is refused before any stage runs."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f), [])
    if "ImageID" not in [h.strip() for h in header]:
        found = ", ".join(header[:5]) or "an empty file"
        raise InputError(f"TEST_CSV={path}: row 1 has no 'ImageID' column (found: {found}); TEST_CSV is the list "
                         f"of images to predict")


def _warn_dataset_name(a: argparse.Namespace) -> None:
    """DATASET still the default `cxrlt2026` for a label set that is not CXR-LT's: its caches and runs
    would land in (and be mixed up with) the cxrlt2026_* folders. A warning: the run itself is right."""
    import sys

    from cxrlt.core.labels import CXRLT2026_LABELS, read_labels_file

    if a.dataset != "cxrlt2026" or not a.train_csv or not os.path.isfile(a.train_csv):
        return
    if a.labels_file and os.path.isfile(a.labels_file):
        labels = read_labels_file(a.labels_file)
    else:
        with open(a.train_csv, newline="", encoding="utf-8-sig", errors="replace") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
        labels = [h for h in header if h and h not in ("ImageID", "StudyDate_DICOM", "PatientID")]
    if set(labels) != set(CXRLT2026_LABELS):
        print(f"warning: DATASET=cxrlt2026 but TRAIN_CSV={a.train_csv} has {len(labels)} labels that are not "
              f"CXR-LT 2026's 30 (e.g. {', '.join(labels[:3])}); its caches and runs go to the cxrlt2026_* "
              f"folders: give it its own name (make ... DATASET=<name>)", file=sys.stderr)


def check_variables(a: argparse.Namespace) -> None:
    """Refuse, in one line naming the variable, a Make variable that no stage could use."""
    for var in a.explicit.split():
        if var not in EXPLICIT_PATHS:
            continue
        attr, kind = EXPLICIT_PATHS[var]
        value = getattr(a, attr)
        exists = os.path.isfile(value) if kind == "file" else os.path.isdir(value)
        if value and not exists:
            optional = " (or leave it empty to go without it)" if var == "REMOVAL_CSV" else ""
            raise InputError(f"{var}={value}: no such {kind}; check the path{optional}")
    if a.test_csv and os.path.isfile(a.test_csv):
        _check_test_list_header(a.test_csv)
    if not str(a.img_size).isdigit() or int(a.img_size) < 8:
        raise InputError(f"IMG_SIZE={a.img_size}: expected a whole number of pixels >= 8")
    for attr, (var, allowed) in ENUM_VARIABLES.items():
        value = getattr(a, attr)
        if value and value not in allowed:
            raise InputError(f"{var}={value}: expected one of {', '.join(allowed)}")
    for attr, var in SINGLE_WORD.items():
        value = getattr(a, attr)
        if value != value.strip() or any(c.isspace() for c in value):
            raise InputError(f"{var}='{value}' contains a space: Make splits it into several words; "
                             f"rename or link the path without spaces")
    for attr, var in OPTIONAL_FILES.items():
        value = getattr(a, attr)
        if value and not os.path.isfile(value):
            raise InputError(f"{var}={value}: no such file (leave {var} empty to go without it)")
        if value and not os.access(value, os.R_OK):
            raise InputError(f"{var}={value}: not readable")
    _warn_dataset_name(a)


def main(argv=None) -> int:
    a = parse_args(argv)
    check_variables(a)
    lines = plan(a)
    write_if_changed(Path(a.mk), "# written by cxrlt/pipeline/plan.py on every make; do not edit\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    from cxrlt.core.cli import main_wrapper

    main_wrapper(main)
