"""One image from its job: anatomy, findings, noise, export window -> 16-bit PNG (8-bit when the
job's bits are 8: the NIH-shaped images), and the box
of every finding drawn on it.

A job (built by dataset.image_jobs) is a dict: path, image_id, shape (H, W), seed (list of
ints), view ('frontal' | 'lateral'), projection (PA, AP, AP_horizontal, L), findings (list of
(key, label or None for a distractor, PatternSpec of the frontal view)), bits, window (lo, hi),
gamma, noise, inverted, and optionally stretch (the NIH-shaped images: the render is first
stretched to its own 0.5-99.5 percentile range, so the 8-bit export spans the image).

Random streams are separate (numpy seeds `seed + [k]`): placement, marker and noise; the
anatomy; and one per finding (keyed by its label's index), which also decides whether the
finding is occult. So the same job without one finding renders the same image except where
that finding was drawn (the tests use this to check the boxes).

Kept free of heavy imports: worker processes (spawned) import only this module's tree.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from cxrlt.synth.anatomy import (anatomy_change, anatomy_masks, apply_changes, base_anatomy,
                      draw_anatomy)
from cxrlt.synth.canvas import Canvas
from cxrlt.synth.patterns import draw_pattern

# A labelled finding is not drawn in an image (label noise, as in report-derived labels); more
# often on laterals, where findings hide behind the superimposed lungs.
P_OCCULT = {"frontal": 0.08, "lateral": 0.15}
RENDER_SIDE = 192  # long side of the low-resolution render before upsampling
_ANATOMY_STREAM, _FINDING_STREAM = 1, 100


def render_image(job: dict) -> tuple[np.ndarray, list[tuple]]:
    """-> (2-D uint16 array (H, W), uint8 when bits <= 8, [(label, x0, y0, x1, y1)] boxes in pixels of that array,
    end-exclusive, one per labelled finding drawn)."""
    H, W = job["shape"]
    rng = np.random.default_rng(job["seed"])
    s = RENDER_SIDE / max(H, W)
    h, w = max(16, round(H * s)), max(16, round(W * s))
    geom = dict(h=h, w=w, cx=0.5 + rng.normal(0, 0.015), cy=rng.normal(0, 0.015),
                sx=rng.uniform(0.9, 1.04), sy=rng.uniform(0.9, 1.04))
    cv = Canvas(**geom)
    drawn = _visible_findings(job)
    an0 = base_anatomy(_stream(job, _ANATOMY_STREAM), job["projection"])
    changes = [(label, anatomy_change(sp.params, frng)) for label, sp, frng in drawn
               if sp.kind == "anatomy"]
    an = apply_changes(an0, [ch for _, ch in changes])
    draw_anatomy(cv, _stream(job, _ANATOMY_STREAM + 1), an, job["view"])
    boxes = _anatomy_boxes(job, geom, an0, changes)
    for label, sp, frng in drawn:
        if sp.kind == "anatomy":
            continue
        cv.record()
        draw_pattern(cv, sp, frng, an)
        box = cv.recorded()
        if label is not None and box is not None:
            boxes.append((label, box))
    if rng.random() < 0.3:  # burnt-in side marker ("L"/"R") in a top corner
        y0, x0 = int(h * rng.uniform(0.02, 0.06)), int(w * rng.choice([0.04, 0.88]))
        cv.a[y0:y0 + max(2, h // 30), x0:x0 + max(2, w // 30)] = 1.1
    x = np.clip(cv.a / 1.15, 0.0, 1.0)
    if job.get("stretch"):  # NIH-shaped: the export already spans the image's own range
        lo_x, hi_x = np.percentile(x, [0.5, 99.5])
        x = np.clip((x - lo_x) / max(float(hi_x - lo_x), 1e-3), 0.0, 1.0)
    x = x ** np.float32(job["gamma"])
    # Export window: stored = lo + (hi - lo) * x, or hi - (hi - lo) * x for MONOCHROME1-like
    # (inverted) files. Applied before the resize (both are linear) to work on fewer pixels.
    lo, hi = job["window"]
    scale, offset = (lo - hi, hi) if job["inverted"] else (hi - lo, lo)
    x = x * np.float32(scale) + np.float32(offset)
    shrink = h > H  # small images: render finer than the output and average down
    x = cv2.resize(x, (W, H), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    x += rng.standard_normal((H, W), dtype=np.float32) * np.float32(job["noise"] * abs(scale))
    np.clip(x, 0, 2 ** job["bits"] - 1, out=x)
    img = np.rint(x, out=x).astype(np.uint8 if job["bits"] <= 8 else np.uint16)  # NIH-shaped: 8-bit
    return img, [(label, *_to_pixels(box, (h, w), (H, W))) for label, box in boxes]


def _stream(job: dict, k: int) -> np.random.Generator:
    return np.random.default_rng([*job["seed"], k])


def _visible_findings(job: dict) -> list[tuple]:
    """(label, spec for this view, its random stream) of the findings drawn on this image."""
    out = []
    for key, label, spec in job["findings"]:
        sp = spec.lateral if job["view"] == "lateral" else spec
        frng = _stream(job, _FINDING_STREAM + key)
        if frng.random() < P_OCCULT[job["view"]] or sp is None or sp.kind == "none":
            continue
        out.append((label, sp, frng))
    return out


def _anatomy_boxes(job: dict, geom: dict, an0: dict, changes: list[tuple]) -> list[tuple]:
    """Grid box of each anatomy finding: where the lungs / heart shaped by all the image's
    changes differ from those shaped by all but that one (effusion on hyperinflated lungs
    fills a different place than on normal ones)."""
    if not changes:
        return []
    cv = Canvas(**geom)
    full = anatomy_masks(cv, apply_changes(an0, [ch for _, ch in changes]), job["view"])
    out = []
    for i, (label, _) in enumerate(changes):
        others = [ch for j, (_, ch) in enumerate(changes) if j != i]
        masks = anatomy_masks(cv, apply_changes(an0, others), job["view"])
        diff = np.any([np.abs(m - m0) > 1e-4 for m, m0 in zip(masks, full)], axis=0)
        rows, cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
        if label is not None and len(rows):
            out.append((label, (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)))
    return out


def _to_pixels(box: tuple, grid: tuple[int, int], out: tuple[int, int]) -> tuple[int, ...]:
    """Grid box (y0, x0, y1, x1) -> pixel box (x0, y0, x1, y1) of the (H, W) image, grown by
    one grid cell: resizing the render spreads each cell into its neighbours' pixels."""
    (h, w), (H, W) = grid, out
    y0, x0, y1, x1 = box
    return (math.floor(max(0, x0 - 1) * W / w), math.floor(max(0, y0 - 1) * H / h),
            min(W, math.ceil(min(w, x1 + 1) * W / w)), min(H, math.ceil(min(h, y1 + 1) * H / h)))


def write_image(job: dict) -> list[tuple]:
    """Render and write one job's PNG; -> its boxes as (ImageID, label, x0, y0, x1, y1)."""
    img, boxes = render_image(job)
    ok = cv2.imwrite(job["path"], img, [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                        cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise OSError(f"{job['path']}: cv2.imwrite failed")
    return [(job["image_id"], *b) for b in boxes]


def worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core; no thread oversubscription
