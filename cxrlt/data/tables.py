"""Reading and validating every challenge table: the one CSV layer.

Tables (column names are case- and space-sensitive; rows are numbered as a spreadsheet shows them:
the header is row 1, the first data row is row 2):

* Training CSV (`train.csv`): `ImageID,StudyDate_DICOM,PatientID` (ID_COLUMNS), then one 0/1
  column per label. The label set is every other named column, in file order, or exactly the
  labels of a labels file (one name a line) when one is given. Without a labels file, a set close
  to the official 30 labels but not equal to them stops (cxrlt.core.labels.check_label_set).
* ID list (the test list `CXRLT_2026_TEST_ALL_TASK1.csv`, `Removal.csv`): an `ImageID` column,
  optionally `StudyDate_DICOM` and `PatientID`. Any other column is ignored, including the 30
  unnamed, empty trailing columns of the official test list.
* Metadata CSV (META_CSV, plain or .gz; PadChest's `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`
  layout): `ImageID, StudyID, PatientID, StudyDate_DICOM, Projection, ViewPosition_DICOM, ...`.
  Only META_COLUMNS are read (ImageID, PatientID and Projection required), with pandas: never its
  `Labels` or `Report` columns, which hold the labels of the evaluation images.
* Prediction CSV (predict.py, ensemble.py; a submission is one): `ImageID,<label 1>,...,<label C>`,
  one row per image, probabilities in [0, 1], no blank cell.
* Label table (evaluate.py, `ensemble.py combine --val-labels`), either layout:
  - a cache's `index.csv`: INDEX_FIXED_COLUMNS, then the labels: 0/1 on train rows (a test
    cache has no label columns);
  - the training-CSV layout with 0/1 labels.
  Its label columns are every named column not in NON_LABEL_COLUMNS, so an index that gains a
  non-label column stays readable once the column is listed there.

Rules shared by every table: UTF-8 text (a BOM is accepted), CRLF line endings accepted,
comma-separated (a `;`- or tab-separated file is named as such), blank lines skipped, every cell
kept as a string (the official PatientID is in Excel float form `1.90E+38` and must not become a
number), no duplicated or space-padded column name, no row with more values than the header (a
shorter row is padded with blanks). An unnamed column must be empty. Any problem raises InputError
naming the file, the row and the column.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import os
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cxrlt.core.errors import InputError
from cxrlt.core.labels import by_name, check_label_set, read_labels_file

# pandas is imported inside the functions: the cache's decode workers import this module (for the
# column names) through cxrlt.data.cache, and start in ~0.5 s without pandas instead of ~2 s.
if TYPE_CHECKING:
    import pandas as pd

# ---- the column names (defined here only) -----------------------------------------------------------
ID = "ImageID"
ID_COLUMNS = ["ImageID", "StudyDate_DICOM", "PatientID"]
# The study, patient and projection keys of a cache index (rules: cxrlt/data/identity.py): never labels.
INDEX_KEY_COLUMNS = ["study", "patient", "projection", "centre"]
# A cache index.csv's columns before the labels, in order (cxrlt/data/cache.py).
INDEX_FIXED_COLUMNS = ["row", *ID_COLUMNS, *INDEX_KEY_COLUMNS, "split", "fold"]
# Every column of a challenge table that is not a label.
NON_LABEL_COLUMNS = tuple(dict.fromkeys([*INDEX_FIXED_COLUMNS, *INDEX_KEY_COLUMNS]))

# The metadata CSV's columns that are read (the others, Labels and Report among them, never are).
META_COLUMNS = ["ImageID", "StudyID", "PatientID", "StudyDate_DICOM", "Projection", "ViewPosition_DICOM", "Centre"]
META_REQUIRED = ["ImageID", "PatientID", "Projection"]

# How many offending cells/IDs an error message lists before "... and N more".
_MAX_LISTED = 3
_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "vertical bar"}


# ---- the tables ------------------------------------------------------------------------------------------


def read_training_csv(path, labels_file=None) -> tuple[pd.DataFrame, list[str]]:
    """Read the training CSV -> (df, labels).

    df columns: ImageID, StudyDate_DICOM, PatientID (str), then the labels (int8 0/1), in order.
    Every reader's DataFrame index ("csv_row") is each row's spreadsheet row number (header =
    1), for error messages downstream; use .iloc for positions.
    """
    header, raw = _read_table(path)
    for col in ID_COLUMNS:
        _require_column(path, header, col)
    if labels_file is not None:
        labels = read_labels_file(labels_file)
        for lab in labels:
            _require_column(path, header, lab, what="label column", note=f" (listed in {labels_file})")
    else:
        labels = by_name(_header_labels(path, header, raw, non_labels=ID_COLUMNS))  # any order of the 30
        check_label_set(labels, f"{path}: row 1 (header)")
    return _finish_labelled(path, header, raw, ID_COLUMNS, labels), labels


def read_id_list(path, allow_empty: bool = False) -> pd.DataFrame:
    """Read an image list (test list, Removal.csv) -> DataFrame[ImageID, StudyDate_DICOM, PatientID].

    All three columns are str; StudyDate_DICOM/PatientID are "" when the file lacks them. Other
    columns are ignored. Duplicate or blank ImageIDs are errors. Index: spreadsheet row numbers.
    """
    import pandas as pd

    header, raw = _read_table(path, allow_empty=allow_empty)
    _require_column(path, header, ID)
    out = pd.DataFrame({c: (raw[c] if c in raw.columns else "") for c in ID_COLUMNS}, index=raw.index)
    out = out.astype(str)
    _check_image_ids(path, header, out)
    return _reset_with_rows(out)


def read_meta_csv(path, ids=None) -> pd.DataFrame:
    """Read the metadata CSV -> DataFrame[META_COLUMNS] of str ("" for blank or absent columns),
    only the rows whose ImageID is in `ids` when given. Index: spreadsheet row numbers.

    pandas, not the csv module: the real file is 160K rows with long free-text reports, and only
    META_COLUMNS are parsed (usecols)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found (the metadata CSV)")
    header = list(_read_pandas(path, nrows=0).columns)
    for col in META_REQUIRED:
        _require_column(path, header, col)
    present = [c for c in META_COLUMNS if c in header]
    df = _read_pandas(path, usecols=present, dtype=str, keep_default_na=False)
    for col in META_COLUMNS:
        df[col] = df[col].str.strip() if col in present else ""
    df = df[META_COLUMNS]
    df.index = df.index + 2  # spreadsheet rows (header = 1; a newline inside a quoted cell is not a row)
    if ids is not None:
        df = df[df[ID].isin(set(ids))]
    blank = df[ID] == ""
    if blank.any():
        raise InputError(f"{path}: row {df.index[blank.to_numpy()][0]}, column 'ImageID': blank ImageID")
    dup = df[ID].duplicated(keep=False).to_numpy()
    if dup.any():
        first = df[ID][dup].iloc[0]
        rows = df.index[(df[ID] == first).to_numpy()].tolist()
        raise InputError(f"{path}: ImageID '{first}' appears on rows {', '.join(map(str, rows[:5]))} "
                         f"({int(dup.sum())} rows share an ImageID)")
    df.index.name = "csv_row"
    return df


