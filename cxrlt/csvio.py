"""Reading and validating the challenge CSVs.

Formats (column names are case- and space-sensitive):

* Training CSV: `ImageID,StudyDate_DICOM,PatientID` (cxrlt.labels.ID_COLUMNS), then one 0/1 column
  per label. The label set is every column after the ID columns, in file order, or exactly the
  labels of a labels file (one name a line) when one is given.
* ID list (the test list `CXRLT_2026_TEST_ALL_TASK1.csv`, `Removal.csv`): an `ImageID` column,
  optionally `StudyDate_DICOM` and `PatientID`. Any other column is ignored, including the 30
  unnamed, empty trailing columns of the official test list.
* Labelled CSV (evaluation): `ImageID` plus the given label columns; other columns are kept.
* Metadata CSV (META_CSV, plain or .gz; PadChest's `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`
  layout): `ImageID, StudyID, PatientID, StudyDate_DICOM, Projection, ViewPosition_DICOM, ...`.
  Only META_COLUMNS are read (ImageID, PatientID and Projection required): never its `Labels`
  or `Report` columns, which hold the labels of the evaluation images.

Every reader keeps ImageID, StudyDate_DICOM and PatientID as strings: the official PatientID is
written in Excel float form (`1.90E+38`) and must not be parsed as a number. A UTF-8 BOM and CRLF
line endings are accepted. Any problem raises InputError naming the file, the row as a
spreadsheet shows it (header = row 1, first data row = row 2) and the column.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import os
import zlib

import numpy as np
import pandas as pd

from .errors import InputError
from .labels import ID_COLUMNS, read_labels_file

# How many offending cells/IDs an error message lists before "... and N more".
_MAX_LISTED = 3
META_COLUMNS = ["ImageID", "StudyID", "PatientID", "StudyDate_DICOM", "Projection", "ViewPosition_DICOM"]
META_REQUIRED = ["ImageID", "PatientID", "Projection"]


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
        labels = [c for c in header if c not in ID_COLUMNS and not _is_blank_name(c)]
        _check_blank_named_columns_empty(path, header, raw)
    if not labels:
        raise InputError(f"{path}: no label columns after {','.join(ID_COLUMNS)} "
                         f"(expected one 0/1 column per label)")
    return _finish_labelled(path, raw, ID_COLUMNS, labels), labels


def read_labelled_csv(path, labels, skip_unlabelled: bool = False) -> pd.DataFrame:
    """Read any CSV with `ImageID` and the given 0/1 label columns (e.g. test labels, index.csv).

    Returns ImageID, StudyDate_DICOM and PatientID (str; "" when the file lacks them), every other
    non-label column of the file as str, then the labels (int8) in the order given. With
    `skip_unlabelled`, rows whose label cells are all blank are dropped first (the test rows of
    a cache's index.csv); a partly blank row is still an error.
    """
    header, raw = _read_table(path)
    _require_column(path, header, "ImageID")
    for lab in labels:
        _require_column(path, header, lab, what="label column")
    for col in ID_COLUMNS:
        if col not in raw.columns:
            raw[col] = ""
    if skip_unlabelled:
        blank = (raw[list(labels)].apply(lambda s: s.str.strip()) == "").all(axis=1)
        raw = raw[~blank]
    others = [c for c in raw.columns if c not in ID_COLUMNS and c not in labels and not _is_blank_name(c)]
    return _finish_labelled(path, raw, ID_COLUMNS + others, list(labels))


def read_id_list(path, allow_empty: bool = False) -> pd.DataFrame:
    """Read an image list (test list, Removal.csv) -> DataFrame[ImageID, StudyDate_DICOM, PatientID].

    All three columns are str; StudyDate_DICOM/PatientID are "" when the file lacks them. Other
    columns are ignored. Duplicate or blank ImageIDs are errors. Index: spreadsheet row numbers.
    """
    header, raw = _read_table(path, allow_empty=allow_empty)
    _require_column(path, header, "ImageID")
    out = pd.DataFrame({c: (raw[c] if c in raw.columns else "") for c in ID_COLUMNS}, index=raw.index)
    out = out.astype(str)
    _check_image_ids(path, out)
    return _reset_with_rows(out)


def read_meta_csv(path, ids=None) -> pd.DataFrame:
    """Read the metadata CSV -> DataFrame[META_COLUMNS] of str ("" for blank or absent columns),
    only the rows whose ImageID is in `ids` when given. Index: spreadsheet row numbers."""
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
        df = df[df["ImageID"].isin(set(ids))]
    blank = df["ImageID"] == ""
    if blank.any():
        raise InputError(f"{path}: row {df.index[blank.to_numpy()][0]}, column 'ImageID': blank ImageID")
    dup = df["ImageID"].duplicated(keep=False).to_numpy()
    if dup.any():
        first = df["ImageID"][dup].iloc[0]
        rows = df.index[(df["ImageID"] == first).to_numpy()].tolist()
        raise InputError(f"{path}: ImageID '{first}' appears on rows {', '.join(map(str, rows[:5]))} "
                         f"({int(dup.sum())} rows share an ImageID)")
    df.index.name = "csv_row"
    return df


def _read_pandas(path, **kw) -> pd.DataFrame:
    """pandas.read_csv (compression from the file name) with every failure as one InputError line."""
    try:
        return pd.read_csv(path, encoding="utf-8-sig", **kw)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, EOFError, OSError, zlib.error,
            gzip.BadGzipFile) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable CSV ({msg})") from None


# ---- shared steps --------------------------------------------------------------------------------


def _read_table(path, allow_empty: bool = False) -> tuple[list[str], pd.DataFrame]:
    """-> (header names as written, DataFrame of str cells; index = spreadsheet row - 2).

    Parsed with the csv module (not pandas) so that every cell stays a string, rows keep their
    spreadsheet numbers, and a row with too many fields is an error instead of being silently
    shifted. Blank lines are dropped; missing trailing fields read as "". Unnamed header cells
    get a NUL-prefixed placeholder name (see _is_blank_name).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: file is empty (expected a CSV header line)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or all(_is_blank_name(c) for c in header):
                raise InputError(f"{path}: the first line is empty (expected a CSV header line)")
            records, numbers = _read_records(path, reader, len(header))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise InputError(f"{path}: not a valid CSV: {e}") from None
    dup = sorted({c for c in header if header.count(c) > 1 and not _is_blank_name(c)})
    if dup:
        cols = ", ".join(f"'{c}' (columns {_positions(header, c)})" for c in dup)
        raise InputError(f"{path}: row 1: duplicated column name(s) in the header: {cols}")
    if not records and not allow_empty:
        raise InputError(f"{path}: no data rows below the header")
    names = [c if not _is_blank_name(c) else f"\0blank{i}" for i, c in enumerate(header)]
    index = np.asarray(numbers, dtype=np.int64) - 2
    raw = pd.DataFrame(records, columns=names, index=index, dtype=object)
    return header, raw


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
                                     f"{width} (extra value '{extra[0]}'; a comma inside a value?)")
                rec = rec[:width]
            else:
                rec = rec + [""] * (width - len(rec))
        records.append(rec)
        numbers.append(number)
    return records, numbers


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


