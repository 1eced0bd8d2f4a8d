"""Reading and validating the CSVs that carry predictions and labels, and the submission zip.

File formats (rows are numbered as in a text editor: the header is row 1):
- Prediction CSV (predict.py, ensemble.py; the leaderboard submission has the same layout):
  `ImageID,<label 1>,...,<label C>`, one row per image, probabilities in [0, 1], no blanks.
- Test list: `ImageID,StudyDate_DICOM,PatientID`, optionally followed by empty columns (the
  official CXRLT_2026_TEST_ALL_TASK1.csv has 30 trailing empty fields). Only ImageID is used.
- Label table, either layout:
  * cache index `index.csv`: `row,ImageID,StudyDate_DICOM,PatientID,study,patient,projection,split,fold,<labels>`
    with 0/1 labels (a train cache's);
  * training layout: `ImageID,StudyDate_DICOM,PatientID,<labels>` with 0/1 labels.
  The label columns are every column that is not one of those ID/bookkeeping columns.
"""

from __future__ import annotations

import csv
import os
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .fileio import atomic_path

ID = "ImageID"
# Columns of the index / training CSV that are not labels.
NON_LABEL_COLUMNS = ("row", "ImageID", "StudyDate_DICOM", "PatientID", "study", "patient", "projection", "split",
                     "fold")


# ---- low-level reading ---------------------------------------------------------------------
def read_header(path) -> list[str]:
    """The first line of a CSV as a list of names (exact, duplicates kept)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise InputError(f"{path}: empty file (no header row)")
    return header


def read_str_csv(path) -> pd.DataFrame:
    """The whole CSV as strings ('' for blank or missing cells); parse errors -> InputError."""
    read_header(path)  # clear message for a missing or empty file
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not a readable CSV ({str(e).strip().splitlines()[-1]})") from None
    return df.fillna("")  # a short row leaves NaN in its missing trailing cells


def file_row(i: int) -> int:
    """File row number of the 0-based data row i (the header is row 1)."""
    return int(i) + 2


def label_columns(header: list[str], path) -> list[str]:
    """The label columns of an index / training-layout / prediction header, in file order."""
    labels = [c for c in header if c not in NON_LABEL_COLUMNS]
    if not labels:
        raise InputError(f"{path}: no label columns after the ID columns")
    blank = [i + 1 for i, c in enumerate(header) if not c.strip()]
    if blank:
        raise InputError(f"{path}: row 1, column {blank[0]}: empty column name")
    dup = sorted({c for c in labels if labels.count(c) > 1})
    if dup:
        raise InputError(f"{path}: row 1: duplicate column(s) {dup}")
    return labels


def labels_from_file(path) -> list[str]:
    """Label names from the header of a training CSV, cache index or prediction CSV."""
    return label_columns(read_header(path), path)


# ---- probabilities ---------------------------------------------------------------------------
def _describe_cell(text: str) -> str | None:
    """Why a probability cell is invalid, or None if it is a finite value in [0, 1]."""
    if not text.strip():
        return "blank cell"
    try:
        v = float(text)
    except ValueError:
        return f"not a number: {str(text)!r}"
    if np.isnan(v):
        return "NaN value"
    if np.isinf(v):
        return f"infinite value {text.strip()!r}"
    if not 0.0 <= v <= 1.0:
        return f"value {text.strip()} outside [0, 1]"
    return None


def parse_probabilities(cells: pd.DataFrame) -> tuple[np.ndarray, tuple[int, int, str] | None]:
    """Float matrix of the cells and the first invalid cell (data row, column index, reason).

    Row-major order, so "first" is the first bad cell reading the file top to bottom.
    """
    text = cells.to_numpy(dtype=str)
    blank = np.char.str_len(np.char.strip(text)) == 0
    values = pd.DataFrame(text).apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = blank | ~np.isfinite(values) | (values < 0) | (values > 1)
    if not bad.any():
        return values, None
    r, c = np.argwhere(bad)[0]
    return values, (int(r), int(c), _describe_cell(text[r, c]) or "invalid value")


# ---- prediction / submission CSVs ---------------------------------------------------------------
@dataclass
class Problem:
    """One validation problem, located in the file (row 1 = header, columns 1-based)."""

    row: int
    column: int | None
    column_name: str | None
    message: str

    def format(self, path) -> str:
        where = f"row {self.row}"
        if self.column is not None:
            where += f", column {self.column} ({self.column_name!r})"
        return f"{path}: {where}: {self.message}"


def _check_header(header: list[str], path, labels, strict_order: bool) -> list[str]:
    """Check `ImageID,<labels>`; return the file's label columns. Raises on the first problem."""
    if header[0] != ID:
        raise InputError(f"{path}: row 1, column 1: expected {ID!r}, found {header[0]!r}")
    cols = label_columns(header, path)
    if len(cols) != len(header) - 1:
        extra = [c for c in header[1:] if c in NON_LABEL_COLUMNS]
        raise InputError(f"{path}: row 1: unexpected ID column(s) {extra} after {ID!r}")
    if labels is None:
        return cols
    missing = [c for c in labels if c not in cols]
    extra = [c for c in cols if c not in labels]
    if missing or extra:
        col = next((i for i, c in enumerate(cols) if c not in labels), None)
        where = f"row 1, column {col + 2} ({cols[col]!r})" if col is not None else "row 1"
        raise InputError(
            f"{path}: {where}: header does not match the expected labels "
            f"(missing {missing}, unexpected {extra})"
        )
    if strict_order and cols != list(labels):
        i = next(i for i, (a, b) in enumerate(zip(cols, labels)) if a != b)
        raise InputError(
            f"{path}: row 1, column {i + 2}: expected {labels[i]!r}, found {cols[i]!r} "
            f"(same labels, wrong column order; the required order is ImageID,{','.join(labels)})"
        )
    return cols