def _read_pandas(path, **kw) -> pd.DataFrame:
    """pandas.read_csv (compression from the file name) with every failure as one InputError line."""
    import pandas as pd

    try:
        return pd.read_csv(path, encoding="utf-8-sig", **kw)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, EOFError, OSError, zlib.error,
            gzip.BadGzipFile) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable CSV ({msg})") from None


def read_predictions(path, labels: list[str] | None = None, strict_order: bool = False,
                     expected_ids: list[str] | None = None,
                     ids_source: str = "the expected ID list") -> pd.DataFrame:
    """Read and validate a prediction CSV; return floats indexed by ImageID (str).

    labels: the required label set (None: whatever the header has). strict_order: the header
    must be exactly `ImageID,<labels>` in that order (submission format); otherwise columns are
    matched by name and returned in `labels` order. expected_ids: the file must hold exactly these
    IDs, each once (ids_source names that list in messages). The first problem in file order
    raises InputError naming the file, row and column.
    """
    import pandas as pd

    header, raw = _read_table(path)
    cols = _check_prediction_header(header, path, labels, strict_order)
    raw.columns = [ID] + cols
    problems = _id_problems(raw, header, expected_ids, ids_source)
    values, bad = _parse_probabilities(raw[cols])
    if bad is not None:
        r, c, why = bad
        problems.append(_Problem(int(raw.index[r]) + 2, c + 2, cols[c], why))
    if problems:
        raise InputError(min(problems, key=lambda q: (q.row, q.column)).format(path))
    ids = raw[ID]
    if expected_ids is not None:
        present = set(ids)
        missing = [i for i in expected_ids if i not in present]
        if missing:
            raise InputError(f"{path}: {len(missing)} ImageID(s) of {ids_source} have no row, e.g. {missing[0]!r}")
    out = pd.DataFrame(values, index=pd.Index(ids.to_numpy(), name=ID), columns=cols)
    return out[list(labels)] if labels is not None else out


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


