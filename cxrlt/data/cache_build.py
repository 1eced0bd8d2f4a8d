"""The image cache BUILDER (preprocess.py): a train cache and one test cache per test list.

The layout of the cache root and of a cache folder is documented in cxrlt/data/cache.py (the reader).

Reuse. Building a cache reuses the pixels of every image already decoded in itself or in a
sibling cache of the same root with the same size and windowing (`manifest.json` "pixels"),
matched by ImageID when the source file is the same (`sources.csv`: bytes + mtime_ns, or, when the
time differs, bytes + content key: a copied or moved image folder is read and hashed, not
decoded); only the rest is decoded. So a label, fold, Removal.csv or metadata edit decodes nothing, a new test list
decodes only its new images, and a changed IMAGE_DIR decodes only the files that differ. When
every image comes from the cache's own array, nothing is copied either: the new index points
into the same images.npy (hard-linked into the new folder).

Failures. An image that cannot be used stops the build with a one-line error naming the file,
the ImageID and its CSV row, unless skip_bad (--skip-bad): then a TRAIN image is left out and
listed in the manifest (a test image is never optional: every one needs a prediction). The
manifest remembers each failed file's bytes + mtime_ns: a later build with --skip-bad does not
retry an unchanged file, one without --skip-bad always does, and a fixed file is decoded.
ImageIDs must name files inside the image folder: an absolute path, a `..` component or a
control character (a line break inside a quoted CSV cell) is refused.

Building is resumable, atomic and exclusive. It holds cxrlt.core.fileio.output_lock(out) and works
in `<out>.partial/`: images.npy (its disk blocks allocated up front, so that a full disk is
reported before any work, with the sizes, and never hits a process mid-write), done.npy (uint8
(N,), 1 = row written; rewritten atomically every FLUSH_SECONDS after an fsync of images.npy, so a
row marked done is on disk), plan.json (written last when the folder is set up: a key of what
determines the pixels of every row). A re-run with the same plan skips the rows done; otherwise
it starts over. When every row is done, index.csv, labels.txt, sources.csv and manifest.json
(last) are written and the folder is renamed to `out` (an old cache there is replaced only then).
A finished cache whose inputs (the CSVs' rows, labels, folds and keys; each image's bytes and
mtime_ns; size and windowing) are unchanged is left as it is (its manifest is touched, for Make).

Decoding runs in `workers` processes: this one and workers - 1 worker processes
(cxrlt/data/decode_pool.py hands out the images; cxrlt/data/decode_worker.py is the worker).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from cxrlt.core import progress

from cxrlt.data import decode_worker
from cxrlt.data import external
from cxrlt.data import identity
from cxrlt.data.cache import CACHE_VERSION, partial_dir
from cxrlt.data.decode_pool import DecodePool
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import output_lock, write_json, write_text
from cxrlt.core.hashing import file_digest, file_key, json_key
from cxrlt.data.splits import assign_folds
from cxrlt.data.tables import INDEX_FIXED_COLUMNS, NON_LABEL_COLUMNS, read_id_list, read_meta_csv, read_training_csv

WINDOW_STRIDE = decode_worker.WINDOW_STRIDE
FLUSH_SECONDS = 10.0  # how often the done mask is persisted (work lost on a kill: at most this)
COPY_BLOCK = 256  # rows copied from another cache at a time
_OWN_FILES = {"images.npy", "index.csv", "labels.txt", "sources.csv", "manifest.json", "done.npy", "plan.json",
              "keys.npy"}
_BUILD_FILES = ("done.npy", "plan.json", "keys.npy")  # of the partial folder only
_MAX_REPORTED = 20  # failures printed in the --skip-bad report (all are in the manifest)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


# ---- the two kinds of cache -------------------------------------------------------------------------


def build_train_cache(train_csv, image_dir, out, size: int, *, removal_csv=None, meta_csv=None, labels_file=None,
                      folds: int = 5, seed: int = 0, workers: int | None = None, skip_bad: bool = False,
                      low: float = 0.5, high: float = 99.5, force: bool = False) -> dict:
    """Build (or resume, or reuse) the train cache in `out` (normally <root>/train) -> manifest."""
    _check_params(image_dir, size, low, high)
    if int(folds) < 2:
        raise InputError(f"--folds {folds}: need at least 2")
    table = _train_table(train_csv, removal_csv, meta_csv, labels_file, int(folds), int(seed))
    _check_not_in_tests(table, train_csv, Path(out))
    return _build(table, image_dir, Path(out), _pixels(size, low, high), workers, skip_bad, force)


def build_test_cache(test_csv, image_dir, out, size: int, *, meta_csv=None, workers: int | None = None,
                     skip_bad: bool = False, low: float = 0.5, high: float = 99.5, force: bool = False) -> dict:
    """Build (or reuse) the test cache of a test list in `out` (normally
    <root>/test-<test_cache_key(test_csv, meta_csv)>) -> manifest. skip_bad does not apply to
    test images: a bad one stops the build."""
    _check_params(image_dir, size, low, high)
    out = Path(out)
    table = _test_table(test_csv, meta_csv)
    _check_not_in_train(table, test_csv, out.parent / "train")
    return _build(table, image_dir, out, _pixels(size, low, high), workers, skip_bad, force)


def build_external_cache(dataset: str, data_dir, out, size: int, *, uncertain: str = "zeros", blank: str = "zeros",
                         official_test: str = "keep", **kw) -> dict:
    """Build (or resume, or reuse) a train cache of a public dataset in its native layout
    (cxrlt/data/external.py: nih, chexpert, mimic) -> manifest. Unannotated entries (an `ignore`
    policy) are blank label cells. official_test: keep | drop the dataset's own test split.
    kw: folds, seed, workers, skip_bad, low, high, force (as build_train_cache)."""
    return build_multi_cache([(dataset, data_dir, uncertain, blank)], out, size, official_test=official_test, **kw)


def build_multi_cache(parts, out, size: int, *, official_test: str = "keep", folds: int = 5, seed: int = 0,
                      workers: int | None = None, skip_bad: bool = False, low: float = 0.5, high: float = 99.5,
                      force: bool = False) -> dict:
    """One train cache of several public datasets: parts = [(dataset, data_dir, uncertain, blank)].

    Labels: the union of the datasets' label sets (first appearance order); a label a dataset does
    not annotate is a blank cell (unannotated: masked in training). ImageIDs are paths relative to
    the data folders' common parent; with several parts, patient and study keys are prefixed by
    the dataset's name (no two datasets share a patient)."""
    if not parts:
        raise InputError("no dataset given (--dataset / --data-dir)")
    for _ds, data_dir, _u, _b in parts:
        _check_params(data_dir, size, low, high)
    if int(folds) < 2:
        raise InputError(f"--folds {folds}: need at least 2")
    if official_test not in ("keep", "drop"):
        raise InputError(f"--official-test {official_test!r}: expected keep or drop")
    dirs = [os.path.realpath(d) for _ds, d, _u, _b in parts]
    image_dir = dirs[0] if len(dirs) == 1 else os.path.commonpath(dirs)
    if len(set(dirs)) < len(dirs):
        raise InputError(f"--data-dir: the same folder is given twice ({dirs})")
    frames, labels, files, rows, sources, infos, removed = [], [], [], [], {}, [], 0
    for (dataset, data_dir, uncertain, blank), real in zip(parts, dirs):
        ext = external.read_dataset(dataset, data_dir, uncertain, blank)
        df = ext.frame
        keep = np.ones(len(df), dtype=bool) if official_test == "keep" else (df["official"] != "test").to_numpy()
        removed += int((~keep).sum())
        df = df[keep].reset_index(drop=True)
        prefix = os.path.relpath(real, image_dir)
        if prefix != ".":
            df["ImageID"] = prefix.replace(os.sep, "/") + "/" + df["ImageID"]
        if len(parts) > 1:
            for col in ("patient", "study"):
                df[col] = f"{dataset}:" + df[col]
            df["PatientID"] = df["patient"]
        labels += [lab for lab in ext.labels if lab not in labels]
        frames.append(df)
        files.append(ext.csv_file[keep])
        rows.append(ext.csv_row[keep])
        sources.update({f"{dataset}:{k}" if len(parts) > 1 else k: v for k, v in ext.sources.items()})
        infos.append({"dataset": dataset, "data_dir": os.fspath(data_dir), "images": int(len(df)),
                      "label_policy": {"uncertain": uncertain, "blank": blank},
                      **{k: v for k, v in ext.info.items() if k not in ("dataset", "uncertain", "blank")}})
    df = pd.concat(frames, ignore_index=True)  # a label a dataset lacks: <NA> (unannotated)
    for lab in labels:
        df[lab] = df[lab].astype("Int8")
    if len(df) == 0:
        raise InputError(f"{image_dir}: no images left after dropping the official test split")
    dup = df["ImageID"].duplicated().to_numpy()
    if dup.any():
        raise InputError(f"{image_dir}: image {df['ImageID'][dup].iloc[0]!r} is listed by two datasets")
    df["split"] = "train"
    strat = df[labels].fillna(0).astype(np.int64)  # folds stratify on the annotated positives
    df["fold"] = assign_folds(pd.concat([df[["patient"]], strat], axis=1), labels, k=int(folds), seed=int(seed),
                              group_col="patient")
    index = df[INDEX_FIXED_COLUMNS[1:] + labels].reset_index(drop=True)
    policy = [i["label_policy"] for i in infos] if len(infos) > 1 else infos[0]["label_policy"]
    info = {"folds": int(folds), "seed": int(seed), "removed": removed, "official_test": official_test,
            "label_policy": policy,
            **({"datasets": infos} if len(infos) > 1 else {k: v for k, v in infos[0].items() if k != "label_policy"})}
    table = _Table("train", index, labels, np.concatenate(files), np.concatenate(rows), sources, info)
    return _build(table, image_dir, Path(out), _pixels(size, low, high), workers, skip_bad, force)