def _id_problems(ids: pd.Series, expected_ids, ids_source) -> list[Problem]:
    """First blank, duplicated and unexpected ImageID (each as a Problem, at most one of each)."""
    out = []
    blank = np.flatnonzero(ids.str.strip() == "")
    if len(blank):
        out.append(Problem(file_row(blank[0]), 1, ID, "blank ImageID"))
    dup = np.flatnonzero(ids.duplicated().to_numpy() & (ids.str.strip() != "").to_numpy())
    if len(dup):
        first = int(np.flatnonzero((ids == ids.iloc[dup[0]]).to_numpy())[0])
        out.append(
            Problem(file_row(dup[0]), 1, ID,
                    f"duplicate ImageID {ids.iloc[dup[0]]!r} (first at row {file_row(first)})")
        )
    if expected_ids is not None:
        unexpected = np.flatnonzero(~ids.isin(set(expected_ids)).to_numpy())
        if len(unexpected):
            i = unexpected[0]
            out.append(
                Problem(file_row(i), 1, ID,
                        f"ImageID {ids.iloc[i]!r} is not in {ids_source} "
                        f"({len(unexpected)} such row(s))")
            )
    return out


def read_predictions(
    path,
    labels: list[str] | None = None,
    strict_order: bool = False,
    expected_ids: list[str] | None = None,
    ids_source: str = "the expected ID list",
) -> pd.DataFrame:
    """Read and validate a prediction CSV; return floats indexed by ImageID (str).

    labels: the required label set (None: whatever the header has). strict_order: the header
    must be exactly `ImageID,<labels>` in that order (submission format); otherwise columns are
    matched by name and returned in `labels` order. expected_ids: the file must hold exactly these
    IDs, each once (ids_source names that list in messages). The first problem in file order
    raises InputError naming the file, row and column.
    """
    header = read_header(path)
    cols = _check_header(header, path, labels, strict_order)
    df = read_str_csv(path)
    if df.shape[1] != len(header):
        raise InputError(f"{path}: row 1 has {len(header)} columns but the rows have {df.shape[1]}")
    if df.empty:
        raise InputError(f"{path}: no data rows after the header")
    df.columns = [ID] + cols
    ids = df[ID]
    problems = _id_problems(ids, expected_ids, ids_source)
    values, bad = parse_probabilities(df[cols])
    if bad is not None:
        r, c, why = bad
        problems.append(Problem(file_row(r), c + 2, cols[c], why))
    if problems:
        first = min(problems, key=lambda q: (q.row, q.column or 0))
        raise InputError(first.format(path))
    if expected_ids is not None:
        present = set(ids)
        missing = [i for i in expected_ids if i not in present]
        if missing:
            raise InputError(
                f"{path}: {len(missing)} ImageID(s) of {ids_source} have no row, "
                f"e.g. {missing[0]!r}"
            )
    out = pd.DataFrame(values, index=pd.Index(ids.to_numpy(), name=ID), columns=cols)
    return out[list(labels)] if labels is not None else out


def read_id_list(path) -> list[str]:
    """ImageIDs of a test list (`ImageID,...`, trailing empty columns allowed), in file order.

    The same reader and checks as the cache build (cxrlt.csvio.read_id_list)."""
    from .csvio import read_id_list as read_ids

    return read_ids(path)[ID].tolist()


