"""The image cache: every image decoded, windowed and resized once, stored as uint8.

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
                 train rows), failures (ImageID, file, reason, split, csv, csv_row), timing
                 (workers, worker_start_s, decode_s, images_per_s = images decoded this run /
                 decode_s, i.e. without the pool's start-up, elapsed_s of the whole call),
                 decoded_this_run / reused_rows (resume), and an input fingerprint.

Images that fail to decode stop the build with an error naming the ImageID, CSV row and file,
unless skip_bad: then they are left out of index.csv and listed in the manifest. The array is
NOT compacted: a failed image's row stays zero-filled and no index line points at it, so
always address images through the `row` column (rows are not guaranteed to be 0..n-1).

Building is resumable and atomic. Work happens in `<out_dir>.partial/`:
  images.npy (the memmap being filled), done.npy (uint8 (N,), 1 = row written; rewritten
  atomically every FLUSH_SECONDS after an fsync of images.npy, so a row marked done is on
  disk), plan.json (written last when the folder is set up: the row order and a key of the
  inputs that determine the pixels). A re-run with the same key skips rows already done;
  otherwise it starts over. When every row is done, index.csv, labels.txt and manifest.json are
  written and the folder is renamed to `out_dir` (an old cache there is replaced only then).
A finished cache whose fingerprint (CSV contents, labels file, image_dir, size, windowing,
folds, seed) matches is reused as is. Image files are assumed not to change in place: use
force=True (preprocess.py --force) to rebuild after editing images.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from .errors import InputError
from .fileio import write_csv, write_json, write_text
from .imaging import ImageReadError, load_for_cache
from .tables import ID_COLUMNS, INDEX_FIXED_COLUMNS, NON_LABEL_COLUMNS

# pandas (and the CSV/fold modules that use it) are imported inside the functions that need
# them: decode workers are spawned processes that import this module, and without pandas
# each starts in ~0.5 s instead of ~2 s.
if TYPE_CHECKING:
    import pandas as pd

CACHE_VERSION = 1  # bump when the pixels or the layout produced for the same inputs change
WINDOW_STRIDE = 4
FLUSH_SECONDS = 10.0  # how often the done mask is persisted (work lost on a kill: at most this)
_OWN_FILES = {"images.npy", "index.csv", "labels.txt", "manifest.json", "done.npy", "plan.json"}
_MAX_REPORTED = 20  # failures printed in the --skip-bad report (all are in the manifest)


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
        partial = _partial_dir(cache_dir)
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


# ---- building a cache --------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What the cache will hold, before any image is decoded."""

    table: pd.DataFrame  # INDEX_FIXED_COLUMNS + labels, one line per array row (row == position)
    labels: list[str]
    csv_file: np.ndarray  # per row: the CSV the row comes from
    csv_row: np.ndarray  # per row: its spreadsheet row number in that CSV
    removed: int