def _check_params(image_dir, size, low, high) -> None:
    if not os.path.isdir(image_dir):
        raise InputError(f"{image_dir}: image directory not found (--image-dir)")
    if not 8 <= int(size) <= 8192:
        raise InputError(f"--size {size}: expected 8..8192")
    if not 0 <= low < high <= 100:
        raise InputError(f"--window-low {low} / --window-high {high}: need 0 <= low < high <= 100")


def _pixels(size, low, high) -> dict:
    """What determines the pixels of an image besides its file: caches reuse each other's
    pixels only when these are equal."""
    return {"version": CACHE_VERSION, "size": int(size), "low_pct": float(low), "high_pct": float(high),
            "stride": WINDOW_STRIDE}


# ---- tables: what a cache holds, before any image is decoded ----------------------------------------


@dataclass
class _Table:
    """One line per image, in CSV order."""

    kind: str  # "train" | "test"
    index: pd.DataFrame  # INDEX_FIXED_COLUMNS but "row", then the labels
    labels: list[str]
    csv_file: np.ndarray  # per line: the CSV it comes from (for messages)
    csv_row: np.ndarray  # per line: its spreadsheet row there
    sources: dict  # name -> the CSV file read (or None), recorded in the manifest
    info: dict  # folds, seed, removed: recorded in the manifest