def read_label_table(path, ids: list[str] | None = None, ids_source: str = "the predictions") -> LabelTable:
    """Read a cache index or a training-layout label CSV.

    Index: the rows whose ImageID is in `ids` (all train rows if ids is None); training counts
    come from its split == 'train' rows. Training layout: no training counts, and `ids` must
    cover every row (a labelled image without a prediction is an error, not silently dropped).
    Every requested ID must be present with 0/1 labels. Rows come back in the order of `ids`.
    """
    import pandas as pd

    header, raw = _read_table(path)
    _require_column(path, header, ID)
    labels = _header_labels(path, header, raw)
    _check_image_ids(path, header, raw)
    is_index = "split" in header
    train_counts, n_train = None, 0
    if is_index:
        train = (raw["split"] == "train").to_numpy()
        n_train = int(train.sum())
        train_counts = _parse_binary(path, raw[train], labels).sum(0).astype(np.int64)
    if ids is None:
        sel = np.flatnonzero(raw["split"] == "train") if is_index else np.arange(len(raw))
    else:
        pos = pd.Series(np.arange(len(raw)), index=raw[ID])
        unknown = [k for k, i in enumerate(ids) if i not in pos.index]
        if unknown:
            k = unknown[0]
            raise InputError(f"{path}: no row for ImageID {ids[k]!r} (row {k + 2} of {ids_source}; "
                             f"{len(unknown)} such ID(s))")
        sel = pos.loc[ids].to_numpy()
        if not is_index and len(sel) < len(raw):
            k = int(np.flatnonzero(~raw[ID].isin(set(ids)).to_numpy())[0])
            raise InputError(f"{path}: row {raw.index[k] + 2}: ImageID {raw[ID].iloc[k]!r} has no row in "
                             f"{ids_source} ({len(raw) - len(sel)} labelled image(s) without one)")
    y = _parse_binary(path, raw.iloc[sel], labels)
    return LabelTable(raw[ID].iloc[sel].tolist(), labels, y, is_index, train_counts, n_train)


def read_header(path) -> list[str]:
    """The validated header of a CSV (same checks as the full readers)."""
    return _read_table(path, header_only=True)[0]


def labels_from_file(path) -> list[str]:
    """Label names, in order, from the header of a training CSV, cache index or prediction CSV."""
    header = read_header(path)
    labels = [c for c in header if c not in NON_LABEL_COLUMNS and not _is_blank_name(c)]
    if not labels:
        raise InputError(f"{path}: row 1 (header): no label columns (every column is one of {list(NON_LABEL_COLUMNS)})")
    return labels


# ---- reading the text ------------------------------------------------------------------------------------