def build_cache(train_csv, image_dir, out_dir, size: int, test_csv=None, removal_csv=None,
                folds: int = 5, seed: int = 0, workers: int | None = None, skip_bad: bool = False,
                labels_file=None, low: float = 0.5, high: float = 99.5, force: bool = False) -> dict:
    """Build (or resume, or reuse) the cache in `out_dir`; returns the manifest dict."""
    t0 = time.time()
    _check_params(image_dir, size, folds, low, high)
    out = Path(out_dir)
    workers = _default_workers() if not workers else int(workers)
    sources = {"train_csv": train_csv, "test_csv": test_csv, "removal_csv": removal_csv,
               "labels_file": labels_file}
    fingerprint, inputs = _fingerprint(sources, image_dir, size, low, high, folds, seed)
    finished = _read_manifest(out)
    if finished is not None and finished.get("fingerprint") == fingerprint and not force:
        print(f"cache up to date: {out} ({finished['counts']['train']} train, "
              f"{finished['counts']['test']} test images, built {finished.get('created', '?')}); reusing it")
        for name in ("done.npy", "plan.json"):  # left when a build was killed just after its rename
            (out / name).unlink(missing_ok=True)
        return finished
    _check_replaceable(out)
    if finished is not None:
        why = "--force" if force else "inputs or parameters changed since it was built"
        print(f"{out}: {why}; rebuilding (the old cache stays in place until the new one is complete)")

    plan = _make_plan(train_csv, test_csv, removal_csv, labels_file, folds, seed)
    partial = _partial_dir(out)
    image_key = _image_key(plan, image_dir, size, low, high)
    done = _open_partial(partial, plan, size, image_key, fresh=force)
    todo = np.flatnonzero(done == 0)
    paths = _resolve_paths(image_dir, plan.table["ImageID"].to_numpy()[todo])
    failures = _missing_failures(plan, todo, paths, image_dir, skip_bad)
    tasks = [(int(r), p) for r, p in zip(todo, paths) if p is not None]
    reused = int(done.sum())
    if reused:
        print(f"resuming {partial}: {reused} of {len(done)} images already done")

    timing: dict = {}
    failures += _decode_all(partial, tasks, done, plan, size, low, high, workers, skip_bad, timing)
    decode_s = timing["decode_s"]
    row_of = dict(zip(plan.table["ImageID"], plan.table["row"]))
    failures.sort(key=lambda f: row_of[f["ImageID"]])  # workers finish in any order

    manifest = _finalize(out, partial, plan, failures, dict(
        fingerprint=fingerprint, inputs=inputs, sources=_describe_sources(sources, inputs),
        image_dir=os.path.abspath(image_dir), size=int(size), folds=int(folds), seed=int(seed),
        windowing={"low_pct": low, "high_pct": high, "stride": WINDOW_STRIDE,
                   "method": "16-bit: percentile window of a strided subsample, linear to 0..255; "
                             "8-bit: unchanged"},
        resize="squash to size x size (aspect ratio not kept), area averaging",
        workers=workers, decoded_this_run=len(tasks), reused_rows=reused,
        worker_start_s=round(timing["worker_start_s"], 3), decode_s=round(decode_s, 3),
        images_per_s=round(len(tasks) / decode_s, 2) if decode_s > 0 else None,
    ), t0)
    _print_summary(out, manifest)
    return manifest


def _check_params(image_dir, size, folds, low, high) -> None:
    if not os.path.isdir(image_dir):
        raise InputError(f"{image_dir}: image directory not found (--image-dir)")
    if not 8 <= int(size) <= 8192:
        raise InputError(f"--size {size}: expected 8..8192")
    if int(folds) < 2:
        raise InputError(f"--folds {folds}: need at least 2")
    if not 0 <= low < high <= 100:
        raise InputError(f"--window-low {low} / --window-high {high}: need 0 <= low < high <= 100")


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _check_replaceable(d: Path) -> None:
    """Refuse to overwrite a folder that is not one of ours (e.g. a mistyped --out)."""
    if not d.exists():
        return
    if not d.is_dir():
        raise InputError(f"{d}: exists and is not a directory; choose another --out")
    foreign = [p.name for p in d.iterdir() if p.name not in _OWN_FILES and not p.name.startswith(".")]
    if foreign:
        raise InputError(f"{d}: exists and holds files that are not part of an image cache "
                         f"({', '.join(sorted(foreign)[:3])}...); choose another --out or remove it")


# -- plan ---------------------------------------------------------------------------------------------