def _train_table(train_csv, removal_csv, meta_csv, labels_file, folds: int, seed: int) -> _Table:
    train, labels = read_training_csv(train_csv, labels_file=labels_file)
    clash = [lab for lab in labels if lab in NON_LABEL_COLUMNS]
    if clash:
        raise InputError(f"{train_csv}: label column name(s) {clash} clash with the cache index's own columns")
    removed = 0
    if removal_csv is not None:
        removal = read_id_list(removal_csv, allow_empty=True)
        drop = train["ImageID"].isin(set(removal["ImageID"])).to_numpy()
        removed = int(drop.sum())
        train = train[~drop]
    if len(train) == 0:
        raise InputError(f"{train_csv}: no training rows left after removing the {removed} listed in {removal_csv}")
    df = _with_keys(train, meta_csv)
    # Folds group on the CSV's PatientID: coarser than the exact patient (never a leak) and the
    # same with or without a metadata CSV; the patient key only where the CSV has no PatientID.
    df["group"] = df["PatientID"].where(df["PatientID"].str.strip() != "", df["patient"])
    df["split"] = "train"
    df["fold"] = assign_folds(df, labels, k=folds, seed=seed, group_col="group")
    index = df[INDEX_FIXED_COLUMNS[1:] + labels].reset_index(drop=True)
    return _Table("train", index, labels, np.full(len(index), os.fspath(train_csv), dtype=object),
                  train.index.to_numpy(), {"train_csv": train_csv, "removal_csv": removal_csv, "meta_csv": meta_csv,
                                           "labels_file": labels_file},
                  {"folds": folds, "seed": seed, "removed": removed})


def _test_table(test_csv, meta_csv) -> _Table:
    test = read_id_list(test_csv)
    df = _with_keys(test, meta_csv, test=True)
    df["split"], df["fold"] = "test", -1
    index = df[INDEX_FIXED_COLUMNS[1:]].reset_index(drop=True)
    return _Table("test", index, [], np.full(len(index), os.fspath(test_csv), dtype=object), test.index.to_numpy(),
                  {"test_csv": test_csv, "meta_csv": meta_csv}, {})


def _with_keys(df: pd.DataFrame, meta_csv, test: bool = False) -> pd.DataFrame:
    """df plus the study, patient, projection and centre columns (rules: cxrlt/data/identity.py).

    For test images (test=True) the metadata CSV gives the projection and the centre only: CXR-LT
    2026 forbids re-identifying evaluation images (docs/rules.md), so their patient and study keys
    come from the test list itself (the study from the PadChest ImageID)."""
    df = df.copy()
    ids = df["ImageID"].tolist()
    n = len(ids)
    meta_patient, meta_date, meta_projection, meta_centre = [""] * n, [""] * n, [""] * n, [""] * n
    if meta_csv is not None:
        meta = read_meta_csv(meta_csv, ids=ids)
        _check_centres(meta_csv, meta)
        meta = meta.set_index("ImageID")
        _check_meta_matches(meta_csv, len(meta), n, test)
        if not test:
            meta_patient = df["ImageID"].map(meta["PatientID"]).fillna("").tolist()
            meta_date = df["ImageID"].map(meta["StudyDate_DICOM"]).fillna("").tolist()
        meta_projection = df["ImageID"].map(meta["Projection"]).fillna("").tolist()
        meta_centre = df["ImageID"].map(meta["Centre"]).fillna("").tolist()
        identity.check_projections(meta_csv, meta_projection)
    csv_patient, csv_date = df["PatientID"].tolist(), df["StudyDate_DICOM"].tolist()
    df["patient"] = [identity.patient_key(i, p, m) for i, p, m in zip(ids, csv_patient, meta_patient)]
    df["study"] = [identity.study_key(i, m.strip() or p.strip(), d.strip() or md)
                   for i, p, m, d, md in zip(ids, csv_patient, meta_patient, csv_date, meta_date)]
    df["projection"] = [identity.projection(p) for p in meta_projection]
    df["centre"] = [identity.centre(i, c) for i, c in zip(ids, meta_centre)]
    return df


def _check_centres(meta_csv, meta: pd.DataFrame) -> None:
    """A metadata `Centre` value must be a name the index can hold (blank: from the ImageID)."""
    given = meta["Centre"].str.strip()
    bad = (given != "") & ~given.map(identity.valid_centre_name)
    if bad.any():
        row = meta.index[bad.to_numpy()][0]
        raise InputError(f"{meta_csv}: row {row}, column 'Centre': {meta['Centre'][row]!r} is not a centre name "
                         f"(letters, digits, '_', '.', '-'; e.g. {', '.join(identity.CENTRES[:2])}; blank: "
                         f"from the ImageID's shape)")


META_MIN_SHARE = 0.5  # a metadata CSV matching fewer of the training images is warned about


def _check_meta_matches(meta_csv, matched: int, n: int, test: bool) -> None:
    """A metadata CSV of another release (or a typo'd file) matches few or none of the images: none
    of the training images is refused, few is a warning with the count (test: a warning only)."""
    what = "test-list" if test else "training"
    if matched == 0 and not test:
        raise InputError(f"{meta_csv}: no ImageID of the metadata CSV is one of the {n} {what} images: another "
                         f"release or the wrong file (META_CSV)")
    if matched < META_MIN_SHARE * n:
        print(f"warning: {meta_csv}: only {matched} of the {n} {what} images are in the metadata CSV; the others "
              f"have no exact patient, study or projection (META_CSV)", file=sys.stderr)


def _cache_ids(cache_dir: Path) -> set[str] | None:
    """The ImageIDs of a finished cache (None: no cache there)."""
    index = cache_dir / "index.csv"
    if not (cache_dir / "manifest.json").is_file() or not index.is_file():
        return None
    return set(pd.read_csv(index, usecols=["ImageID"], dtype=str, keep_default_na=False)["ImageID"])


def _check_not_in_tests(table: _Table, train_csv, train_dir: Path) -> None:
    """The other order of _check_not_in_train: a train cache built after a test cache of the same
    root refuses the images of that test list (whichever cache is built first, the overlap stops)."""
    root = train_dir.parent
    if not root.is_dir():
        return
    for test_dir in sorted(p for p in root.iterdir() if p.name.startswith("test") and p.is_dir()):
        test_ids = _cache_ids(test_dir)
        if not test_ids:
            continue
        both = np.flatnonzero(table.index["ImageID"].isin(test_ids).to_numpy())
        if len(both):
            iid = table.index["ImageID"].iloc[both[0]]
            raise InputError(f"{train_csv}: row {table.csv_row[both[0]]}: ImageID '{iid}' is a test image (in "
                             f"{test_dir}); {len(both)} training images are in that test list. Pass the official "
                             f"Removal.csv (--removal-csv) or remove them from the training CSV")


