"""generate(): the whole dataset from its arguments, and the command line."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from cxrlt.core import progress as P

from cxrlt.core.errors import InputError
from cxrlt.core.labels import CXRLT2026_LABELS, read_labels_file
from cxrlt.data.tables import ID_COLUMNS
from cxrlt.synth.cohort import IdMaker, Study, make_cohort, make_nih_cohort, mark_removal, nih_folder
from cxrlt.synth.files import (FORMAT_VERSION, MARKER_NAME, load_existing, summary_of, swap_into_place,
                    write_csvs)
from cxrlt.synth.labelling import add_distractors, enforce_minimums, sample_labels
from cxrlt.synth.patterns import DISTRACTORS, patterns_for
from cxrlt.synth.render import worker_init, write_image

INVERTED_FRACTION = 0.03  # MONOCHROME1-like exports
EXPORT_BITS = [10, 12, 12, 14, 15, 16]
# The second centre (NIH-shaped images, cxrlt.synth.cohort.make_nih_cohort): their share of the
# training and test images by default (1,500 / 300 -> 30 / 18), and how they are exported: 8-bit,
# square at --max-side (NIH's are all 1024 x 1024), a near-full window with a harder contrast.
NIH_TRAIN_SHARE, NIH_TEST_SHARE = 0.02, 0.06


def default_nih(n_train: int, n_test: int) -> tuple[int, int]:
    """The NIH-shaped images among n_train / n_test by default."""
    return round(NIH_TRAIN_SHARE * n_train), round(NIH_TEST_SHARE * n_test)


def _nih_export(rng) -> dict:
    lo = float(rng.uniform(0, 12))
    return dict(bits=8, window=(lo, float(rng.uniform(235, 255))), gamma=float(rng.uniform(1.2, 1.5)),
                noise=float(rng.uniform(0.008, 0.012)), stretch=True)


def _image_size(rng, min_side: int, max_side: int) -> tuple[int, int]:
    """(H, W) within [min_side, max_side], aspect 0.75-1.33, never square."""
    while True:
        h = int(rng.integers(min_side, max_side + 1))
        w = int(round(h * rng.uniform(0.75, 1.33)))
        if min_side <= w <= max_side and w != h:
            return h, w


def _export_window(rng) -> tuple[int, tuple[float, float]]:
    """Stored bits and the [lo, hi] stored-value range an export maps the image to."""
    bits = int(rng.choice(EXPORT_BITS))
    top = 2 ** bits - 1
    lo = rng.uniform(0.0, 0.25) * top
    hi = lo + rng.uniform(0.45, 1.0) * (top - lo)
    return bits, (float(lo), float(hi))


def image_jobs(rng, studies: list[Study], labels: list[str], image_dir: Path, seed: int,
               min_side: int, max_side: int) -> list[dict]:
    """One render job per image (see cxrlt.synth.render), in study order. Every image of a
    study shows the study's findings (each drawn independently: place, size, contrast)."""
    specs = patterns_for(labels)
    jobs = []
    for st in studies:
        findings = [(k, lab, specs[lab]) for k, lab in enumerate(labels)
                    if lab in st.labels and lab in specs]
        if st.distractor >= 0:
            findings.append((len(labels) + st.distractor, None, DISTRACTORS[st.distractor]))
        for im in st.images:
            if st.patient.centre == "nih":
                path, shape, export = image_dir / nih_folder(im.image_id) / im.image_id, (max_side, max_side), \
                    _nih_export(rng)
            else:
                bits, window = _export_window(rng)
                path, shape = image_dir / im.image_id, _image_size(rng, min_side, max_side)
                export = dict(bits=bits, window=window, gamma=float(rng.uniform(0.8, 1.25)),
                              noise=float(rng.uniform(0.002, 0.006)))
            jobs.append(dict(
                path=str(path), image_id=im.image_id, shape=shape, seed=[seed, 7, len(jobs)],
                view="frontal" if im.frontal else "lateral", projection=im.projection,
                findings=findings, **export, inverted=False))
    padchest = [i for i, j in enumerate(jobs) if j["bits"] > 8]  # NIH's exports are never inverted
    n_inv = min(len(padchest), max(1, round(INVERTED_FRACTION * len(jobs))))
    for i in rng.choice(padchest, n_inv, replace=False):
        jobs[i]["inverted"] = True
    return jobs