def _check_blank_named_columns_empty(path, header: list[str], raw: pd.DataFrame) -> None:
    """An unnamed column is tolerated only when it is empty (Excel exports trailing commas)."""
    for i, c in enumerate(header):
        if not _is_blank_name(c):
            continue
        col = raw.iloc[:, i]
        filled = col[col.str.strip() != ""]
        if len(filled):
            raise InputError(f"{path}: row {filled.index[0] + 2}, column {i + 1}: the column has no "
                             f"name in the header but holds '{filled.iloc[0]}'")


def _finish_labelled(path, raw: pd.DataFrame, keep: list[str], labels: list[str]) -> pd.DataFrame:
    out = raw[keep].astype(str).copy()
    _check_image_ids(path, out)
    values = _parse_binary(path, raw, labels)
    lab = pd.DataFrame(values, columns=labels, index=raw.index)
    return _reset_with_rows(pd.concat([out, lab], axis=1))


def _parse_binary(path, raw: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """Label cells -> int8 (n, C). Only "0" and "1" are accepted (surrounding spaces allowed)."""
    cells = raw[labels].to_numpy(dtype=object).astype(str)
    ok = (cells == "0") | (cells == "1")
    if not ok.all():
        stripped = np.char.strip(cells[~ok])
        cells[~ok] = stripped
        ok = (cells == "0") | (cells == "1")
    if not ok.all():
        bad_r, bad_c = np.nonzero(~ok)  # row-major: the first bad cells in file order
        listed = []
        for r, c in zip(bad_r[:_MAX_LISTED], bad_c[:_MAX_LISTED]):
            v = cells[r, c]
            shown = "a blank cell" if v == "" else f"'{v}'"
            listed.append(f"row {raw.index[r] + 2}, column '{labels[c]}': {shown}")
        more = f" (and {len(bad_r) - _MAX_LISTED} more bad cells)" if len(bad_r) > _MAX_LISTED else ""
        raise InputError(f"{path}: label values must be 0 or 1; found " + "; ".join(listed) + more)
    return (cells == "1").astype(np.int8)


def _check_image_ids(path, df: pd.DataFrame) -> None:
    ids = df["ImageID"].str.strip()
    blank = ids == ""
    if blank.any():
        raise InputError(f"{path}: row {df.index[blank.to_numpy()][0] + 2}, column 'ImageID': blank ImageID")
    if not (ids == df["ImageID"]).all():
        df["ImageID"] = ids
    dup = df["ImageID"].duplicated(keep=False).to_numpy()
    if dup.any():
        groups = pd.Series(df.index[dup] + 2, index=df["ImageID"][dup]).groupby(level=0, sort=False)
        listed = [f"'{k}' (rows {', '.join(map(str, v.tolist()))})" for k, v in list(groups)[:_MAX_LISTED]]
        n = groups.ngroups
        more = f" and {n - _MAX_LISTED} more" if n > _MAX_LISTED else ""
        raise InputError(f"{path}: duplicate ImageID " + "; ".join(listed) + more)


def _reset_with_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Index the rows by their spreadsheet row number (survives any subsetting)."""
    df.index = pd.Index(df.index.to_numpy(dtype=np.int64) + 2, name="csv_row")
    return df


def _positions(header: list[str], name: str) -> str:
    return ", ".join(str(i + 1) for i, c in enumerate(header) if c == name)


def _is_blank_name(name) -> bool:
    """An unnamed header cell, or the placeholder _read_table gives it (starts with NUL)."""
    name = str(name)
    return not name.strip() or name.startswith("\0")


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[-1]