def _read_table(path, allow_empty: bool = False, header_only: bool = False) -> tuple[list[str], pd.DataFrame]:
    """-> (header names as written, DataFrame of str cells; index = spreadsheet row - 2).

    Parsed with the csv module (not pandas) so that every cell stays a string, rows keep their
    spreadsheet numbers, and a row with too many fields is an error instead of being silently
    shifted. Blank lines are dropped; missing trailing fields read as "". Unnamed header cells
    get a NUL-prefixed placeholder name (see _is_blank_name).
    """
    import pandas as pd

    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder, not a CSV file" if os.path.isdir(path) else "file not found"
        raise InputError(f"{path}: {what}")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: file is empty (expected a CSV header line)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or all(_is_blank_name(c) for c in header):
                raise InputError(f"{path}: the first line is empty (expected a CSV header line)")
            _check_header_names(path, header)
            if header_only:
                return header, None
            records, numbers = _read_records(path, reader, len(header))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise InputError(f"{path}: not a valid CSV: {e}") from None
    if not records and not allow_empty:
        raise InputError(f"{path}: no data rows below the header")
    names = [c if not _is_blank_name(c) else f"\0blank{i}" for i, c in enumerate(header)]
    index = np.asarray(numbers, dtype=np.int64) - 2
    raw = pd.DataFrame(records, columns=names, index=index, dtype=object)
    return header, raw


def _check_header_names(path, header: list[str]) -> None:
    """Other delimiter, duplicated names, names with surrounding spaces."""
    if len(header) == 1:
        seen = [d for d in _DELIMITERS if d in header[0]]
        if seen:
            d = max(seen, key=header[0].count)
            raise InputError(f"{path}: row 1: the header is one column {_clip(header[0])!r}: the file is "
                             f"separated by {_DELIMITERS[d]}s ({d!r}), not commas; save it as comma-separated CSV")
    dup = sorted({c for c in header if header.count(c) > 1 and not _is_blank_name(c)})
    if dup:
        cols = ", ".join(f"'{c}' (columns {_positions(header, c)})" for c in dup)
        raise InputError(f"{path}: row 1: duplicated column name(s) in the header: {cols}")
    for i, c in enumerate(header):
        if not _is_blank_name(c) and c != c.strip():
            raise InputError(f"{path}: row 1, column {i + 1}: the name {c!r} starts or ends with spaces "
                             f"(names must match exactly: remove the spaces)")


def _read_records(path, reader, width: int) -> tuple[list[list[str]], list[int]]:
    """Data records and their spreadsheet row numbers, each padded/trimmed to `width` fields."""
    records, numbers = [], []
    for number, rec in enumerate(reader, start=2):
        if not any(rec):
            continue  # blank line (or only commas)
        if len(rec) != width:
            if len(rec) > width:
                extra = [x for x in rec[width:] if x.strip()]
                if extra:
                    raise InputError(f"{path}: row {number} has {len(rec)} fields but the header has "
                                     f"{width} (extra value {_clip(extra[0])!r}; a comma inside a value?)")
                rec = rec[:width]
            else:
                rec = rec + [""] * (width - len(rec))
        records.append(rec)
        numbers.append(number)
    return records, numbers


# ---- columns ---------------------------------------------------------------------------------------------


def _require_column(path, header: list[str], name: str, what: str = "column", note: str = "") -> None:
    if name in header:
        return
    hint = _suggest(name, header)
    raise InputError(f"{path}: row 1 (header): missing {what} '{name}'{note}{hint}")