def _make_plan(train_csv, test_csv, removal_csv, labels_file, folds, seed) -> _Plan:
    import pandas as pd

    from .tables import read_id_list, read_training_csv
    from .splits import assign_folds

    train, labels = read_training_csv(train_csv, labels_file=labels_file)
    clash = [lab for lab in labels if lab in NON_LABEL_COLUMNS]
    if clash:
        raise InputError(f"{train_csv}: label column name(s) {clash} clash with the cache index's own columns")
    train_rows = train.index.to_numpy()
    removed = 0
    if removal_csv is not None:
        removal = read_id_list(removal_csv, allow_empty=True)
        drop = train["ImageID"].isin(set(removal["ImageID"])).to_numpy()
        removed = int(drop.sum())
        train, train_rows = train[~drop], train_rows[~drop]
    if len(train) == 0:
        raise InputError(f"{train_csv}: no training rows left after removing the {removed} listed in {removal_csv}")
    train.insert(0, "row", 0)
    train.insert(4, "split", "train")
    train.insert(5, "fold", assign_folds(train, labels, k=folds, seed=seed))
    parts, files, rows = [train], [np.full(len(train), os.fspath(train_csv), dtype=object)], [train_rows]
    if test_csv is not None:
        test = read_id_list(test_csv)
        _check_no_overlap(train, train_rows, train_csv, test, test_csv)
        test_rows = test.index.to_numpy()
        test.insert(0, "row", 0)
        test["split"], test["fold"] = "test", -1
        parts.append(test)
        files.append(np.full(len(test), os.fspath(test_csv), dtype=object))
        rows.append(test_rows)
    table = pd.concat(parts, ignore_index=True)
    table["row"] = np.arange(len(table), dtype=np.int64)
    table["fold"] = table["fold"].astype(np.int64)
    for lab in labels:
        table[lab] = table[lab].astype("Int8")  # NA for test rows -> written as empty cells
    table = table[INDEX_FIXED_COLUMNS + labels]
    return _Plan(table, labels, np.concatenate(files), np.concatenate(rows), removed)


def _check_no_overlap(train, train_rows, train_csv, test, test_csv) -> None:
    """An image in both lists would be trained on and scored on, and its ImageID would be
    ambiguous in the index."""
    both = np.flatnonzero(test["ImageID"].isin(set(train["ImageID"])).to_numpy())
    if len(both):
        iid = test["ImageID"].iloc[both[0]]
        r_train = train_rows[np.flatnonzero((train["ImageID"] == iid).to_numpy())[0]]
        r_test = test.index[both[0]]
        raise InputError(f"{test_csv}: row {r_test}: ImageID '{iid}' is also in {train_csv} (row {r_train}); "
                         f"{len(both)} test images are in the training CSV. Pass the official Removal.csv "
                         f"(--removal-csv) or remove them from the training CSV")


