"""The image cache READER: every image decoded, windowed and resized once, stored as uint8.

`open_cache(path) -> Cache` is the only way the stages read a cache; the builder is
cxrlt/cache_build.py (preprocess.py).

Layout of a finished cache directory (the interface the training/inference stages read):

  images.npy     uint8 array (N, size, size) in .npy format; open with
                 np.load(path, mmap_mode="r"). Row r holds the image of index.csv's `row` == r.
  index.csv      one line per usable image, columns:
                   row              int, the image's row in images.npy
                   ImageID          str, as in the CSVs
                   StudyDate_DICOM  str, as in the CSVs ("" if the list lacks it)
                   PatientID        str, as in the CSVs (Excel float form "1.90E+38" kept verbatim)
                   split            "train" | "test"
                   fold             0..K-1 for train rows, -1 for test rows
                   <labels...>      one column per label, training-CSV order: 0/1 for train
                                    rows, empty for test rows
                 Lines are in this order: the training CSV's rows (minus those listed in
                 Removal.csv), then the test list's rows (all kept, even if in Removal.csv).
  labels.txt     the label names, one a line, in order.
  manifest.json  written last: its presence marks a complete cache. Holds the sources (path,
                 bytes, mtime, sha256), image_dir, size, windowing parameters, labels, folds, seed,
                 counts (train, test, removed, failed, per-label positives and fold sizes of the
                 train rows), failures (ImageID, file, reason, split, csv, csv_row), workers,
                 decoded_this_run / reused_rows (resume), elapsed_s and an input fingerprint.

Images that failed to decode (preprocess.py --skip-bad) are left out of index.csv. The array is
NOT compacted: a failed image's row stays zero-filled and no index line points at it, so
always address images through the `row` column (rows are not guaranteed to be 0..n-1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .labels import ID_COLUMNS

# pandas is imported inside the functions that need it: a stage that only wants the array
# (the loaders' worker processes) starts faster without it.
if TYPE_CHECKING:
    import pandas as pd

CACHE_VERSION = 1  # bump when the pixels or the layout produced for the same inputs change
INDEX_FIXED_COLUMNS = ["row", *ID_COLUMNS, "split", "fold"]


# ---- reading a cache -------------------------------------------------------------------------------


@dataclass
class Cache:
    """A finished cache opened for reading (see the module docstring for the files)."""

    path: Path
    images: np.ndarray  # read-only memmap (N, size, size) uint8
    index: pd.DataFrame  # index.csv; ID columns and split are str, labels nullable Int8
    labels: list[str]
    manifest: dict
    _pos: np.ndarray = field(default=None, repr=False)  # array row -> index line (-1: none)
    _y: np.ndarray = field(default=None, repr=False)  # float32 (len(index), C), NaN for test

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def rows(self, split: str, fold: int | None = None, exclude_fold: int | None = None) -> np.ndarray:
        """Array rows (int64, index order) of `split` ("train" | "test"), optionally only
        `fold` or all but `exclude_fold`."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        keep = (self.index["split"] == split).to_numpy()
        folds = self.index["fold"].to_numpy()
        if fold is not None:
            keep &= folds == fold
        if exclude_fold is not None:
            keep &= folds != exclude_fold
        return self.index["row"].to_numpy(dtype=np.int64)[keep]

    def targets(self, rows) -> np.ndarray:
        """float32 (len(rows), C) labels of the given array rows (NaN for test rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self._pos)):
            raise ValueError(f"row out of range 0..{len(self._pos) - 1}")
        pos = self._pos[rows]
        if (pos < 0).any():
            raise ValueError(f"rows not in the index: {rows[pos < 0][:5].tolist()}")
        return self._y[pos]


def open_cache(cache_dir) -> Cache:
    """Open a finished cache. InputError if it is missing, incomplete or inconsistent."""
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / "manifest.json"
    if not manifest_path.is_file():
        partial = partial_dir(cache_dir)
        more = (f" (an interrupted build is in {partial}: re-run preprocess.py to finish it)"
                if partial.is_dir() else "")
        raise InputError(f"{cache_dir}: no complete image cache (manifest.json missing){more}; "
                         f"run preprocess.py (make preprocess) first")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{manifest_path}: unreadable manifest ({e}); re-run preprocess.py") from None
    labels = _read_labels_txt(cache_dir / "labels.txt")
    if labels != manifest.get("labels"):
        raise InputError(f"{cache_dir}/labels.txt does not match manifest.json; re-run preprocess.py")
    index = read_index(cache_dir / "index.csv", labels)
    try:
        images = np.load(cache_dir / "images.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise InputError(f"{cache_dir}/images.npy: cannot open ({e}); re-run preprocess.py") from None
    size = manifest.get("size")
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
        raise InputError(f"{cache_dir}/images.npy: shape {images.shape} {images.dtype} does not match "
                         f"the manifest (N, {size}, {size}) uint8; re-run preprocess.py")
    rows = index["row"].to_numpy(dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
        raise InputError(f"{cache_dir}/index.csv: row numbers outside 0..{len(images) - 1}")
    pos = np.full(len(images), -1, dtype=np.int64)
    pos[rows] = np.arange(len(rows))
    y = index[labels].astype("float32").to_numpy(dtype=np.float32, na_value=np.nan)
    return Cache(cache_dir, images, index, labels, manifest, pos, y)


def read_index(path, labels: list[str]) -> pd.DataFrame:
    """Read a cache's index.csv: strings kept verbatim, row/fold int64, labels nullable Int8."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing; re-run preprocess.py")
    dtypes = {"row": np.int64, "fold": np.int64, "split": str, **{c: str for c in ID_COLUMNS}}
    dtypes.update({lab: "Int8" for lab in labels})
    try:
        index = pd.read_csv(path, dtype=dtypes, keep_default_na=False,
                            na_values={lab: [""] for lab in labels})
    except (ValueError, pd.errors.ParserError) as e:
        raise InputError(f"{path}: unreadable ({str(e).splitlines()[0]}); re-run preprocess.py") from None
    expected = INDEX_FIXED_COLUMNS + list(labels)
    if list(index.columns) != expected:
        raise InputError(f"{path}: columns {list(index.columns)} differ from the expected {expected}; "
                         f"re-run preprocess.py")
    return index


def _read_labels_txt(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"{path}: missing; re-run preprocess.py")
    return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]



def partial_dir(out: Path) -> Path:
    """Where the builder works until the cache is complete (renamed to `out` at the end)."""
    return out.with_name(out.name + ".partial")