def _suggest(name: str, header: list[str]) -> str:
    named = [c for c in header if not _is_blank_name(c)]
    folded = {c.strip().lower(): c for c in named}
    if name.strip().lower() in folded:
        return f"; found '{folded[name.strip().lower()]}' (names are case- and space-sensitive)"
    close = difflib.get_close_matches(name, named, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _header_labels(path, header: list[str], raw: pd.DataFrame, non_labels=NON_LABEL_COLUMNS) -> list[str]:
    """The label columns of a training-layout table or index: every named column that is not in
    `non_labels`, in file order. An unnamed column must be empty (Excel exports trailing commas)."""
    for i, c in enumerate(header):
        if _is_blank_name(c):
            col = raw.iloc[:, i]
            filled = col[col.str.strip() != ""]
            if len(filled):
                raise InputError(f"{path}: row {filled.index[0] + 2}, column {i + 1}: the column has no "
                                 f"name in the header but holds {_clip(filled.iloc[0])!r}")
    labels = [c for c in header if c not in non_labels and not _is_blank_name(c)]
    if not labels:
        raise InputError(f"{path}: no label columns after {','.join(ID_COLUMNS)} "
                         f"(expected one 0/1 column per label)")
    return labels


def _check_prediction_header(header: list[str], path, labels, strict_order: bool) -> list[str]:
    """Label columns of a prediction CSV header (`ImageID,<labels>`); InputError on the first problem."""
    if header[0] != ID:
        raise InputError(f"{path}: row 1, column 1: expected {ID!r}, found {header[0]!r}")
    blank = [i + 1 for i, c in enumerate(header) if _is_blank_name(c)]
    if blank:
        raise InputError(f"{path}: row 1, column {blank[0]}: empty column name")
    cols = header[1:]
    ids = [c for c in cols if c in NON_LABEL_COLUMNS]
    if ids:
        raise InputError(f"{path}: row 1: unexpected ID column(s) {ids} after {ID!r}")
    if labels is None:
        return cols
    missing = [c for c in labels if c not in cols]
    extra = [c for c in cols if c not in labels]
    if missing or extra:
        col = next((i for i, c in enumerate(cols) if c not in labels), None)
        where = f"row 1, column {col + 2} ({cols[col]!r})" if col is not None else "row 1"
        raise InputError(f"{path}: {where}: header does not match the expected labels "
                         f"(missing {missing}, unexpected {extra})")
    if strict_order and cols != list(labels):
        i = next(i for i, (a, b) in enumerate(zip(cols, labels)) if a != b)
        raise InputError(f"{path}: row 1, column {i + 2}: expected {labels[i]!r}, found {cols[i]!r} "
                         f"(same labels, wrong column order; the required order is ImageID,{','.join(labels)})")
    return cols


# ---- cells -----------------------------------------------------------------------------------------------


@dataclass
class _Problem:
    """One validation problem, located in the file (row 1 = header, columns 1-based)."""

    row: int
    column: int
    column_name: str
    message: str

    def format(self, path) -> str:
        return f"{path}: row {self.row}, column {self.column} ({self.column_name!r}): {self.message}"


def _id_problems(raw: pd.DataFrame, header: list[str], expected_ids=None, ids_source=None) -> list[_Problem]:
    """First blank, first duplicated and first unexpected ImageID of a table (at most one of each).

    ImageIDs are stripped of surrounding spaces in place first."""
    col = header.index(ID) + 1
    ids = raw[ID].str.strip()
    rows = raw.index.to_numpy() + 2
    out = []
    padded = np.flatnonzero((ids != raw[ID]).to_numpy())
    if len(padded):
        if expected_ids is not None:  # a list checked against another: the leaderboard matches IDs exactly
            i = padded[0]
            out.append(_Problem(int(rows[i]), col, ID, f"ImageID {raw[ID].iloc[i]!r} has surrounding spaces "
                                                       f"(IDs are matched exactly; {len(padded)} such row(s))"))
        raw[ID] = ids
    blank = np.flatnonzero((ids == "").to_numpy())
    if len(blank):
        out.append(_Problem(int(rows[blank[0]]), col, ID, "blank ImageID"))
    dup = ids.duplicated(keep=False).to_numpy() & (ids != "").to_numpy()
    if dup.any():
        later = np.flatnonzero(ids.duplicated().to_numpy() & dup)
        iid = ids.iloc[later[0]]
        first = int(rows[np.flatnonzero((ids == iid).to_numpy())[0]])
        n = int(ids[dup].nunique())
        more = f"; {n} ImageIDs are duplicated" if n > 1 else ""
        out.append(_Problem(int(rows[later[0]]), col, ID, f"duplicate ImageID {iid!r} (first at row {first}{more})"))
    if expected_ids is not None:
        unexpected = np.flatnonzero(~ids.isin(set(expected_ids)).to_numpy())
        if len(unexpected):
            i = unexpected[0]
            out.append(_Problem(int(rows[i]), col, ID, f"ImageID {ids.iloc[i]!r} is not in {ids_source} "
                                                       f"({len(unexpected)} such row(s))"))
    return out


def _check_image_ids(path, header: list[str], raw: pd.DataFrame) -> None:
    """InputError on the first blank or duplicated ImageID; strips the IDs in place."""
    problems = _id_problems(raw, header)
    if problems:
        raise InputError(min(problems, key=lambda q: q.row).format(path))


def _finish_labelled(path, header: list[str], raw: pd.DataFrame, keep: list[str],
                     labels: list[str]) -> pd.DataFrame:
    import pandas as pd

    out = raw[keep].astype(str).copy()
    _check_image_ids(path, header, out)
    lab = pd.DataFrame(_parse_binary(path, raw, labels), columns=labels, index=raw.index)
    return _reset_with_rows(pd.concat([out, lab], axis=1))


def _parse_binary(path, raw: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """Label cells -> int8 (n, C). Only "0" and "1" are accepted (surrounding spaces allowed)."""
    cells = raw[labels].to_numpy(dtype=object).astype(str)
    ok = (cells == "0") | (cells == "1")
    if not ok.all():
        cells[~ok] = np.char.strip(cells[~ok])
        ok = (cells == "0") | (cells == "1")
    if not ok.all():
        bad_r, bad_c = np.nonzero(~ok)  # row-major: the first bad cells in file order
        if (cells[bad_r[0]] == "").all():  # a row with no label at all: an image without ground truth
            n = int((cells == "").all(axis=1).sum())
            raise InputError(f"{path}: row {raw.index[bad_r[0]] + 2}: blank label cells: no ground truth for "
                             f"ImageID {_clip(raw[ID].iloc[bad_r[0]])!r} ({n} such row(s); a test image?)")
        listed = []
        for r, c in zip(bad_r[:_MAX_LISTED], bad_c[:_MAX_LISTED]):
            v = cells[r, c]
            shown = "a blank cell" if v == "" else repr(_clip(v))
            listed.append(f"row {raw.index[r] + 2}, column '{labels[c]}': {shown}")
        more = f" (and {len(bad_r) - _MAX_LISTED} more bad cells)" if len(bad_r) > _MAX_LISTED else ""
        raise InputError(f"{path}: label values must be 0 or 1; found " + "; ".join(listed) + more)
    return (cells == "1").astype(np.int8)


def _describe_probability(text: str) -> str:
    """Why a probability cell is invalid."""
    if not text.strip():
        return "blank cell"
    try:
        v = float(text)
    except ValueError:
        return f"not a number: {_clip(text)!r}"
    if np.isnan(v):
        return "NaN value"
    if np.isinf(v):
        return f"infinite value {_clip(text.strip())!r}"
    if not 0.0 <= v <= 1.0:
        return f"value {text.strip()} outside [0, 1]"
    return "invalid value"


def _parse_probabilities(cells: pd.DataFrame) -> tuple[np.ndarray, tuple[int, int, str] | None]:
    """Float matrix of the cells and the first invalid cell (data row position, column index, reason).

    Row-major order, so "first" is the first bad cell reading the file top to bottom.
    """
    import pandas as pd

    text = cells.to_numpy(dtype=str)
    blank = np.char.str_len(np.char.strip(text)) == 0
    values = pd.DataFrame(text).apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = blank | ~np.isfinite(values) | (values < 0) | (values > 1)
    if not bad.any():
        return values, None
    r, c = np.argwhere(bad)[0]
    return values, (int(r), int(c), _describe_probability(text[r, c]))


# ---- small helpers ---------------------------------------------------------------------------------------


def _reset_with_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Index the rows by their spreadsheet row number (survives any subsetting)."""
    import pandas as pd

    df.index = pd.Index(df.index.to_numpy(dtype=np.int64) + 2, name="csv_row")
    return df


def _positions(header: list[str], name: str) -> str:
    return ", ".join(str(i + 1) for i, c in enumerate(header) if c == name)


def _is_blank_name(name) -> bool:
    """An unnamed header cell, or the placeholder _read_table gives it (starts with NUL)."""
    name = str(name)
    return not name.strip() or name.startswith("\0")


def _clip(text: str, n: int = 60) -> str:
    """A cell as quoted in a message: at most n characters (repr() then shows any newline as \\n)."""
    text = str(text)  # numpy cells are np.str_, whose repr() would show the type
    return text if len(text) <= n else text[:n] + "..."