# -- fingerprints -------------------------------------------------------------------------------------


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(sources: dict, image_dir, size, low, high, folds, seed) -> tuple[str, dict]:
    """Everything that determines a finished cache's content -> (hex digest, the inputs)."""
    for name, path in sources.items():
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{path}: file not found (--{name.replace('_', '-')})")
    inputs = {
        "version": CACHE_VERSION,
        **{name: (_sha256(p) if p is not None else None) for name, p in sources.items()},
        "image_dir": os.path.abspath(image_dir), "size": int(size), "low": float(low), "high": float(high),
        "stride": WINDOW_STRIDE, "folds": int(folds), "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), inputs


def _image_key(plan: _Plan, image_dir, size, low, high) -> str:
    """What determines the pixels of every array row (labels and folds do not)."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, os.path.abspath(image_dir), int(size), float(low), float(high),
                         WINDOW_STRIDE]).encode())
    for iid in plan.table["ImageID"]:
        h.update(iid.encode() + b"\0")
    return h.hexdigest()


def _describe_sources(sources: dict, inputs: dict) -> dict:
    """Path, size, mtime and sha256 (already computed for the fingerprint) of each source file."""
    out = {}
    for name, path in sources.items():
        if path is None:
            out[name] = None
            continue
        st = os.stat(path)
        out[name] = {"path": os.path.abspath(path), "bytes": st.st_size,
                     "mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(st.st_mtime)),
                     "sha256": inputs[name]}
    return out


# -- the partial folder -------------------------------------------------------------------------------


def _open_partial(partial: Path, plan: _Plan, size: int, image_key: str, fresh: bool) -> np.ndarray:
    """Reuse a matching partial build (-> its done mask) or set up a new one (-> zeros)."""
    n = len(plan.table)
    plan_path = partial / "plan.json"
    if partial.exists() and not fresh:
        try:
            old = json.loads(plan_path.read_text(encoding="utf-8"))
            done = np.load(partial / "done.npy")
            images = np.load(partial / "images.npy", mmap_mode="r")
            if (old.get("image_key") == image_key and done.shape == (n,)
                    and images.shape == (n, size, size)):
                return done.astype(np.uint8)
            print(f"{partial}: left by a build with other inputs; starting over")
        except (OSError, ValueError, json.JSONDecodeError):
            print(f"{partial}: incomplete set-up from an earlier run; starting over")
    if partial.exists():
        _check_replaceable(partial)
        shutil.rmtree(partial)
    _check_disk_space(partial.parent, n * size * size)
    partial.mkdir(parents=True)
    np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size)).flush()
    done = np.zeros(n, dtype=np.uint8)
    _save_done(partial, done)
    # plan.json last: its presence means the folder is completely set up
    write_json(plan_path, {"image_key": image_key, "rows": n, "size": int(size),
                           "image_ids": plan.table["ImageID"].tolist()})
    return done


def _check_disk_space(where: Path, need: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < need:
        raise InputError(f"{where}: the cache needs {need / 1e9:.1f} GB but only {free / 1e9:.1f} GB are free "
                         f"(use a smaller --size or another --out)")


def _save_done(partial: Path, done: np.ndarray) -> None:
    """Persist the done mask atomically; fsync images.npy first so that every row marked done
    is on disk (workers write through shared mappings, i.e. the same page cache)."""
    fd = os.open(partial / "images.npy", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp = partial / ".done.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, done)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, partial / "done.npy")


# -- image paths --------------------------------------------------------------------------------------


def _resolve_paths(image_dir, image_ids) -> list[str | None]:
    """ImageID -> file path under image_dir (None: not found).

    Looks for image_dir/ImageID first; IDs not there are searched in subfolders (the original
    PadChest download is split into numbered folders). One listing + at most one walk, instead
    of a stat per image.
    """
    image_dir = os.fspath(image_dir)
    top = set(os.listdir(image_dir))
    paths, missing = [], []
    for i, iid in enumerate(image_ids):
        if iid in top or (("/" in iid or os.sep in iid) and os.path.isfile(os.path.join(image_dir, iid))):
            paths.append(os.path.join(image_dir, iid))
        else:
            paths.append(None)
            missing.append(i)
    if missing:
        found = _walk_names(image_dir, {image_ids[i] for i in missing})
        for i in missing:
            paths[i] = found.get(image_ids[i])
    return paths


def _walk_names(image_dir: str, wanted: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for root, _dirs, files in os.walk(image_dir):
        if root == image_dir:
            continue
        for name in wanted.intersection(files):
            found.setdefault(name, os.path.join(root, name))  # first in walk order if duplicated
    return found


def _missing_failures(plan: _Plan, todo, paths, image_dir, skip_bad) -> list[dict]:
    missing = [i for i, p in enumerate(paths) if p is None]
    if not missing:
        return []
    if len(missing) == len(paths) and len(paths) == len(plan.table):
        iid = plan.table["ImageID"].iloc[int(todo[0])]
        raise InputError(f"{image_dir}: none of the {len(paths)} images was found (e.g. '{iid}' from "
                         f"{plan.csv_file[todo[0]]} row {plan.csv_row[todo[0]]}); is --image-dir right?")
    failures = [_failure(plan, int(todo[i]), os.path.join(image_dir, plan.table['ImageID'].iloc[int(todo[i])]),
                         "image file not found") for i in missing]
    if not skip_bad:
        listed = "; ".join(_describe_failure(f) for f in failures[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        raise InputError(f"{len(failures)} image file(s) not found in {image_dir}: {listed}{more}. "
                         f"Fix --image-dir or the files, or re-run with --skip-bad to leave them out")
    return failures


def _failure(plan: _Plan, row: int, path, reason: str) -> dict:
    return {"ImageID": plan.table["ImageID"].iloc[row], "file": os.fspath(path), "reason": reason,
            "split": plan.table["split"].iloc[row], "csv": plan.csv_file[row], "csv_row": int(plan.csv_row[row])}


def _describe_failure(f: dict) -> str:
    return f"{f['file']}: {f['reason']} (ImageID '{f['ImageID']}', row {f['csv_row']} of {f['csv']})"


# -- decoding -----------------------------------------------------------------------------------------

# Per-process state of a decode worker (set by _worker_init).
_W: dict = {}
WORKER_START_TIMEOUT = 120.0  # seconds to wait for the pool's processes to come up


def _worker_init(images_path: str, size: int, low: float, high: float, barrier=None) -> None:
    """Open the shared memmap; in a pool process also meet the main process at `barrier` so
    that it can time the start-up apart from the decoding."""
    try:
        import cv2

        if barrier is not None:
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
            cv2.setNumThreads(1)  # one image per process; OpenCV threads would oversubscribe
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # we report failures ourselves
        _W.update(images=np.load(images_path, mmap_mode="r+"), size=size, low=low, high=high)
    finally:
        if barrier is not None:
            try:
                barrier.wait(WORKER_START_TIMEOUT)
            except threading.BrokenBarrierError:
                pass


def _work_chunk(chunk: list[tuple[int, str]]) -> list[tuple[int, str | None]]:
    """Decode a chunk of (row, path) into the shared memmap -> [(row, None | failure reason)]."""
    out = []
    for row, path in chunk:
        try:
            _W["images"][row] = load_for_cache(path, _W["size"], _W["low"], _W["high"], WINDOW_STRIDE)
            out.append((row, None))
        except ImageReadError as e:
            out.append((row, e.reason))
        except Exception as e:  # noqa: BLE001 - any decoder failure is reported per image
            out.append((row, f"{type(e).__name__}: {e}".strip()))
    return out


def _chunks(tasks: list, workers: int) -> list[list]:
    # small enough to balance and to show progress, big enough to amortise the IPC
    size = max(1, min(16, len(tasks) // (workers * 4) or 1))
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]


def _decode_all(partial: Path, tasks, done, plan: _Plan, size, low, high, workers, skip_bad,
                timing: dict) -> list[dict]:
    """Decode every task into partial/images.npy, marking `done` and persisting it every
    FLUSH_SECONDS and at the end (also on errors and Ctrl-C). -> failures.
    Fills timing: worker_start_s (pool start-up) and decode_s (from workers ready to the end)."""
    failures: list[dict] = []
    timing.update(worker_start_s=0.0, decode_s=0.0)
    if not tasks:
        return failures
    path_of = dict(tasks)
    workers = max(1, min(workers, len(tasks)))
    t_start = time.time()
    ready = {"t": t_start}

    def on_ready():
        ready["t"] = time.time()

    last_flush = time.time()
    results = _run_inline if workers == 1 else _run_pool
    images_path = os.fspath(partial / "images.npy")
    stream = results(_chunks(tasks, workers), workers, (images_path, size, low, high), on_ready)
    with tqdm(total=len(tasks), unit="img", desc="preprocess", dynamic_ncols=True) as bar:
        try:
            for chunk_result in stream:
                for row, reason in chunk_result:
                    if reason is None:
                        done[row] = 1
                    else:
                        failures.append(_failure(plan, row, path_of[row], reason))
                bar.update(len(chunk_result))
                if failures and not skip_bad:
                    break
                if time.time() - last_flush >= FLUSH_SECONDS:
                    _save_done(partial, done)
                    last_flush = time.time()
        finally:
            stream.close()  # stops the workers now, also when we leave the loop early
            _save_done(partial, done)
    timing.update(worker_start_s=ready["t"] - t_start, decode_s=time.time() - ready["t"])
    if failures and not skip_bad:
        f = failures[0]
        raise InputError(f"{_describe_failure(f)}. Fix or remove the file, or re-run with --skip-bad to "
                         f"leave such images out; the {int(done.sum())} images done so far are kept for the re-run")
    return failures


def _run_inline(chunks, workers, initargs, on_ready):
    """workers == 1: decode in this process (no pool start-up or IPC)."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    _worker_init(*initargs)
    on_ready()
    try:
        for chunk in chunks:
            yield _work_chunk(chunk)
    finally:
        _W.clear()
        cv2.setNumThreads(threads)


def _run_pool(chunks, workers, initargs, on_ready):
    """Decode chunks in `workers` processes, yielding results as they complete.

    ProcessPoolExecutor rather than multiprocessing.Pool: a worker killed by the OS (out of
    memory on a huge image) raises BrokenProcessPool instead of hanging. "spawn" start: the
    workers do not inherit this process's threads (OpenCV's pool, tqdm's monitor). At most
    4 chunks per worker are in flight, so a stop does not wait for a long queue. The first
    submissions start all `workers` processes; each meets this process at a barrier once its
    initializer has run, which is when `on_ready` is called.
    """
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                  initargs=(*initargs, barrier))
    pending: set = set()
    it = iter(chunks)
    waited = False
    try:
        while True:
            while len(pending) < workers * 4:
                chunk = next(it, None)
                if chunk is None:
                    break
                pending.add(pool.submit(_work_chunk, chunk))
            if not waited:
                waited = True
                try:
                    barrier.wait(WORKER_START_TIMEOUT)
                except threading.BrokenBarrierError:
                    pass  # a worker did not start: its futures raise BrokenProcessPool below
                on_ready()
            if not pending:
                return
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                yield fut.result()
    except cf.process.BrokenProcessPool as e:
        raise InputError(f"a preprocessing worker process failed or died ({e}); re-run to continue "
                         "(finished images are kept), with fewer --workers if it was out of memory") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- finishing ----------------------------------------------------------------------------------------


