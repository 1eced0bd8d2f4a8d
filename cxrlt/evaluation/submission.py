"""Writing and validating a submission, and the submission zip.

A submission is a prediction CSV (format in cxrlt.data.tables) with the header exactly
`ImageID,<labels>` in the required label order and one row per ImageID of the test list, in
test-list order. The zip holds the CSV at its top and the project's source under code/.
"""

from __future__ import annotations

import os
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


def write_zip(csv_path, zip_path, code_root) -> int:
    """Zip the submission CSV (at the top) and code_root's source under code/; returns file count."""
    files = source_files(code_root)
    with atomic_path(zip_path, suffix=".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(csv_path, arcname=Path(csv_path).name)
            for f in files:
                z.write(Path(code_root) / f, arcname=f"code/{f}")
    return len(files) + 1