def _check_not_in_train(table: _Table, test_csv, train_dir: Path) -> None:
    """An image in both caches would be trained on and scored on. Checked against the train
    cache of the same root when it exists (and by the train cache against the test caches there)."""
    train_ids = _cache_ids(train_dir)
    if train_ids is None:
        return
    both = np.flatnonzero(table.index["ImageID"].isin(train_ids).to_numpy())
    if len(both):
        iid = table.index["ImageID"].iloc[both[0]]
        raise InputError(f"{test_csv}: row {table.csv_row[both[0]]}: ImageID '{iid}' is also a training image "
                         f"(in {train_dir}); {len(both)} test images are in the training CSV. Pass the official "
                         f"Removal.csv to the train cache (--removal-csv) or remove them from the training CSV")


# ---- the build --------------------------------------------------------------------------------------


def _build(table: _Table, image_dir, out: Path, pixels: dict, workers, skip_bad: bool, force: bool) -> dict:
    t0 = time.time()
    workers = _default_workers() if not workers else int(workers)
    if workers < 1:
        raise InputError(f"--workers {workers}: need at least 1")
    skip = skip_bad and table.kind == "train"  # a test image is never optional
    _check_replaceable(out)
    with output_lock(out):
        files = _locate(table, image_dir)
        inputs_key = _inputs_key(table, files, pixels)
        old = _read_manifest(out)
        if not force and old is not None and old.get("inputs_key") == inputs_key and (skip or not old["failures"]):
            return _up_to_date(out, old)
        if old is not None:
            why = ("--force" if force else "its inputs changed" if old.get("inputs_key") != inputs_key
                   else "it left out images that failed, and --skip-bad is not given now")
            print(f"{out}: {why}; rebuilding (the old cache stays in place until the new one is complete)")
        failures = _missing(table, files, image_dir, skip) + (_known_failures(old, table, files) if skip and not force
                                                               else [])
        failed = {f["line"] for f in failures}
        need = np.array([i for i in range(len(files)) if i not in failed], dtype=np.int64)
        stores = [] if force else _stores(out, pixels)
        src_store, src_row = _pixel_sources(stores, files, need)
        own = stores[0] if stores and stores[0].path == out else None
        if own is not None and len(need) and (src_store[need] == 0).all():
            return _relink(out, table, files, need, src_row, own.sources, failures, pixels, inputs_key, image_dir,
                           workers, t0)
        return _full_build(out, table, files, need, stores, src_store, src_row, failures, pixels, inputs_key,
                           image_dir, workers, skip, force, t0)


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _read_manifest(out: Path) -> dict | None:
    try:
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        return m if m.get("version") == CACHE_VERSION else None
    except (OSError, json.JSONDecodeError, AttributeError):
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


def _up_to_date(out: Path, m: dict) -> dict:
    for name in _BUILD_FILES:  # left when a build was killed just after its rename
        (out / name).unlink(missing_ok=True)
    os.utime(out / "manifest.json")  # newer than its prerequisites: Make settles
    print(f"cache up to date: {out} ({m['counts']['images']} {m['kind']} images, built "
          f"{m.get('created', '?')}); reusing it")
    return m


# ---- image files ------------------------------------------------------------------------------------


@dataclass
class _Files:
    """The source file of each table line: path ("" when not found), bytes and mtime_ns (-1), and
    its content key as an integer (0 = not known yet; cxrlt/core/hashing.py's 16 hex digits)."""

    ids: np.ndarray
    paths: list[str]
    size: np.ndarray
    mtime_ns: np.ndarray
    keys: np.ndarray | None = None

    def __post_init__(self):
        if self.keys is None:
            self.keys = np.zeros(len(self.ids), dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.ids)


def _locate(table: _Table, image_dir) -> _Files:
    ids = table.index["ImageID"].to_numpy(dtype=object)
    _check_safe_ids(table, image_dir)
    paths = _resolve_paths(image_dir, ids)
    size = np.full(len(ids), -1, dtype=np.int64)
    mtime = np.full(len(ids), -1, dtype=np.int64)
    for i, p in enumerate(paths):
        if p is not None:
            try:
                st = os.stat(p)
                size[i], mtime[i] = st.st_size, st.st_mtime_ns
            except OSError:
                paths[i] = None
    return _Files(ids, [p or "" for p in paths], size, mtime)


def _check_safe_ids(table: _Table, image_dir) -> None:
    """ImageIDs name files inside image_dir: refuse a line break (a quoted CSV cell), an
    absolute path or a `..` component, which would read a file from anywhere."""
    ids = table.index["ImageID"]
    slashed = ids.str.replace("\\", "/", regex=False)
    suspect = (ids.str.contains(r"[\x00-\x1f\x7f]", regex=True) | slashed.str.startswith("/")
               | slashed.str.contains(r"(?:^|/)\.\.(?:/|$)", regex=True) | ids.str.match(r"[A-Za-z]:"))
    for i in np.flatnonzero(suspect.to_numpy()):  # a vectorised screen, then the reason for the few
        iid = ids.iloc[i]
        why = _unsafe(iid)
        if why:
            raise InputError(f"{table.csv_file[i]}: row {table.csv_row[i]}, column 'ImageID': {iid!r} {why}; an "
                             f"ImageID names a file inside the image folder {image_dir}")


def _unsafe(iid: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in iid):
        return "holds a control character (a line break inside a quoted cell?)"
    parts = iid.replace("\\", "/").split("/")
    if os.path.isabs(iid) or parts[0] == "" or (len(parts[0]) == 2 and parts[0][1] == ":"):
        return "is an absolute path"
    if ".." in parts:
        return "leads out of the image folder ('..')"
    return ""


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