def _finalize(out: Path, partial: Path, plan: _Plan, failures: list[dict], info: dict, t0: float) -> dict:
    """Write index.csv, labels.txt, manifest.json (last) into the partial folder, then rename it
    to `out` (replacing an old cache only now)."""
    failed_rows = {int(r) for r in plan.table.index[plan.table["ImageID"].isin({f["ImageID"] for f in failures})]}
    keep = ~plan.table["row"].isin(failed_rows).to_numpy()
    index = plan.table[keep]
    train = index[index["split"] == "train"]
    write_csv(partial / "index.csv", index)
    write_text(partial / "labels.txt", "".join(f"{lab}\n" for lab in plan.labels))
    elapsed = time.time() - t0
    manifest = {
        "format": "cxrlt image cache", "version": CACHE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "array_rows": len(plan.table), "dtype": "uint8", "labels": plan.labels,
        "counts": {
            "train": int(len(train)), "test": int((index["split"] == "test").sum()),
            "removed": plan.removed, "failed": len(failures),
            "positives": {lab: int(train[lab].sum()) for lab in plan.labels},
            "fold_sizes": np.bincount(train["fold"].to_numpy(), minlength=info["folds"]).tolist(),
        },
        "failures": failures,
        **info,
        "elapsed_s": round(elapsed, 3),
    }
    write_json(partial / "manifest.json", manifest)
    for p in partial.iterdir():  # temp files of an attempt killed mid-write must not move into the cache
        if p.name.startswith(".") and ".tmp" in p.name:
            p.unlink(missing_ok=True)
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(partial, out)
    for name in ("done.npy", "plan.json"):
        (out / name).unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def _print_summary(out: Path, m: dict) -> None:
    c = m["counts"]
    rate = f", {m['images_per_s']} images/s with {m['workers']} workers" if m.get("images_per_s") else ""
    print(f"cache written: {out} ({c['train']} train, {c['test']} test images; {c['removed']} removed by "
          f"the removal list; {c['failed']} failed) in {m['elapsed_s']:.1f} s{rate}")
    if m["failures"]:
        print(f"warning: {len(m['failures'])} image(s) could not be used and were left out "
              f"(all listed in {out / 'manifest.json'}):", file=sys.stderr)
        for f in m["failures"][:_MAX_REPORTED]:
            print(f"  {_describe_failure(f)}", file=sys.stderr)
        if len(m["failures"]) > _MAX_REPORTED:
            print(f"  ... and {len(m['failures']) - _MAX_REPORTED} more", file=sys.stderr)