def validate_submission(path, test_list, labels: list[str]) -> pd.DataFrame:
    """The `check` rules: header exactly `ImageID,<labels>`, every ID of test_list exactly once
    and nothing else, finite probabilities in [0, 1], no blank cells. Returns the table."""
    ids = read_id_list(test_list)
    return read_predictions(path, labels, strict_order=True, expected_ids=ids, ids_source=str(test_list))


def write_submission(df: pd.DataFrame, path, test_list, labels: list[str]) -> pd.DataFrame:
    """Write `ImageID,<labels>` rows in test-list order; the written file passes the `check` rules
    (validate_submission) before it is renamed into place. df: probabilities indexed by ImageID."""
    ids = read_id_list(test_list)
    missing = [i for i in ids if i not in df.index]
    if missing:
        raise InputError(f"{test_list}: {len(missing)} listed ImageID(s) have no prediction, e.g. {missing[0]!r}")
    out = df.loc[ids, list(labels)].reset_index()
    out.columns = [ID] + list(labels)
    with atomic_path(path, suffix=".csv") as tmp:
        out.to_csv(tmp, index=False)
        validate_submission(tmp, test_list, labels)
    return out


# ---- label tables ---------------------------------------------------------------------------------
@dataclass
class LabelTable:
    """Ground truth for a set of images plus the training frequencies of the labels.

    y: (N, C) int8 in the order of `ids`. train_counts: (C,) positives among the training images
    (None when the table has no training rows, e.g. a training-layout file of test labels).
    """

    ids: list[str]
    labels: list[str]
    y: np.ndarray
    is_index: bool
    train_counts: np.ndarray | None
    n_train: int


def _parse_labels(cells: pd.DataFrame, path, row_numbers: np.ndarray) -> np.ndarray:
    """0/1 strings -> int8 matrix; anything else (blank included) -> InputError with row/column."""
    text = np.char.strip(cells.to_numpy(dtype=str))
    values = pd.DataFrame(text).apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        why = "blank label (no ground truth for this image)" if not text[r, c] else f"label {str(text[r, c])!r} is not 0 or 1"
        raise InputError(f"{path}: row {row_numbers[r]}, column {cells.columns[c]!r}: {why}")
    return values.astype(np.int8)


def read_label_table(path, ids: list[str] | None = None, ids_source: str = "the predictions") -> LabelTable:
    """Read a cache index or a training-layout label CSV.

    Index: the rows whose ImageID is in `ids` (all train rows if ids is None); training counts
    come from its split == 'train' rows. Training layout: no training counts, and `ids` must
    cover every row (a labelled image without a prediction is an error, not silently dropped).
    Every requested ID must be present with 0/1 labels. Rows come back in the order of `ids`.
    """
    header = read_header(path)
    labels = label_columns(header, path)
    if ID not in header:
        raise InputError(f"{path}: row 1: no {ID!r} column")
    df = read_str_csv(path)
    for p in _id_problems(df[ID], None, None):
        raise InputError(p.format(path))
    is_index = "split" in header
    train_counts, n_train = None, 0
    if is_index:
        train = (df["split"] == "train").to_numpy()
        n_train = int(train.sum())
        rows = np.flatnonzero(train)
        train_counts = _parse_labels(df.loc[train, labels], path, rows + 2).sum(0).astype(np.int64)
    if ids is None:
        sel = np.flatnonzero(df["split"] == "train") if is_index else np.arange(len(df))
    else:
        pos = pd.Series(np.arange(len(df)), index=df[ID])
        unknown = [k for k, i in enumerate(ids) if i not in pos.index]
        if unknown:
            k = unknown[0]
            raise InputError(f"{path}: no row for ImageID {ids[k]!r} (row {k + 2} of {ids_source}; "
                             f"{len(unknown)} such ID(s))")
        sel = pos.loc[ids].to_numpy()
        if not is_index and len(sel) < len(df):
            k = int(np.flatnonzero(~df[ID].isin(set(ids)).to_numpy())[0])
            raise InputError(f"{path}: row {k + 2}: ImageID {df[ID].iloc[k]!r} has no row in "
                             f"{ids_source} ({len(df) - len(sel)} labelled image(s) without one)")
    y = _parse_labels(df.iloc[sel][labels], path, sel + 2)
    return LabelTable(df[ID].iloc[sel].tolist(), labels, y, is_index, train_counts, n_train)


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
