"""The image cache READER: every image decoded, windowed and resized once, stored as uint8.

`open_cache(path) -> Cache` is the only way the stages read a cache. The builder is
cxrlt/data/cache_build.py (preprocess.py); it keeps the caches of one dataset and image size in a
"cache root", each an ordinary cache folder:

  data/cache/<DATASET>_<SIZE>/   the root: every cache in it has the same size and windowing
    train/                       the train cache: the training CSV's rows minus Removal.csv
    test-<key>/                  one test cache per test list (key: cxrlt.data.identity.test_cache_key)

Files of a cache folder:

  images.npy     uint8 array (N, size, size) in .npy format; open with
                 np.load(path, mmap_mode="r"). Always address it through index.csv's `row`:
                 rows are not 0..n-1 in general (a cache re-indexed after a Removal or label edit
                 keeps the array it had, and rows of images that failed stay zero-filled).
  index.csv      one line per image, in the order of its CSV, columns:
                   row              int, the image's row in images.npy
                   ImageID          str, as in the CSVs
                   StudyDate_DICOM  str, as in the CSVs ("" if the list lacks it)
                   PatientID        str, as in the CSVs (Excel float form "1.90E+38" kept verbatim)
                   study            str, the study key (cxrlt.data.identity: PadChest StudyID when known)
                   patient          str, the patient key (exact when a metadata CSV was given)
                   projection       str, PA | AP | AP_horizontal | L | COSTAL ... ("" unknown)
                   centre           str, padchest | nih | unknown (or the metadata's Centre)
                   split            "train" | "test"
                   fold             0..K-1 for train rows, -1 for test rows
                   <labels...>      train cache: one 0/1 column per label, training-CSV order;
                                    a test cache has no label columns
  labels.txt     the label names, one a line, in order (empty for a test cache).
  sources.csv    for the builder only: row, ImageID, file (relative to the image folder), bytes,
                 mtime_ns and content key (cxrlt/core/hashing.py) of each array row
                 holding pixels (how other caches of the root reuse them).
  manifest.json  written last: its presence marks a complete cache. Holds `key` (the content
                 fingerprint, Cache.key), `pixels` (version, size, windowing), labels, counts,
                 failures (images left out with --skip-bad: ImageID, file, reason, csv, csv_row),
                 the CSVs it was built from, and what the build did (decoded, copied, resumed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxrlt.core.errors import InputError
from cxrlt.data.identity import FRONTAL
from cxrlt.data.tables import ID_COLUMNS, INDEX_FIXED_COLUMNS, INDEX_KEY_COLUMNS

# pandas is imported inside the functions that need it: a process that only wants the array
# (a loader's worker) starts faster without it.
if TYPE_CHECKING:
    import pandas as pd

CACHE_VERSION = 4  # bump when the pixels or the layout produced for the same inputs change
_STR_COLUMNS = [*ID_COLUMNS, *INDEX_KEY_COLUMNS, "split"]


@dataclass
class Cache:
    """A finished cache opened for reading (see the module docstring for the files).

    Methods taking `rows` take array rows (as returned by rows()) and answer in their order."""

    path: Path
    images: np.ndarray  # read-only memmap (N, size, size) uint8
    index: pd.DataFrame  # index.csv; ID/key columns and split are str, labels nullable Int8
    labels: list[str]
    manifest: dict
    _pos: np.ndarray = field(default=None, repr=False)  # array row -> index line (-1: none)
    _y: np.ndarray = field(default=None, repr=False)  # float32 (len(index), C), NaN for test

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    @property
    def images_path(self) -> Path:
        return self.path / "images.npy"

    @property
    def key(self) -> str:
        """Content fingerprint: rows, labels, folds, keys, pixel sources, size, windowing."""
        return self.manifest["key"]

    @property
    def index_nbytes(self) -> int:
        """Memory the opened index holds (DataFrame deep size, label matrix, row map): what grows
        with the number of images besides the memmap (bench/bench_memory.py's allowance)."""
        return int(self.index.memory_usage(deep=True).sum() + self._y.nbytes + self._pos.nbytes)

    @property
    def has_projection(self) -> bool:
        """Whether the projection of the images is known (a metadata CSV was given)."""
        return bool((self.index["projection"] != "").any())

    def rows(self, split: str | None = None, fold: int | None = None, exclude_fold: int | None = None) -> np.ndarray:
        """Array rows (int64, index order): all, or those of `split` ("train" | "test"),
        optionally only `fold` or all but `exclude_fold`."""
        if split not in (None, "train", "test"):
            raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
        keep = np.ones(len(self.index), dtype=bool)
        if split is not None:
            keep &= (self.index["split"] == split).to_numpy()
        folds = self.index["fold"].to_numpy()
        if fold is not None:
            keep &= folds == fold
        if exclude_fold is not None:
            keep &= folds != exclude_fold
        return self.index["row"].to_numpy(dtype=np.int64)[keep]

    def training_rows(self, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, val rows) of a run: the training split without / with cfg val_fold. With
        cfg train_projections "frontal" the TRAINING rows keep frontal images only (the val rows
        stay whole: selection has its own frontal proxy); it needs known projections (META_CSV)."""
        train = self.rows("train", exclude_fold=cfg["val_fold"])
        val = self.rows("train", fold=cfg["val_fold"])
        if cfg.get("train_projections", "all") == "frontal":
            if not self.has_projection:
                raise InputError(f"{self.path}/index.csv: train_projections frontal needs the images' "
                                 f"projections, which this cache does not know (set META_CSV)")
            train = train[self.frontal(train)]
            if len(train) == 0:
                raise InputError(f"{self.path}/index.csv: train_projections frontal leaves no training image")
        return train, val

    def targets(self, rows) -> np.ndarray:
        """float32 (len(rows), C) labels (NaN for test rows)."""
        return self._y[self._lines(rows)]

    def ids(self, rows) -> np.ndarray:
        return self._column("ImageID", rows)

    def study_keys(self, rows) -> np.ndarray:
        return self._column("study", rows)

    def patient_keys(self, rows) -> np.ndarray:
        return self._column("patient", rows)

    def csv_patients(self, rows) -> np.ndarray:
        """The CSV's own PatientID column (lossy in the official files), not the exact patient key."""
        return self._column("PatientID", rows)

    def projections(self, rows) -> np.ndarray:
        return self._column("projection", rows)

    def centres(self, rows) -> np.ndarray:
        return self._column("centre", rows)

    def frontal(self, rows) -> np.ndarray:
        """bool per row: a frontal projection; all True when the projection is unknown
        (has_projection False), so that "frontal only" then means "every image"."""
        if not self.has_projection:
            return np.ones(len(np.asarray(rows)), dtype=bool)
        return np.isin(self.projections(rows), FRONTAL)

    def _column(self, name: str, rows) -> np.ndarray:
        return self.index[name].to_numpy(dtype=object)[self._lines(rows)]

    def _lines(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self._pos)):
            raise ValueError(f"row out of range 0..{len(self._pos) - 1}")
        pos = self._pos[rows]
        if (pos < 0).any():
            raise ValueError(f"rows not in the index: {rows[pos < 0][:5].tolist()}")
        return pos


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
    if manifest.get("version") != CACHE_VERSION or "key" not in manifest:
        raise InputError(f"{cache_dir}: built by another version of preprocess.py (cache layout "
                         f"{manifest.get('version')}, this one reads {CACHE_VERSION}); re-run preprocess.py")
    labels = _read_labels_txt(cache_dir / "labels.txt")
    if labels != manifest.get("labels"):
        raise InputError(f"{cache_dir}/labels.txt does not match manifest.json; re-run preprocess.py")
    index = read_index(cache_dir / "index.csv", labels)
    try:
        images = np.load(cache_dir / "images.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise InputError(f"{cache_dir}/images.npy: cannot open ({e}); re-run preprocess.py") from None
    size = manifest.get("pixels", {}).get("size")
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
    dtypes = {"row": np.int64, "fold": np.int64, **{c: str for c in _STR_COLUMNS}}
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