def find_images(image_dir, image_ids) -> list[str | None]:
    """Where the images of `image_ids` are under image_dir (None: not found), by the rule the
    cache builder follows (top folder first, then subfolders such as NIH's images_001/images/)."""
    return _resolve_paths(image_dir, list(image_ids))


def _walk_names(image_dir: str, wanted: set[str]) -> dict[str, str]:
    """name -> its path in a subfolder of image_dir. Symlinked subfolders are followed (each real
    folder once, so a link loop ends); a name found in two subfolders is refused naming both,
    unless the two files are byte-identical copies (which one is read then does not matter)."""
    import filecmp

    found: dict[str, str] = {}
    seen = {os.path.realpath(image_dir)}
    for root, dirs, files in os.walk(image_dir, followlinks=True):
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if real not in seen:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        if root == image_dir:
            continue
        for name in wanted.intersection(files):
            path = os.path.join(root, name)
            first = found.setdefault(name, path)
            if first != path and not filecmp.cmp(first, path, shallow=False):
                raise InputError(f"{image_dir}: two different files are named '{name}': {first} and {path}; "
                                 f"an ImageID must name one image (remove or rename one of them)")
    return found


def _missing(table: _Table, files: _Files, image_dir, skip: bool) -> list[dict]:
    missing = [i for i, p in enumerate(files.paths) if not p]
    if not missing:
        return []
    if len(missing) == len(files):
        raise InputError(f"{image_dir}: none of the {len(files)} images was found (e.g. '{files.ids[0]}' from "
                         f"{table.csv_file[0]} row {table.csv_row[0]}); is --image-dir right?")
    failures = [_failure(table, i, os.path.join(image_dir, files.ids[i]), "image file not found") for i in missing]
    if not skip:
        listed = "; ".join(_describe_failure(f) for f in failures[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        raise InputError(f"{len(failures)} image file(s) not found in {image_dir}: {listed}{more}. "
                         + _fix_hint(table.kind, "them"))
    return failures


def _known_failures(old: dict | None, table: _Table, files: _Files) -> list[dict]:
    """Images that failed in the last build and whose file has not changed since: with
    --skip-bad they are left out again without another try."""
    if old is None:
        return []
    line_of = {iid: i for i, iid in enumerate(files.ids)}
    out = []
    for f in old.get("failures", []):
        i = line_of.get(f["ImageID"])
        if i is not None and files.paths[i] and (files.size[i], files.mtime_ns[i]) == (f.get("bytes"), f.get("mtime_ns")):
            out.append(_failure(table, i, files.paths[i], f["reason"], files))
    return out


def _failure(table: _Table, line: int, path, reason: str, files: _Files | None = None) -> dict:
    f = {"line": int(line), "ImageID": table.index["ImageID"].iloc[line], "file": os.fspath(path), "reason": reason,
         "csv": table.csv_file[line], "csv_row": int(table.csv_row[line])}
    if files is not None and files.paths[line]:
        f.update(bytes=int(files.size[line]), mtime_ns=int(files.mtime_ns[line]))
    return f


def _describe_failure(f: dict) -> str:
    return f"{f['file']}: {f['reason']} (ImageID '{f['ImageID']}', row {f['csv_row']} of {f['csv']})"


def _fix_hint(kind: str, what: str) -> str:
    if kind == "test":
        return (f"Fix or replace {what}: a test image cannot be left out (every one needs a prediction), "
                f"so --skip-bad does not apply")
    return f"Fix --image-dir or the files, or re-run with --skip-bad to leave {what} out"


# ---- fingerprints -----------------------------------------------------------------------------------


def _index_text(index: pd.DataFrame) -> str:
    return index.to_csv(index=False, lineterminator="\n")


def _inputs_key(table: _Table, files: _Files, pixels: dict) -> str:
    """Everything a finished cache depends on, read before any decoding: its rows with their
    labels, folds and keys, and each image file's bytes and mtime_ns (a changed file is
    decoded again), size and windowing."""
    h = hashlib.sha256(_index_text(table.index).encode())
    h.update(json.dumps([table.labels, files.size.tolist(), files.mtime_ns.tolist()]).encode())
    policy = table.info.get("label_policy")  # external datasets: how uncertain / blank cells were read
    return json_key({"pixels": pixels, "table": h.hexdigest(), **({"label_policy": policy} if policy else {})})


def _content_key(index: pd.DataFrame, labels: list[str], size_of_line: np.ndarray, pixels: dict,
                 failures: list[dict], policy: dict | None = None) -> str:
    """Cache.key: the rows (with labels, folds and keys), the size of each image's source file,
    size, windowing and the images left out. No paths or times: the same inputs give the same
    key on every machine."""
    h = hashlib.sha256(_index_text(index.drop(columns="row")).encode())
    h.update(json.dumps([labels, size_of_line.tolist(), sorted(f["ImageID"] for f in failures)]).encode())
    extra = {"label_policy": policy} if policy else {}
    return json_key({"pixels": pixels, "content": h.hexdigest(), **extra})


# ---- reusing pixels ---------------------------------------------------------------------------------


@dataclass
class _Store:
    """A finished cache of the root whose pixels can be reused: its array (opened) and sources."""

    path: Path
    images: np.ndarray  # read-only memmap
    sources: pd.DataFrame  # row, ImageID, bytes, mtime_ns, key (uint64; 0 = unknown)


def _stores(out: Path, pixels: dict) -> list[_Store]:
    """`out` itself first, then its siblings (name order) with the same pixels parameters."""
    root = out.parent
    siblings = sorted(d for d in root.iterdir() if d.is_dir() and d != out) if root.is_dir() else []
    found = []
    for d in [out, *siblings]:
        if d.name.endswith(".partial") or ".old-" in d.name:
            continue
        store = _open_store(d, pixels)
        if store is not None:
            found.append(store)
    return found


def _open_store(d: Path, pixels: dict) -> _Store | None:
    """A cache's array and sources.csv, or None when it is not a usable cache. The array file
    must be the same before and after sources.csv is read: a cache being replaced at that
    moment by another build is skipped rather than mixed with its successor."""
    m = _read_manifest(d)
    if m is None or m.get("pixels") != pixels:
        return None
    try:
        before = os.stat(d / "images.npy").st_ino
        sources = pd.read_csv(d / "sources.csv", dtype={"row": np.int64, "ImageID": str, "file": str,
                                                         "bytes": np.int64, "mtime_ns": np.int64, "key": str},
                              keep_default_na=False)
        sources["key"] = _keys_from_hex(sources["key"])
        images = np.load(d / "images.npy", mmap_mode="r")
        if os.stat(d / "images.npy").st_ino != before:
            return None
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    if sources.empty:
        return None
    return _Store(d, images, sources[["row", "ImageID", "bytes", "mtime_ns", "key"]])


def _keys_from_hex(col) -> np.ndarray:
    return np.array([int(k, 16) if k else 0 for k in col], dtype=np.uint64)


def _keys_to_hex(keys: np.ndarray) -> list[str]:
    return [f"{int(k):016x}" if k else "" for k in keys]


def _pixel_sources(stores: list[_Store], files: _Files, need: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (store number per line, -1 = decode; its row in that store's array). A line matches a
    store's row by ImageID, bytes and mtime_ns; failing that, by ImageID, bytes and content key,
    for which the lines whose ImageID and size some store knows are hashed (a moved or copied
    folder: read once, never decoded). Sets files.keys where known."""
    src_store = np.full(len(files), -1, dtype=np.int64)
    src_row = np.full(len(files), -1, dtype=np.int64)

    def match(on: list[str], lines: np.ndarray) -> None:
        for k, store in enumerate(stores):
            open_lines = lines[src_store[lines] < 0]
            if not len(open_lines):
                return
            want = pd.DataFrame({"line": open_lines, "ImageID": files.ids[open_lines],
                                 "bytes": files.size[open_lines], "mtime_ns": files.mtime_ns[open_lines],
                                 "key": files.keys[open_lines]})
            known = store.sources[store.sources["key"] > 0] if "key" in on else store.sources
            hit = want[["line", *on]].merge(known, on=on)  # the store's key comes along
            hit = hit[hit["row"] < len(store.images)]
            lines_hit = hit["line"].to_numpy()
            src_store[lines_hit] = k
            src_row[lines_hit] = hit["row"].to_numpy()
            files.keys[lines_hit] = hit["key"].to_numpy(dtype=np.uint64)

    match(["ImageID", "bytes", "mtime_ns"], need)
    left = need[src_store[need] < 0]
    if len(left) and stores:
        same_size = pd.concat([st.sources[st.sources["key"] > 0][["ImageID", "bytes"]] for st in stores])
        probe = pd.DataFrame({"line": left, "ImageID": files.ids[left], "bytes": files.size[left]})
        to_hash = np.unique(probe.merge(same_size, on=["ImageID", "bytes"])["line"].to_numpy())
        for i in progress.bar(to_hash, unit="img", desc="hash moved files", disable=len(to_hash) < 100):
            try:
                files.keys[i] = int(file_digest(files.paths[i]), 16)  # = the worker's bytes_key
            except OSError:
                pass  # unreadable now: decoding reports it
        match(["ImageID", "bytes", "key"], to_hash)
    return src_store, src_row


def _copy_pixels(partial: Path, done: np.ndarray, keys: np.ndarray, stores: list[_Store], src_store, src_row) -> int:
    """Copy every not-done line that has a source in another cache -> lines copied."""
    lines = np.flatnonzero((src_store >= 0) & (done == 0))
    if not len(lines):
        return 0
    images = np.load(partial / "images.npy", mmap_mode="r+")
    with progress.bar(total=len(lines), unit="img", desc="reuse") as bar:
        for k, store in enumerate(stores):
            mine = lines[src_store[lines] == k]
            mine = mine[np.argsort(src_row[mine], kind="stable")]  # read the source in order
            for b in range(0, len(mine), COPY_BLOCK):
                block = mine[b:b + COPY_BLOCK]
                images[block] = store.images[src_row[block]]
                done[block] = 1
                bar.update(len(block))
    del images
    _save_done(partial, done, keys)
    return len(lines)


# ---- the partial folder -----------------------------------------------------------------------------


def _full_build(out: Path, table: _Table, files: _Files, need, stores, src_store, src_row, failures, pixels,
                inputs_key, image_dir, workers, skip, force, t0) -> dict:
    """A new array with one row per table line: pixels copied from other caches where they
    exist, the rest decoded."""
    partial = partial_dir(out)
    plan_key = json_key({"pixels": pixels, "files": hashlib.sha256(
        json.dumps([files.ids.tolist(), files.size.tolist(), files.mtime_ns.tolist()]).encode()).hexdigest()})
    done = _open_partial(partial, len(files), pixels["size"], plan_key, fresh=force, keys=files.keys)
    resumed = int(done.sum())
    if resumed:
        print(f"resuming {partial}: {resumed} of {len(done)} images already done")
    copied = _copy_pixels(partial, done, files.keys, stores, src_store, src_row)
    is_failed = np.zeros(len(files), dtype=bool)
    is_failed[[f["line"] for f in failures]] = True
    tasks = [(int(i), files.paths[i]) for i in need if not done[i] and not is_failed[i]]
    failures = failures + _decode_all(partial, tasks, done, table, files, pixels, workers, skip)
    failures.sort(key=lambda f: f["line"])  # workers finish in any order
    kept = np.flatnonzero(done == 1)
    sources = _sources(files, kept, kept, image_dir)
    rows = np.arange(len(files), dtype=np.int64)
    return _finalize(out, partial, table, files, rows, sources, failures, pixels, inputs_key, image_dir, t0, {
        "workers": workers, "decoded_this_run": len(tasks), "copied_rows": copied, "resumed_rows": resumed,
        "linked": False})


def _sources(files: _Files, lines: np.ndarray, rows: np.ndarray, image_dir) -> pd.DataFrame:
    """sources.csv's rows: where each array row's pixels came from (file relative to the image
    folder: a moved folder keeps the meaning)."""
    return pd.DataFrame({"row": rows, "ImageID": files.ids[lines],
                         "file": [os.path.relpath(files.paths[i], image_dir) for i in lines],
                         "bytes": files.size[lines], "mtime_ns": files.mtime_ns[lines],
                         "key": _keys_to_hex(files.keys[lines])})


def _open_partial(partial: Path, n: int, size: int, plan_key: str, fresh: bool, keys: np.ndarray) -> np.ndarray:
    """Reuse a matching partial build (-> its done mask; the content keys it knows go into
    `keys`) or set up a new one (-> zeros)."""
    plan_path = partial / "plan.json"
    if partial.exists() and not fresh:
        try:
            old = json.loads(plan_path.read_text(encoding="utf-8"))
            done = np.load(partial / "done.npy")
            images = np.load(partial / "images.npy", mmap_mode="r")
            if old.get("plan_key") == plan_key and done.shape == (n,) and images.shape == (n, size, size):
                known = np.load(partial / "keys.npy")
                if known.shape == (n,):
                    keys[known > 0] = known[known > 0]
                return done.astype(np.uint8)
            print(f"{partial}: left by a build with other inputs; starting over")
        except (OSError, ValueError, json.JSONDecodeError):
            print(f"{partial}: incomplete set-up from an earlier run; starting over")
    _fresh_dir(partial)
    _allocate(partial / "images.npy", n, size)
    done = np.zeros(n, dtype=np.uint8)
    _save_done(partial, done, keys)
    with _disk_guard(plan_path, 256):  # plan.json last: its presence means the folder is completely set up
        write_json(plan_path, {"plan_key": plan_key, "rows": n, "size": int(size)})
    return done


def _fresh_dir(d: Path) -> None:
    if d.exists():
        _check_replaceable(d)
        shutil.rmtree(d)
    d.mkdir(parents=True)


def _allocate(path: Path, n: int, size: int) -> None:
    """Create the (n, size, size) uint8 array file with all its disk blocks allocated: a full
    disk is reported now, with the sizes, instead of killing a process that writes into a
    sparse memory-mapped file later (SIGBUS)."""
    need = n * size * size + 128
    if shutil.disk_usage(path.parent).free < need:  # also where the filesystem cannot reserve blocks
        raise InputError(_no_space_message(path, need))
    with _disk_guard(path, need):
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size)).flush()
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in _NO_SPACE:
            os.close(fd)
            fd = -1
            path.unlink()
            raise InputError(_no_space_message(path, need)) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise  # EOPNOTSUPP & co: the filesystem cannot reserve blocks; the writes still work
    finally:
        if fd >= 0:
            os.close(fd)


def _save_done(partial: Path, done: np.ndarray, keys: np.ndarray) -> None:
    """Persist the done mask (and the content keys of the rows) atomically; fsync images.npy
    first so that every row marked done is on disk (workers write through shared mappings, i.e.
    the same page cache)."""
    fd = os.open(partial / "images.npy", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for name, arr in (("keys.npy", keys), ("done.npy", done)):  # done last: it vouches for the keys
        tmp = partial / f".{name}.tmp"
        with _disk_guard(partial / name, arr.nbytes + 128):
            with open(tmp, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, partial / name)


@contextlib.contextmanager
def _disk_guard(path: Path, need: int):
    """A full disk while writing `path` -> one InputError line with the sizes."""
    try:
        yield
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise InputError(_no_space_message(path, need)) from None
        raise


def _no_space_message(path: Path, need: int) -> str:
    where = Path(path).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    return (f"{path}: no space left on the device: {_human_bytes(need)} needed, {_human_bytes(free)} free; "
            f"free some space, or use a smaller --size or another --out")


def _human_bytes(n: float) -> str:
    """3 significant digits and a unit: never rounds a small amount down to "0.0 GB"."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if n < 999.5 or unit == "PB":
            return f"{n:.3g} {unit}"
    raise AssertionError("unreachable")


# ---- decoding -----------------------------------------------------------------------------------------


def _decode_all(partial: Path, tasks, done, table: _Table, files: _Files, pixels: dict, workers: int,
                skip: bool) -> list[dict]:
    """Decode every (row, path) task into partial/images.npy, marking `done` and persisting it
    every FLUSH_SECONDS and at the end (also on errors and Ctrl-C). -> failures (skip only:
    otherwise the first one stops the build)."""
    failures: list[dict] = []
    if not tasks:
        return failures
    last_flush = time.time()
    pool = DecodePool(partial / "images.npy", pixels, tasks, workers)
    stream = pool.results()
    finished = False
    with progress.bar(total=len(tasks), unit="img", desc="preprocess") as bar:
        try:
            for row, reason, key in stream:
                if key:
                    files.keys[row] = int(key, 16)
                if reason is None:
                    done[row] = 1
                else:
                    failures.append(_failure(table, row, files.paths[row], reason, files))
                bar.update(1)
                if failures and not skip:
                    break
                if time.time() - last_flush >= FLUSH_SECONDS:
                    _save_done(partial, done, files.keys)
                    last_flush = time.time()
            finished = True
        finally:
            stream.close()
            pool.stop()
            try:
                _save_done(partial, done, files.keys)
            except (OSError, InputError):
                if finished:
                    raise
                # an error is already on its way out: that one is reported, not this one
    if failures and not skip:
        hint = _fix_hint(table.kind, "such images").replace("Fix --image-dir or the files", "Fix or remove the file")
        raise InputError(f"{_describe_failure(failures[0])}. {hint}; the {int(done.sum())} images done so far "
                         f"are kept for the re-run")
    return failures


# ---- finishing --------------------------------------------------------------------------------------


def _relink(out: Path, table: _Table, files: _Files, need, src_row, old_sources: pd.DataFrame, failures, pixels,
            inputs_key, image_dir, workers, t0) -> dict:
    """Every image is already in out's own array: a new index into the same images.npy,
    hard-linked into a fresh folder that replaces `out` like any build. sources.csv keeps every
    array row; the rows the new index uses name their current files (times, folder)."""
    partial = partial_dir(out)
    _fresh_dir(partial)
    try:
        os.link(out / "images.npy", partial / "images.npy")
    except OSError:  # a filesystem without hard links: a copy, same content
        with _disk_guard(partial / "images.npy", (out / "images.npy").stat().st_size):
            shutil.copyfile(out / "images.npy", partial / "images.npy")
    current = _sources(files, need, src_row[need], image_dir).drop_duplicates("row", keep="first")
    kept = old_sources[~old_sources["row"].isin(current["row"])].assign(key=lambda d: _keys_to_hex(d["key"]),
                                                                         file="")
    sources = pd.concat([current, kept[current.columns]]).sort_values("row", kind="stable")
    print(f"{out}: every image is already in the cache; only its index changes (nothing decoded or copied)")
    return _finalize(out, partial, table, files, src_row, sources, failures, pixels, inputs_key, image_dir, t0, {
        "workers": workers, "decoded_this_run": 0, "copied_rows": 0, "resumed_rows": 0, "linked": True})


def _finalize(out: Path, partial: Path, table: _Table, files: _Files, rows: np.ndarray, sources, failures,
              pixels: dict, inputs_key: str, image_dir, t0: float, work: dict) -> dict:
    """Write index.csv, labels.txt, sources.csv, manifest.json (last) into the
    partial folder, then rename it to `out` (replacing an old cache only now)."""
    keep = np.ones(len(files), dtype=bool)
    keep[[f["line"] for f in failures]] = False
    index = table.index[keep].copy()
    index.insert(0, "row", rows[keep])
    _write(partial / "index.csv", _index_text(index))
    _write(partial / "labels.txt", "".join(f"{lab}\n" for lab in table.labels))
    _write(partial / "sources.csv", sources.to_csv(index=False, lineterminator="\n"))
    manifest = {
        "format": "cxrlt image cache", "version": CACHE_VERSION, "kind": table.kind,
        "key": _content_key(index, table.labels, files.size[keep], pixels, failures,
                            table.info.get("label_policy")),
        "inputs_key": inputs_key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pixels": pixels, "labels": table.labels, "array_rows": int(np.load(partial / "images.npy",
                                                                            mmap_mode="r").shape[0]),
        "counts": _counts(table, index, failures),
        "failures": [{k: v for k, v in f.items() if k != "line"} for f in failures],
        "windowing": "16-bit: percentile window (low_pct, high_pct) of a subsample (every stride-th pixel), "
                     "linear to 0..255; 8-bit: unchanged",
        "resize": "squash to size x size (aspect ratio not kept), area averaging",
        "sources": _describe_sources(table.sources), "image_dir": os.fspath(image_dir), **table.info,
        **work, "elapsed_s": round(time.time() - t0, 3),
    }
    _write(partial / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    for p in partial.iterdir():  # temp files of an attempt killed mid-write must not move into the cache
        if p.name.startswith(".") and ".tmp" in p.name:
            p.unlink(missing_ok=True)
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(partial, out)
    for name in _BUILD_FILES:
        (out / name).unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _print_summary(out, manifest)
    return manifest


def _write(path: Path, text: str) -> None:
    with _disk_guard(path, len(text.encode())):
        write_text(path, text)


def _counts(table: _Table, index: pd.DataFrame, failures: list[dict]) -> dict:
    counts = {"images": int(len(index)), "failed": len(failures)}
    if table.kind == "train":
        counts.update(removed=table.info["removed"],
                      positives={lab: int(index[lab].sum()) for lab in table.labels},
                      **({"annotated": {lab: int(index[lab].notna().sum()) for lab in table.labels}}
                         if any(index[lab].isna().any() for lab in table.labels) else {}),
                      fold_sizes=np.bincount(index["fold"].to_numpy(), minlength=table.info["folds"]).tolist())
    return counts


def _describe_sources(sources: dict) -> dict:
    """Path, size and sha256 of each CSV the cache was built from (None: not given)."""
    out = {}
    for name, path in sources.items():
        if path is None:
            out[name] = None
            continue
        out[name] = {"path": os.fspath(path), "bytes": os.path.getsize(path),
                     "key": file_key(path)}
    return out


def _print_summary(out: Path, m: dict) -> None:
    c = m["counts"]
    removed = f"; {c['removed']} removed by the removal list" if "removed" in c else ""
    procs = f"{m['workers']} process{'es' if m['workers'] > 1 else ''}"
    work = (f"{m['decoded_this_run']} decoded ({procs}), {m['copied_rows']} copied from this root's caches, "
            f"{m['resumed_rows']} kept from an interrupted build" if not m["linked"]
            else "nothing decoded: a new index into the same array")
    print(f"cache written: {out} ({c['images']} {m['kind']} images{removed}; {c['failed']} failed) in "
          f"{m['elapsed_s']:.1f} s; {work}")
    if m["failures"]:
        print(f"warning: {len(m['failures'])} image(s) could not be used and were left out "
              f"(all listed in {out / 'manifest.json'}):", file=sys.stderr)
        for f in m["failures"][:_MAX_REPORTED]:
            print(f"  {_describe_failure(f)}", file=sys.stderr)
        if len(m["failures"]) > _MAX_REPORTED:
            print(f"  ... and {len(m['failures']) - _MAX_REPORTED} more", file=sys.stderr)
