"""Writing and validating a submission, and the submission zip.

A submission is a prediction CSV (format in cxrlt.data.tables) with the header exactly
`ImageID,<labels>` in the required label order and one row per ImageID of the test list, in
test-list order. The zip holds the CSV and NAME.json at its top, the resolved configs under
configs_resolved/ and the project's source under code/ (git-tracked files, plus the config files
the submission named when they are untracked). NAME.json (docs/formats.md) says what produced the
submission; a submission built from other inputs than the NAME.csv already there moves that one
aside to NAME@<its key>.* first (keep_aside).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pandas as pd

from cxrlt.core.errors import InputError
from cxrlt.core.fileio import atomic_path
from cxrlt.data.tables import ID, read_id_list, read_predictions


def validate_submission(path, test_list, labels: list[str]) -> pd.DataFrame:
    """The `check` rules: header exactly `ImageID,<labels>`, every ID of test_list exactly once
    and nothing else, finite probabilities in [0, 1], no blank cells. Returns the table."""
    ids = read_id_list(test_list)[ID].tolist()
    return read_predictions(path, labels, strict_order=True, expected_ids=ids, ids_source=str(test_list))


def write_submission(df: pd.DataFrame, path, test_list, labels: list[str]) -> pd.DataFrame:
    """Write `ImageID,<labels>` rows in test-list order; the written file passes the `check` rules
    (validate_submission) before it is renamed into place. df: probabilities indexed by ImageID."""
    ids = read_id_list(test_list)[ID].tolist()
    missing = [i for i in ids if i not in df.index]
    if missing:
        raise InputError(f"{test_list}: {len(missing)} listed ImageID(s) have no prediction, e.g. {missing[0]!r}")
    out = df.loc[ids, list(labels)].reset_index()
    out.columns = [ID] + list(labels)
    with atomic_path(path, suffix=".csv") as tmp:
        out.to_csv(tmp, index=False)
        validate_submission(tmp, test_list, labels)
    return out


# ---- zip ---------------------------------------------------------------------------------------
# Folders never shipped as code when git is not available.
_SKIP_DIRS = {".venv", "venv", "data", "runs", "submissions", ".git", "__pycache__",
              ".pytest_cache", ".mypy_cache", "bench/out"}


def source_files(root) -> list[str]:
    """This project's source files relative to root: `git ls-files` if root is a git work tree,
    else a walk of the tree without virtualenvs, data, runs, submissions and caches."""
    root = Path(root)
    try:
        res = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
        files = sorted(f for f in res.stdout.decode().split("\0") if f and (root / f).is_file())
        if files:  # an empty list means a repository with nothing committed yet: walk instead
            return files
    except (OSError, subprocess.CalledProcessError):
        pass
    out = []
    for d, dirs, names in os.walk(root):
        rel = Path(d).relative_to(root)
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS and str(rel / x) not in _SKIP_DIRS]
        out += [str(rel / n) for n in names if not n.endswith((".pyc", ".tmp"))]
    return sorted(out)


def write_zip(csv_path, zip_path, code_root, texts: dict | None = None, also=()) -> int:
    """Zip the submission CSV (at the top) and code_root's source under code/; returns file count.

    texts {arcname: text} are stored as given (NAME.json, the resolved configs); also: files of
    code_root that are not in its source list (an untracked config the run used) added under code/."""
    files = source_files(code_root)
    root = Path(code_root).resolve()
    for f in also:
        try:
            rel = str(Path(f).resolve().relative_to(root))
        except ValueError:
            continue  # outside the project: its resolved copy is in the zip already
        if Path(f).is_file() and rel not in files:
            files.append(rel)
    texts = texts or {}
    with atomic_path(zip_path, suffix=".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(csv_path, arcname=Path(csv_path).name)
            for name, text in texts.items():
                z.writestr(name, text)
            for f in files:
                z.write(Path(code_root) / f, arcname=f"code/{f}")
    return len(files) + len(texts) + 1


# ---- NAME.json: what produced a submission -------------------------------------------------------
# The files of one submission NAME, beside NAME.csv (NAME_eval is a folder).
FAMILY = (".csv", ".zip", ".json", ".score.json", "_eval")


def record_path(csv_path) -> Path:
    """NAME.json beside NAME.csv."""
    return Path(csv_path).with_suffix(".json")


def run_of_predictions(pred_path) -> dict:
    """What a prediction CSV came from: its run folder, the backbone run (the run itself, or the run
    whose head a cRT-only config re-trained: crt/summary.json's source), its run.json keys
    (train_key, data_key, tag) and the resolved config predict.py used (`<csv>.config.yaml`)."""
    import json

    from cxrlt.core import config

    pred = Path(pred_path)
    run = pred.parent
    backbone = run
    try:
        source = json.loads((run / "crt" / "summary.json").read_text(encoding="utf-8")).get("source")
        if source:
            backbone = Path(source).parent
    except (OSError, ValueError):
        pass
    try:
        keys = json.loads((backbone / "run.json").read_text(encoding="utf-8"))
        keys = {k: keys.get(k) for k in ("train_key", "data_key", "tag", "epochs_done", "best_epoch")}
    except (OSError, ValueError):
        keys = {"train_key": None, "data_key": None, "tag": None}
    cfg_file = Path(f"{pred}.config.yaml")
    cfg = config.load_yaml(cfg_file) if cfg_file.is_file() else None
    return {"predictions": str(pred), "run": str(run), "backbone_run": str(backbone), **keys,
            "config_file": str(cfg_file) if cfg is not None else None, "config": cfg}


def inputs_key(files: list, extra: dict) -> str:
    """16 hex of what a submission is built from: the content of its prediction files and the
    ensemble's settings (extra). Equal keys: the same submission, rebuilt."""
    from cxrlt.core.hashing import file_key, json_key

    return json_key({"files": [file_key(f) for f in files], **extra})


def keep_aside(csv_path, new_key: str) -> str | None:
    """Before NAME.csv is replaced by a submission built from other inputs (NAME.json's inputs_key
    differs, or there is a NAME.csv without NAME.json): move NAME.csv/.zip/.json/.score.json/_eval to
    NAME@<old key>.* and return the one line that says so; None when nothing was there or the
    inputs are the same."""
    import json

    from cxrlt.core.hashing import file_key

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return None
    try:
        old = json.loads(record_path(csv_path).read_text(encoding="utf-8")).get("inputs_key")
    except (OSError, ValueError):
        old = None
    if old == new_key:
        return None
    tag = (old or file_key(csv_path))[:8]
    stem = csv_path.with_suffix("")
    aside = Path(f"{stem}@{tag}")
    # an earlier copy kept aside under the same tag was built from the same inputs: the one now
    # moving aside takes its place (switching variables back and forth keeps one copy of each)
    for ext in FAMILY:
        earlier = Path(f"{aside}{ext}")
        if earlier.is_dir():
            shutil.rmtree(earlier)
        elif earlier.exists():
            earlier.unlink()
    moved = []
    for ext in FAMILY:
        src = Path(f"{stem}{ext}")
        if src.exists():
            os.replace(src, f"{aside}{ext}")
            moved.append(ext)
    return (f"{csv_path}: the submission there was built from other inputs; kept it aside as "
            f"{aside}{{{','.join(moved)}}}")