def _check_args(n_train, n_test, min_side, max_side, labels, nih=(0, 0)) -> None:
    if n_train < 40:
        raise InputError(f"--n-train must be at least 40 (got {n_train})")
    if n_test < 10:
        raise InputError(f"--n-test must be at least 10 (got {n_test})")
    for flag, k, n in (("--n-nih-train", nih[0], n_train), ("--n-nih-test", nih[1], n_test)):
        if not 0 <= k <= n // 4:
            raise InputError(f"{flag} must be in 0..{n // 4} (a quarter of {flag.replace('nih-', '')}; got {k})")
    if not 32 <= min_side < max_side:
        raise InputError(f"need 32 <= --min-side < --max-side (got {min_side}, {max_side}): "
                         f"images must be able to be non-square")
    if max_side > 8192:
        raise InputError(f"--max-side must be at most 8192 (got {max_side})")
    if len(labels) < 2:
        raise InputError(f"need at least 2 labels (got {labels})")
    clash = [lab for lab in labels if lab in ID_COLUMNS]
    if clash:
        raise InputError(f"label(s) {clash} clash with the ID columns {ID_COLUMNS}")


def _validate_label_names(path: str, labels: list[str]) -> None:
    for i, lab in enumerate(labels, 1):
        if any(ch in lab for ch in ',"\r\n'):
            raise InputError(f"{path}: label {i} ({lab!r}) contains a comma or quote, which "
                             f"the CSV layout cannot hold")


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def generate(out_dir, n_train: int = 1500, n_test: int = 300, seed: int = 0,
             min_side: int = 256, max_side: int = 640, labels: list[str] | None = None,
             force: bool = False, workers: int | None = None, progress: bool = True,
             nih: tuple[int, int] | None = None) -> dict:
    """Write the demo dataset to `out_dir` (see the cxrlt.synth docstring) and return its summary.

    nih: (train, test) NIH-shaped images among the n_train / n_test (default: default_nih()).

    If `out_dir` already holds a complete dataset it is left alone (summary["skipped"] is True)
    unless force=True. Same arguments -> byte-identical files, whatever `workers` is.
    """
    t0 = time.perf_counter()
    labels = list(CXRLT2026_LABELS if labels is None else labels)
    nih = default_nih(n_train, n_test) if nih is None else (int(nih[0]), int(nih[1]))
    _check_args(n_train, n_test, min_side, max_side, labels, nih)
    if seed < 0:
        raise InputError(f"--seed must be >= 0 (got {seed})")
    out = Path(out_dir)
    existing = load_existing(out)
    if existing is not None and existing.get("format_version") != FORMAT_VERSION:
        # an older generator's dataset (e.g. without metadata and boxes): ours to replace
        print(f"{out}: holds a demo dataset of format {existing.get('format_version')}; "
              f"writing format {FORMAT_VERSION} over it")
        force = True
    if existing is not None and not force:
        print(f"{out}: already holds a complete demo dataset (seed {existing.get('seed')}, "
              f"{existing.get('n_train')} train / {existing.get('n_test')} test images); "
              f"nothing to do (--force regenerates it)")
        return dict(existing, skipped=True)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not a complete demo dataset; "
                         f"use --force to replace it")

    rng = np.random.default_rng([seed, 1])
    ids = IdMaker(rng, random.Random(seed * 1_000_003 + 17))
    studies = make_cohort(ids, rng, n_train - nih[0], n_test - nih[1])
    first = 1 + max(st.patient.index for st in studies)
    studies += make_nih_cohort(np.random.default_rng([seed, 3]), nih[0], nih[1], first)
    mark_removal(rng, studies, n_train)
    sample_labels(rng, studies, labels)
    enforce_minimums(rng, studies, labels)
    add_distractors(rng, studies, len(DISTRACTORS))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        jobs = image_jobs(rng, studies, labels, tmp / "images", seed, min_side, max_side)
        for folder in sorted({os.path.dirname(j["path"]) for j in jobs}):
            os.makedirs(folder, exist_ok=True)  # NIH's images_001/images/ ...
        boxes = _render_all(jobs, workers or _default_workers(), progress)
        write_csvs(tmp, studies, labels, boxes)
        summary = summary_of(studies, labels, jobs, boxes, seed, min_side, max_side)
        (tmp / MARKER_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = dict(summary, skipped=False, seconds=round(time.perf_counter() - t0, 2))
    return summary


def _render_all(jobs: list[dict], workers: int, progress: bool) -> list[tuple]:
    """Write every image; -> all their boxes, in job order (whatever `workers` is)."""
    bar = P.bar(total=len(jobs), desc="demo images", unit="img", disable=not progress)
    boxes: list[tuple] = []
    if workers <= 1:
        for job in jobs:
            boxes += write_image(job)
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # safe even if the caller holds threads
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker_init) as ex:
            for rows in ex.map(write_image, jobs, chunksize=16):
                boxes += rows
                bar.update()
    bar.close()
    return boxes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlt.synth",
                                 description="Write a synthetic dataset in the CXR-LT 2026 layout.")
    ap.add_argument("--out", required=True, help="output folder (e.g. data/demo)")
    ap.add_argument("--n-train", type=int, default=1500, help="rows of train.csv (default 1500)")
    ap.add_argument("--n-test", type=int, default=300, help="images in the test list (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=256, help="smallest image side in pixels")
    ap.add_argument("--max-side", type=int, default=640, help="largest image side in pixels")
    ap.add_argument("--n-nih-train", type=int, default=None,
                    help=f"NIH-shaped images among --n-train (default {NIH_TRAIN_SHARE:.0%} of it)")
    ap.add_argument("--n-nih-test", type=int, default=None,
                    help=f"NIH-shaped images among --n-test (default {NIH_TEST_SHARE:.0%} of it)")
    ap.add_argument("--labels-file", help="one label per line (default: the 30 CXR-LT 2026 labels)")
    ap.add_argument("--workers", type=int, default=None,
                    help="image-writing processes (default: usable CPU cores, at most 8)")
    ap.add_argument("--force", action="store_true", help="replace an existing dataset at --out")
    args = ap.parse_args(argv)
    labels = None
    if args.labels_file:
        if not os.path.isfile(args.labels_file):
            raise InputError(f"{args.labels_file}: labels file not found")
        labels = read_labels_file(args.labels_file)
        _validate_label_names(args.labels_file, labels)
    nih = default_nih(args.n_train, args.n_test)
    nih = (nih[0] if args.n_nih_train is None else args.n_nih_train,
           nih[1] if args.n_nih_test is None else args.n_nih_test)
    s = generate(args.out, args.n_train, args.n_test, args.seed, args.min_side, args.max_side,
                 labels, force=args.force, workers=args.workers, nih=nih)
    if not s["skipped"]:
        print(f"{args.out}: {s['n_train']} train images ({s['n_nih_train']} NIH-shaped, {s['n_lateral_train']} lateral, "
              f"{s['n_removal_extra']} also in Removal.csv), {s['n_test']} test images ({s['n_nih_test']} NIH-shaped), "
              f"{len(s['labels'])} labels, {s['n_patients']} patients / {s['n_patient_ids']} "
              f"PatientIDs, {s['n_boxes']} boxes, {s['seconds']:.1f} s")
    return 0

