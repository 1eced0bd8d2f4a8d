"""What the bench scripts share: the repository on sys.path, the --json result file, CPU-time
and thread helpers, and synthetic data (nothing here measures anything by itself).

Synthetic data (no real images needed, deterministic for a seed):
  write_synthetic_cache(out, n_train, size, n_val, n_test)  a complete cache folder that
      cxrlt.data.cache.open_cache accepts, written without decoding anything (layout below)
  synthetic_xray(rng, h, w)       a 16-bit chest-film-like image: smooth low-frequency structure,
      rib-like stripes and sensor noise, 12 bits used (so PNG compression is realistic)
  write_xray_pngs(folder, n, h, w)  n such images as img0000.png ... (files already there are
      kept: a folder passed as --keep is written once and reused)

Result file: every script takes `--json OUT` (add_json_flag) and writes its numbers there with
write_result (one JSON object, indented); bench/run_all.py reads them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ---- command line and results ---------------------------------------------------------------------

def add_json_flag(parser) -> None:
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")


def write_result(path, result: dict) -> None:
    """The numbers as one indented JSON object (nothing when path is None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


# ---- CPU time and threads ------------------------------------------------------------------------

def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished (waited-for) children, e.g. joined loader workers."""
    t = os.times()
    return t.children_user + t.children_system


def pids_cpu_seconds(pids) -> float:
    """CPU seconds (user + system) of running processes by pid, from /proc (0 for a pid that is gone):
    live loader workers, which persistent_workers keeps from epoch to epoch (never waited for)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)
    return total


def loader_worker_pids(loader) -> list[int]:
    """The pids of a DataLoader's live worker processes (none before its first iteration)."""
    it = getattr(loader, "_iterator", None) if loader is not None else None
    return [w.pid for w in getattr(it, "_workers", [])] if it is not None else []


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def set_torch_threads(threads: int) -> int:
    """torch intra-op threads (0 = leave torch's default) -> the number in use. 1 is the bench
    default on a CPU: on a shared 2-core machine two OpenMP threads stall each other whenever
    another process takes a core, and 1 compute thread + 1 loader worker fits 2 cores."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---- synthetic images ----------------------------------------------------------------------------

def synthetic_xray(rng: np.random.Generator, h: int = 2500, w: int = 2000) -> np.ndarray:
    """uint16 (h, w): smooth low-frequency structure + rib-like stripes + sensor noise, 12 bits."""
    import cv2

    base = cv2.resize(rng.random((max(2, h // 100), max(2, w // 100))).astype(np.float32), (w, h),
                      interpolation=cv2.INTER_CUBIC)
    yy = np.arange(h, dtype=np.float32)[:, None]
    stripes = 0.15 * np.sin(yy / rng.uniform(25, 45) + rng.uniform(0, 6))
    img = base + stripes + rng.normal(0, 0.02, (h, w)).astype(np.float32)
    img -= img.min()
    return (img / img.max() * 4095).astype(np.uint16)


def write_xray_pngs(folder, n: int, h: int = 2500, w: int = 2000, seed: int = 0) -> list[Path]:
    """n synthetic 16-bit PNGs folder/img0000.png ... (existing files are kept) -> their paths."""
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i:04d}.png"
        if not p.exists():
            cv2.imwrite(str(p), synthetic_xray(rng, h, w))
        paths.append(p)
    return paths


# ---- synthetic cache -----------------------------------------------------------------------------

def write_synthetic_cache(out, n_train: int, size: int, n_val: int = 0, n_test: int = 0, num_labels: int = 30,
                          seed: int = 0, chunk: int = 512) -> Path:
    """Write a complete cache folder that cxrlt.data.cache.open_cache accepts, without any decoding.

    Files (the layout of cxrlt/data/cache.py):
      images.npy     uint8 (n_train + n_val + n_test, size, size), written through a memmap in
                     chunks (so 20,000 x 256 px never sits in memory): a smooth chest-like blob
                     plus per-image noise (no all-zero pages, which the OS could share)
      index.csv      row, ImageID, StudyDate_DICOM, PatientID, study, patient, projection, centre, split,
                     fold, one 0/1 column per label (one image per study and patient, PA).
                     Rows 0..n_val-1: train split, fold 0 (the default val_fold); then n_train train
                     rows in folds 1..4; then n_test test rows (fold -1, labels empty)
      labels.txt     the first `num_labels` CXR-LT 2026 labels
      manifest.json  labels, pixels (size), counts, a key, "synthetic": true (written last)
    Label prevalences fall off geometrically (a long tail); every label has a positive among
    the training rows and among the val rows (when there are any).
    """
    import pandas as pd

    from cxrlt.data.cache import CACHE_VERSION
    from cxrlt.core.fileio import write_csv, write_json, write_text
    from cxrlt.core.labels import CXRLT2026_LABELS
    from cxrlt.data.tables import INDEX_FIXED_COLUMNS

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = CXRLT2026_LABELS[:num_labels]
    n = n_val + n_train + n_test
    _write_images(out / "images.npy", n, size, rng, chunk)

    split = ["train"] * (n_val + n_train) + ["test"] * n_test
    fold = [0] * n_val + [1 + i % 4 for i in range(n_train)] + [-1] * n_test
    ids, patients = [f"syn{i:07d}.png" for i in range(n)], [f"P{i:07d}" for i in range(n)]
    index = pd.DataFrame({"row": np.arange(n), "ImageID": ids, "StudyDate_DICOM": "20200101", "PatientID": patients,
                          "study": ids, "patient": patients, "projection": "PA", "centre": "unknown", "split": split,
                          "fold": fold})
    y = _long_tail_labels(rng, n_val, n_train, len(labels))
    for j, lab in enumerate(labels):
        col = pd.array(np.concatenate([y[:, j], np.zeros(n_test, np.int8)]), dtype="Int8")
        col[n_val + n_train:] = pd.NA  # test rows have no labels
        index[lab] = col
    assert list(index.columns[:len(INDEX_FIXED_COLUMNS)]) == INDEX_FIXED_COLUMNS
    write_csv(out / "index.csv", index)
    write_text(out / "labels.txt", "".join(f"{lab}\n" for lab in labels))
    write_json(out / "manifest.json", {
        "format": "cxrlt image cache", "version": CACHE_VERSION, "kind": "synthetic", "synthetic": True,
        "key": f"synthetic-{seed}-{n_val}-{n_train}-{n_test}-{size}", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "array_rows": n, "dtype": "uint8", "pixels": {"size": int(size)}, "labels": labels,
        "counts": {"train": n_val + n_train, "test": n_test, "val_fold0": n_val}})
    return out


def _write_images(path: Path, n: int, size: int, rng: np.random.Generator, chunk: int) -> None:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    blob = (180 * np.exp(-(xx**2 / 0.08 + yy**2 / 0.12))).astype(np.uint8)  # 0..180, + noise < 256
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size))
    for i in range(0, n, chunk):
        k = min(chunk, n - i)
        arr[i:i + k] = blob + rng.integers(0, 64, size=(k, size, size), dtype=np.uint8)
    arr.flush()
    del arr


def _long_tail_labels(rng: np.random.Generator, n_val: int, n_train: int, c: int) -> np.ndarray:
    prevalence = np.maximum(0.3 * 0.8 ** np.arange(c), 0.005)
    y = (rng.random((n_val + n_train, c)) < prevalence).astype(np.int8)
    for lo, hi in ((0, n_val), (n_val, n_val + n_train)):
        if hi > lo:  # at least one positive per label in each part
            y[lo + rng.integers(0, hi - lo, size=c), np.arange(c)] = 1
    return y
