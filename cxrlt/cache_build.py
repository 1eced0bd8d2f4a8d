"""The image cache BUILDER (preprocess.py): decode every image once into a cache folder.

The layout of a finished cache is documented in cxrlt/cache.py (the reader). Building:

Images that fail to decode stop the build with an error naming the ImageID, CSV row and file,
unless skip_bad: then they are left out of index.csv and listed in the manifest (their array
row stays zero-filled).

Building is resumable and atomic. Work happens in `<out_dir>.partial/`:
  images.npy (the memmap being filled, its disk blocks allocated up front so that a full disk
  is reported before any work and never hits a worker mid-write), done.npy (uint8 (N,),
  1 = row written; rewritten atomically every FLUSH_SECONDS after an fsync of images.npy, so a
  row marked done is on disk), plan.json (written last when the folder is set up: the row
  order and a key of the inputs that determine the pixels). A re-run with the same key skips
  rows already done; otherwise it starts over. When every row is done, index.csv, labels.txt
  and manifest.json are written and the folder is renamed to `out_dir` (an old cache there is
  replaced only then).
A finished cache whose fingerprint (CSV contents, labels file, image_dir, size, windowing,
folds, seed) matches is reused as is. Image files are assumed not to change in place: use
force=True (preprocess.py --force) to rebuild after editing images.

Decoding runs in `workers` processes: this one and workers - 1 worker processes
(cxrlt/_decode.py, started with a plain interpreter so that they import nothing heavy). Tasks
are handed out one image at a time, a few ahead per worker, so every process stays busy until
the last image whatever the images' sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import _decode
from .cache import CACHE_VERSION, INDEX_FIXED_COLUMNS, partial_dir
from .csvio import read_id_list, read_training_csv
from .errors import InputError
from .fileio import write_csv, write_json, write_text
from .splits import assign_folds

WINDOW_STRIDE = _decode.WINDOW_STRIDE
FLUSH_SECONDS = 10.0  # how often the done mask is persisted (work lost on a kill: at most this)
_OWN_FILES = {"images.npy", "index.csv", "labels.txt", "manifest.json", "done.npy", "plan.json"}
_MAX_REPORTED = 20  # failures printed in the --skip-bad report (all are in the manifest)


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
    partial = partial_dir(out)
    image_key = _image_key(plan, image_dir, size, low, high)
    done = _open_partial(partial, plan, size, image_key, fresh=force)
    todo = np.flatnonzero(done == 0)
    paths = _resolve_paths(image_dir, plan.table["ImageID"].to_numpy()[todo])
    failures = _missing_failures(plan, todo, paths, image_dir, skip_bad)
    tasks = [(int(r), p) for r, p in zip(todo, paths) if p is not None]
    reused = int(done.sum())
    if reused:
        print(f"resuming {partial}: {reused} of {len(done)} images already done")

    failures += _decode_all(partial, tasks, done, plan, size, low, high, workers, skip_bad)
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
    train, labels = read_training_csv(train_csv, labels_file=labels_file)
    clash = [lab for lab in labels if lab in INDEX_FIXED_COLUMNS]
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

AHEAD = 3  # tasks queued per worker process: it never waits for the next one, a stop waits for few


def _decode_all(partial: Path, tasks, done, plan: _Plan, size, low, high, workers, skip_bad) -> list[dict]:
    """Decode every (row, path) task into partial/images.npy, marking `done` and persisting it
    every FLUSH_SECONDS and at the end (also on errors and Ctrl-C). -> failures."""
    failures: list[dict] = []
    if not tasks:
        return failures
    path_of = dict(tasks)
    last_flush = time.time()
    pool = _DecodePool(partial / "images.npy", size, low, high, tasks, workers)
    stream = pool.results()
    finished = False
    with tqdm(total=len(tasks), unit="img", desc="preprocess", dynamic_ncols=True) as bar:
        try:
            for row, reason in stream:
                if reason is None:
                    done[row] = 1
                else:
                    failures.append(_failure(plan, row, path_of[row], reason))
                bar.update(1)
                if failures and not skip_bad:
                    break
                if time.time() - last_flush >= FLUSH_SECONDS:
                    _save_done(partial, done)
                    last_flush = time.time()
            finished = True
        finally:
            stream.close()
            pool.stop()
            if finished:
                _save_done(partial, done)
            else:  # an error is on its way out: saving progress must not replace it with another
                try:
                    _save_done(partial, done)
                except OSError:
                    pass
    if failures and not skip_bad:
        f = failures[0]
        raise InputError(f"{_describe_failure(f)}. Fix or remove the file, or re-run with --skip-bad to "
                         f"leave such images out; the {int(done.sum())} images done so far are kept for the re-run")
    return failures


class _DecodePool:
    """This process plus `workers - 1` worker processes (cxrlt/_decode.py) decoding `tasks`.

    results() yields (row, None | reason) as images finish, in any order. This process takes
    the next task itself between looking after the workers, whose pipes always hold AHEAD
    tasks, so all `workers` processes decode until the tasks run out. A worker that dies
    (killed by the OS when out of memory) stops the build with the file it was decoding.
    """

    def __init__(self, images_path: Path, size: int, low: float, high: float, tasks, workers: int):
        self.params = {"images": os.fspath(images_path), "size": int(size), "low": float(low), "high": float(high)}
        self.tasks = tasks
        self.next = 0
        self.procs: list[subprocess.Popen] = []
        self.in_flight: dict[int, list[int]] = {}  # pid -> rows sent, not yet answered
        self.partial_line: dict[int, bytes] = {}
        n_workers = max(1, min(int(workers), len(tasks)))
        for _ in range(n_workers - 1):
            self._start_worker()

    def _start_worker(self) -> None:
        root = os.fspath(Path(__file__).resolve().parents[1])
        code = f"import sys; sys.path.insert(0, {root!r}); from cxrlt._decode import serve; serve()"
        # its own session: a Ctrl-C in the terminal reaches only this process, which stops the workers
        p = subprocess.Popen([sys.executable, "-c", code, json.dumps(self.params)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        self.procs.append(p)
        self.in_flight[p.pid] = []
        self.partial_line[p.pid] = b""
        self._feed(p)

    def _feed(self, p: subprocess.Popen) -> None:
        queue = self.in_flight[p.pid]
        lines = []
        while len(queue) < AHEAD and self.next < len(self.tasks):
            row, path = self.tasks[self.next]
            self.next += 1
            queue.append(row)
            lines.append(json.dumps([row, path]) + "\n")
        if lines:
            try:
                p.stdin.write("".join(lines).encode())
            except BrokenPipeError:
                pass  # it died: its pipe's end of file says so in _collect

    def results(self):
        images = None
        threads = _decode.cv2.getNumThreads()
        try:
            while self.next < len(self.tasks) or any(self.in_flight.values()):
                yield from self._collect(timeout=0)
                if self.next < len(self.tasks):
                    if images is None:
                        _decode.quiet_opencv()
                        images = np.load(self.params["images"], mmap_mode="r+")
                    row, path = self.tasks[self.next]
                    self.next += 1
                    yield row, _decode.decode_into(images, row, path, self.params["size"], self.params["low"],
                                                   self.params["high"])
                elif any(self.in_flight.values()):
                    yield from self._collect(timeout=None)
        finally:
            del images
            _decode.cv2.setNumThreads(threads)

    def _collect(self, timeout):
        """Answers that the workers have sent (waiting up to `timeout` s for one; None: forever)."""
        busy = {p.stdout.fileno(): p for p in self.procs if self.in_flight[p.pid]}
        if not busy:
            return
        ready, _, _ = select.select(list(busy), [], [], timeout)
        for fd in ready:
            p = busy[fd]
            data = os.read(fd, 1 << 16)
            if not data:
                self._died(p)
            *lines, self.partial_line[p.pid] = (self.partial_line[p.pid] + data).split(b"\n")
            for line in lines:
                row, reason = json.loads(line)
                self.in_flight[p.pid].remove(row)
                yield row, reason
            self._feed(p)

    def _died(self, p: subprocess.Popen) -> None:
        code = p.wait()
        row = self.in_flight[p.pid][0]
        path = next(t for r, t in self.tasks if r == row)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise InputError(f"a decode worker process {how} while decoding {path}; re-run to continue (finished "
                         f"images are kept), with fewer --workers if it ran out of memory")

    def stop(self) -> None:
        """End the workers: at once when tasks are left (their unreported rows are simply not
        marked done), else after they answered everything."""
        for p in self.procs:
            if self.next < len(self.tasks) or self.in_flight[p.pid]:
                p.kill()
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            p.wait()
            p.stdout.close()
        self.procs = []


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
    rate = f", {m['decoded_this_run']} images decoded with {m['workers']} workers" if m["decoded_this_run"] else ""
    print(f"cache written: {out} ({c['train']} train, {c['test']} test images; {c['removed']} removed by "
          f"the removal list; {c['failed']} failed) in {m['elapsed_s']:.1f} s{rate}")
    if m["failures"]:
        print(f"warning: {len(m['failures'])} image(s) could not be used and were left out "
              f"(all listed in {out / 'manifest.json'}):", file=sys.stderr)
        for f in m["failures"][:_MAX_REPORTED]:
            print(f"  {_describe_failure(f)}", file=sys.stderr)
        if len(m["failures"]) > _MAX_REPORTED:
            print(f"  ... and {len(m['failures']) - _MAX_REPORTED} more", file=sys.stderr)
