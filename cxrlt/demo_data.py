"""Synthetic demo dataset in the exact CXR-LT 2026 file layout.

    python -m cxrlt.demo_data --out data/demo [--n-train 1500] [--n-test 300] [--seed 0]
        [--min-side 256] [--max-side 640] [--labels-file F] [--workers N] [--force]

Files written under `<out>/` (all CSVs UTF-8, LF line endings, rows sorted by ImageID):

* `train.csv`: `ImageID,StudyDate_DICOM,PatientID,<labels...>`; one row per training image,
  label columns integer 0/1 in the official order (cxrlt.labels.CXRLT2026_LABELS unless
  `--labels-file`). Also holds the extra Removal images (see below). Ends with a newline.
* `CXRLT_2026_TEST_ALL_TASK1.csv`: the evaluation list, shaped like the real file: header
  `ImageID,StudyDate_DICOM,PatientID` followed by one EMPTY column name per label, and every
  row ends with the same number of empty fields (`...,1.90E+38,,,,`). Like the real file it
  has no newline after the last row.
* `Removal.csv`: `ImageID,StudyDate_DICOM,PatientID`: every test image plus ~3% of the
  training images (whole studies; those rows ARE in train.csv and must be dropped from
  training). No newline after the last row, like the real file.
* `test_labels.csv`: the hidden labels of the test images in train.csv's layout (same row
  order as the test list), so the demo can score itself.
* `images/<ImageID>`: 16-bit grayscale PNGs, sides in [min_side, max_side], never square.
* `dataset.json`: written last; marks the dataset complete and records the parameters and a
  summary (per-label counts, inverted ImageIDs, ...).

Column values: ImageID like the real ones, mostly `<39 digits>_<6 lowercase alnum>.png` where
the digits are a study id shared by the 1-3 images of a study, plus a few 38-digit studies,
`<45 digits>_<dd-ddd-ddd>.png` and `<39 digits>_2_<6 alnum>.png`. StudyDate_DICOM is
yyyymmdd (2009-2017), shared by the images of a study. PatientID is the Excel float form
("%.2E", e.g. `1.90E+38`) of a 128-bit number, so a few distinct patients share one string
(some collisions are made on purpose). Patients (PatientID strings) never span train/test.

Labels are drawn per study (all images of a study share them) with the long-tail profile
of CXRLT2026_APPROX_COUNTS, realistic co-occurrences (a noisy-OR network that keeps the
marginal rates), `Normal` exclusive of every finding, some studies with no label at all,
and at least MIN_POS_TRAIN / MIN_POS_TEST positive images per label in the training images
that are kept (not in Removal) / in the test list.

Images: a smooth chest-like attenuation map (body, lungs, mediastinum, heart, spine,
clavicles, ribs, diaphragm domes, gradients) rendered at low resolution, upsampled and given
full-resolution noise, then stored through a random export window (10-16 stored bits, random
offset, gamma) and 3% inverted (MONOCHROME1-like). Each finding adds its own pattern (see
PATTERNS): a shape with a label-specific place in the chest, its own form/orientation/texture
and random jitter of position, size and contrast (down to faint), large enough to survive
percentile windowing and a 64-pixel resize; in P_OCCULT of the images a labelled finding is
not drawn at all (label noise, as with report-derived labels). Most unlabelled studies and
some abnormal ones also show a finding outside the label set (DISTRACTORS); Normal studies
show no pattern at all.

Everything is seeded: the same arguments give byte-identical files whatever the number of
worker processes. The dataset is built in a temp folder beside `out` and renamed into place.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import graphlib
import json
import multiprocessing
import os
import random
import re
import shutil
import string
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from .errors import InputError
from .labels import CXRLT2026_APPROX_COUNTS, CXRLT2026_LABELS, CXRLT2026_TOTAL_IMAGES, read_labels_file
from .tables import ID_COLUMNS

TEST_LIST_NAME = "CXRLT_2026_TEST_ALL_TASK1.csv"
MARKER_NAME = "dataset.json"
FORMAT_VERSION = 1

MIN_POS_TRAIN = 5  # positives per label among the kept training images
MIN_POS_TEST = 2  # positives per label among the test images
REMOVAL_FRACTION = 0.03  # extra training images listed in Removal.csv
INVERTED_FRACTION = 0.03  # MONOCHROME1-like exports
COLLISION_RATE = 0.04  # PatientID strings shared by two distinct patients
P_OCCULT = 0.08  # a labelled finding is not drawn in an image (label noise, as in reports)
RENDER_SIDE = 192  # long side of the low-resolution render before upsampling
NORMAL_NAMES = {"normal", "nofinding"}  # label names treated as "no finding" (exclusive)

# Study/image structure (probabilities): images per study, studies per patient.
IMAGES_PER_STUDY = ([1, 2, 3], [0.30, 0.60, 0.10])
STUDIES_PER_PATIENT = ([1, 2, 3, 4], [0.50, 0.27, 0.14, 0.09])
EXPORT_BITS = [10, 12, 12, 14, 15, 16]

# Co-occurrence: child -> [(parent, weight)]. P(child) = 1 - (1 - base) * prod(1 - weight of
# each positive parent) (noisy OR); `base` is solved so the child's overall rate stays on target.
CORRELATIONS = {
    "aortic elongation": [("aortic atheromatosis", 0.7), ("Kyphosis", 0.25),
                          ("vertebral degenerative changes", 0.2)],
    "vertebral degenerative changes": [("Kyphosis", 0.35)],
    "cardiomegaly": [("pleural effusion", 0.35), ("vascular hilar enlargement", 0.3),
                     ("sternotomy", 0.3)],
    "pleural effusion": [("Hydropneumothorax", 0.6)],
    "atelectasis": [("pleural effusion", 0.25)],
    "alveolar pattern": [("pleural effusion", 0.15)],
    "Support Devices": [("sternotomy", 0.85), ("central venous catheter", 0.6)],
    "central venous catheter": [("sternotomy", 0.3)],
    "hyperinflated lung": [("Emphysema", 0.35)],
    "Pneumothorax": [("Hydropneumothorax", 0.3)],
    "Subcutaneous Emphysema": [("Pneumothorax", 0.2)],
    "interstitial pattern": [("bronchiectasis", 0.2)],
}


# ----------------------------------------------------------------------------------------
# Visual patterns
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatternSpec:
    """How one label is drawn. Coordinates are chest coordinates (p: 0 = image left .. 1 =
    image right; q: 0 = lung apices .. ~1 = below the diaphragm); sizes in the same units.

    kind: the drawing routine (see _PATTERN_DRAWERS); params: its arguments; probe: (p, q, radius,
    sign): a region whose mean windowed intensity is higher (sign +1) or lower (-1) in
    positives than in negatives, used by the tests and handy for eyeballing.
    """
    kind: str
    params: dict = field(default_factory=dict)
    probe: tuple = (0.5, 0.5, 0.05, 1)


PATTERNS: dict[str, PatternSpec] = {
    "aortic elongation": PatternSpec("blob", dict(c=(0.61, 0.27), ab=(0.055, 0.08), amp=0.26),
                                     (0.61, 0.27, 0.035, 1)),
    "cardiomegaly": PatternSpec("anatomy", dict(heart=1.38), (0.72, 0.66, 0.035, 1)),
    "pleural effusion": PatternSpec("anatomy", dict(fluid=0.17), (0.22, 0.70, 0.04, 1)),
    "Nodule": PatternSpec("blob", dict(c=(0.35, 0.33), ab=(0.038, 0.038), amp=0.34, jit=0.035),
                          (0.35, 0.33, 0.04, 1)),
    "atelectasis": PatternSpec("blob", dict(c=(0.33, 0.59), ab=(0.11, 0.028), amp=0.28,
                                            angle=-8, profile="flat"), (0.33, 0.59, 0.04, 1)),
    "pleural thickening": PatternSpec("pair", dict(c=(0.15, 0.32), ab=(0.028, 0.13), amp=0.26,
                                                   angle=8), (0.15, 0.32, 0.035, 1)),
    "aortic atheromatosis": PatternSpec("ring", dict(c=(0.56, 0.18), r=0.045, w=0.016, amp=0.40),
                                        (0.56, 0.18, 0.04, 1)),
    "Support Devices": PatternSpec("devices", dict(), (0.14, 0.08, 0.045, 1)),
    "alveolar pattern": PatternSpec("patchy", dict(c=(0.22, 0.46), ab=(0.10, 0.085), amp=0.30),
                                    (0.22, 0.46, 0.05, 1)),
    "fracture": PatternSpec("fracture", dict(c=(0.83, 0.47)), (0.83, 0.47, 0.04, 1)),
    "Hernia": PatternSpec("blob", dict(c=(0.47, 0.67), ab=(0.065, 0.055), amp=-0.30,
                                       profile="flat"), (0.47, 0.67, 0.035, -1)),
    "Emphysema": PatternSpec("emphysema", dict(c=(0.27, 0.20)), (0.27, 0.135, 0.025, 1)),
    "azygos lobe": PatternSpec("azygos", dict(c=(0.41, 0.17)), (0.38, 0.18, 0.035, 1)),
    "Hydropneumothorax": PatternSpec("hydro", dict(c=(0.77, 0.57), ab=(0.085, 0.13)),
                                     (0.77, 0.62, 0.04, 1)),
    "Kyphosis": PatternSpec("curve", dict(pts=((0.5, 0.56), (0.60, 0.72), (0.5, 0.88)),
                                          width=0.036, amp=0.28), (0.55, 0.72, 0.03, 1)),
    "Mass": PatternSpec("blob", dict(c=(0.72, 0.40), ab=(0.085, 0.085), amp=0.34, jit=0.03),
                        (0.72, 0.40, 0.05, 1)),
    "Pneumothorax": PatternSpec("blob", dict(c=(0.72, 0.16), ab=(0.13, 0.085), amp=-0.16,
                                             profile="flat", edge=0.1), (0.72, 0.16, 0.04, -1)),
    "Subcutaneous Emphysema": PatternSpec("streaks", dict(c=(0.085, 0.58)),
                                          (0.085, 0.58, 0.035, -1)),
    "pneumoperitoneo": PatternSpec("crescent", dict(c=(0.31, 0.0)), (0.31, 0.785, 0.03, -1)),
    "vascular hilar enlargement": PatternSpec("pair", dict(c=(0.38, 0.44), ab=(0.05, 0.05),
                                                           amp=0.28, profile="bump"),
                                              (0.38, 0.44, 0.035, 1)),
    "vertebral degenerative changes": PatternSpec("spurs", dict(c=(0.5, 0.86)),
                                                  (0.5, 0.86, 0.035, 1)),
    "hyperinflated lung": PatternSpec("anatomy", dict(lungs=1.32), (0.30, 0.81, 0.04, -1)),
    "interstitial pattern": PatternSpec("reticular", dict(c=(0.20, 0.62), ab=(0.085, 0.09)),
                                        (0.20, 0.62, 0.045, 1)),
    "central venous catheter": PatternSpec("curve", dict(pts=((0.06, 0.13), (0.22, 0.11),
                                                              (0.40, 0.20), (0.46, 0.46)),
                                                         width=0.018, amp=0.65),
                                           (0.22, 0.115, 0.03, 1)),
    "hypoexpansion": PatternSpec("anatomy", dict(lungs=0.76), (0.30, 0.70, 0.04, 1)),
    "bronchiectasis": PatternSpec("rings", dict(c=(0.66, 0.52)), (0.66, 0.52, 0.045, 1)),
    "hemidiaphragm elevation": PatternSpec("anatomy", dict(elevate=0.7), (0.30, 0.70, 0.04, 1)),
    "sternotomy": PatternSpec("sternotomy", dict(c=(0.5, 0.36)), (0.5, 0.36, 0.04, 1)),
    "calcified densities": PatternSpec("dots", dict(c=(0.25, 0.57), spread=0.035, n=(5, 9),
                                                    r=0.022, amp=0.7), (0.25, 0.57, 0.05, 1)),
}

# Findings outside the label set (scoliosis, a thickened minor fissure, a skin fold): drawn in
# most unlabelled studies and some abnormal ones, never in Normal ones, so that `Normal`
# means "no pattern at all" rather than "no pattern of a listed label".
DISTRACTORS = [
    PatternSpec("curve", dict(pts=((0.5, 0.15), (0.45, 0.35), (0.55, 0.6), (0.5, 0.8)),
                              width=0.03, amp=0.2)),
    PatternSpec("blob", dict(c=(0.30, 0.47), ab=(0.12, 0.01), amp=0.3, profile="flat", edge=0.5)),
    PatternSpec("curve", dict(pts=((0.88, 0.25), (0.80, 0.5), (0.86, 0.75)), width=0.012,
                              amp=-0.22)),
]
P_DISTRACTOR_UNLABELLED = 0.7
P_DISTRACTOR_ABNORMAL = 0.25

# Name aliases so common label sets (e.g. NIH ChestX-ray14) reuse the matching pattern.
_ALIASES = {"effusion": "pleural effusion", "pleuraleffusion": "pleural effusion",
            "consolidation": "alveolar pattern", "edema": "interstitial pattern",
            "fibrosis": "interstitial pattern", "pleuralthickening": "pleural thickening",
            "pneumoperitoneum": "pneumoperitoneo", "supportdevices": "Support Devices"}


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def is_normal_label(name: str) -> bool:
    """True for the exclusive 'no finding' label (`Normal`, `No Finding`)."""
    return _norm_name(name) in NORMAL_NAMES


def patterns_for(labels: list[str]) -> dict[str, PatternSpec]:
    """Pattern of every finding in `labels`: the CXR-LT pattern of the same (or aliased) name,
    else the next unused CXR-LT pattern, else a generic blob at a fixed pseudo-random place."""
    by_norm = {_norm_name(k): k for k in PATTERNS}
    by_norm.update({k: v for k, v in _ALIASES.items()})
    out: dict[str, PatternSpec] = {}
    used: set[str] = set()
    pending = []
    for lab in labels:
        if is_normal_label(lab):
            continue
        key = by_norm.get(_norm_name(lab))
        if key is not None and key not in used:
            out[lab] = PATTERNS[key]
            used.add(key)
        else:
            pending.append(lab)
    pool = [k for k in PATTERNS if k not in used]
    for i, lab in enumerate(pending):
        out[lab] = PATTERNS[pool[i]] if i < len(pool) else _generic_pattern(i - len(pool))
    return out


def _generic_pattern(i: int) -> PatternSpec:
    """A blob with a fixed place/shape per index, for label sets larger than PATTERNS."""
    r = np.random.default_rng(10_000 + i)
    c = (float(r.uniform(0.2, 0.8)), float(r.uniform(0.2, 0.7)))
    ab = (float(r.uniform(0.03, 0.07)), float(r.uniform(0.03, 0.07)))
    amp = float(r.choice([-1, 1]) * r.uniform(0.22, 0.32))
    spec = dict(c=c, ab=ab, amp=amp, angle=float(r.uniform(-60, 60)), profile="flat")
    return PatternSpec("blob", spec, (c[0], c[1], 0.03, int(np.sign(amp))))


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------

class _Canvas:
    """Attenuation map on a low-resolution grid, addressed in chest coordinates.

    The chest is placed with a random shift/scale: image coords u = cx + (p - 0.5) * sx and
    v = 0.5 + cy + (q - 0.5) * sy (u, v in 0..1 of the image width/height).
    """

    def __init__(self, h: int, w: int, cx: float, cy: float, sx: float, sy: float):
        self.a = np.zeros((h, w), np.float32)
        u = (np.arange(w, dtype=np.float32) + 0.5) / w
        v = (np.arange(h, dtype=np.float32) + 0.5) / h
        self.p = (u - cx) / sx + 0.5  # chest p of every column (increasing)
        self.q = (v - 0.5 - cy) / sy + 0.5  # chest q of every row (increasing)

    def window(self, pc, qc, rp, rq):
        """Slices of the grid covering [pc +- rp] x [qc +- rq], and the offsets from the centre
        (dp: (1, n) row vector, dq: (m, 1) column vector). None if outside the image."""
        x0, x1 = np.searchsorted(self.p, [pc - rp, pc + rp])
        y0, y1 = np.searchsorted(self.q, [qc - rq, qc + rq])
        if x1 <= x0 or y1 <= y0:
            return None
        sl = (slice(y0, y1), slice(x0, x1))
        return sl, (self.p[x0:x1] - pc)[None, :], (self.q[y0:y1] - qc)[:, None]

    def ellipse(self, pc, qc, a, b, amp, angle=0.0, profile="flat", edge=0.3, fill=False,
                power=2.0):
        """Add (or with fill=True blend towards) `amp` inside a rotated ellipse (a superellipse
        for power > 2). profile 'flat': plateau with a soft rim of relative width `edge`;
        'bump': smooth dome."""
        rad = max(a, b)
        win = self.window(pc, qc, rad, rad)
        if win is None:
            return
        sl, dp, dq = win
        if angle:
            c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
            dp, dq = dp * c + dq * s, dq * c - dp * s
        if power == 2.0:
            r2 = (dp / a) ** 2 + (dq / b) ** 2
        else:
            r2 = (np.abs(dp / a) ** power + np.abs(dq / b) ** power) ** (2.0 / power)
        if profile == "bump":
            m = np.clip(1.0 - r2, 0.0, None) ** 2
        else:
            m = np.clip((1.0 - np.sqrt(r2)) / edge, 0.0, 1.0)
        if fill:
            self.a[sl] += (amp - self.a[sl]) * m
        else:
            self.a[sl] += amp * m

    def ring(self, pc, qc, r, w, amp, aspect=1.0, upper_only=False):
        """A ring of radius r (vertical radius r * aspect) and half-width w; upper_only keeps
        the upper half (a crescent)."""
        win = self.window(pc, qc, r + w, (r + w) * aspect)
        if win is None:
            return
        sl, dp, dq = win
        d = np.abs(np.sqrt(dp ** 2 + (dq / aspect) ** 2) - r)
        m = np.clip(1.0 - d / w, 0.0, 1.0)
        if upper_only:
            m = m * np.clip(-dq / (r * aspect * 0.3), 0.0, 1.0)
        self.a[sl] += amp * m

    def curve(self, pts, width, amp):
        """A line of `width` (half-width at zero) through `pts` (a smooth quadratic B-spline
        for 3+ points, a segment for 2)."""
        pts = _smooth_polyline(np.asarray(pts, np.float32))
        lo, hi = pts.min(0) - width, pts.max(0) + width
        c = (lo + hi) / 2
        win = self.window(c[0], c[1], (hi[0] - lo[0]) / 2, (hi[1] - lo[1]) / 2)
        if win is None:
            return
        sl, dp, dq = win
        px, py = dp + c[0], dq + c[1]
        dmin = np.full(np.broadcast_shapes(px.shape, py.shape), np.inf, np.float32)
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
            ex, ey = x1 - x0, y1 - y0
            t = np.clip(((px - x0) * ex + (py - y0) * ey) / max(ex * ex + ey * ey, 1e-9), 0, 1)
            dmin = np.minimum(dmin, (px - x0 - t * ex) ** 2 + (py - y0 - t * ey) ** 2)
        self.a[sl] += amp * np.clip(1.0 - np.sqrt(dmin) / width, 0.0, 1.0)


def _smooth_polyline(pts: np.ndarray, n: int = 12) -> np.ndarray:
    if len(pts) < 3:
        return pts
    out = [pts[0]]
    for i in range(1, len(pts) - 1):  # quadratic Bezier through the midpoints
        a = (pts[i - 1] + pts[i]) / 2 if i > 1 else pts[0]
        c = (pts[i] + pts[i + 1]) / 2 if i < len(pts) - 2 else pts[-1]
        t = np.linspace(0, 1, n, dtype=np.float32)[1:, None]
        out.extend((1 - t) ** 2 * a + 2 * (1 - t) * t * pts[i] + t ** 2 * c)
    return np.asarray(out, np.float32)


def _anatomy(rng: np.random.Generator, mods: list[dict]) -> dict:
    """Per-image anatomy parameters, changed by the 'anatomy' patterns of the positive labels."""
    an = dict(heart=float(rng.uniform(0.93, 1.07)),
              lung_r=float(rng.uniform(0.95, 1.05)), lung_l=float(rng.uniform(0.95, 1.05)),
              fluid_r=0.0, fluid_l=0.0, dark=0.0)
    for m in mods:
        if "heart" in m:
            an["heart"] *= m["heart"] * rng.uniform(0.95, 1.08)
        if "lungs" in m:
            f = m["lungs"] * rng.uniform(0.96, 1.04)
            an["lung_r"] *= f
            an["lung_l"] *= f
        if "elevate" in m:
            side = "lung_r" if rng.random() < 0.7 else "lung_l"
            an[side] *= m["elevate"] * rng.uniform(0.95, 1.05)
        if "fluid" in m:
            both, right, left = ["fluid_r", "fluid_l"], ["fluid_r"], ["fluid_l"]
            for s in [both, right, left][rng.choice(3, p=[0.5, 0.3, 0.2])]:
                an[s] = m["fluid"] * rng.uniform(0.8, 1.3)
    return an


def _draw_lung(cv: _Canvas, pc, qc, a, b_top, b_bot, fluid, amp):
    """A lung field: pear-shaped (narrow apex), dark (amp < 0), lower edge = diaphragm dome.
    `fluid` > 0 fills the base up to that height, with a meniscus rising laterally."""
    dp = cv.p[None, :] - pc
    dq = cv.q[:, None] - qc
    t = np.clip((dq + b_top) / (b_top + b_bot), 0.0, 1.0)
    a_eff = a * (0.62 + 0.45 * np.sqrt(t))
    b = np.where(dq < 0, b_top, b_bot)
    r = np.sqrt((dp / a_eff) ** 2 + (dq / b) ** 2)
    m = np.clip((1.0 - r) / 0.12, 0.0, 1.0)
    if fluid > 0:
        lateral = np.clip(np.abs(dp) / a, 0, 1) * np.sign(dp) * np.sign(pc - 0.5)
        level = qc + b_bot - fluid - 0.06 * np.clip(lateral, 0, 1)
        m = m * (1.0 - 0.85 * np.clip((dq + qc - level) / 0.03, 0.0, 1.0))
    cv.a += amp * m
    return m


def _draw_anatomy(cv: _Canvas, rng: np.random.Generator, an: dict) -> None:
    p = cv.p[None, :]
    q = cv.q[:, None]
    cv.a += 0.04  # air outside the body
    cv.ellipse(0.5, 0.62, 0.47, 0.76, 0.40, edge=0.08, power=3.0)  # torso (squarish)
    cv.a += np.float32(0.07) * np.clip(q, 0, 1.2) * (cv.a > 0.2)  # abdomen denser than neck
    rib = 0.5 + 0.5 * np.sin(2 * np.pi * (q * 8.5 + 1.8 * (p - 0.5) ** 2 + rng.uniform(0, 1)))
    marks = cv2.resize(rng.uniform(0, 1, (14, 14)).astype(np.float32),
                       (cv.a.shape[1], cv.a.shape[0]), interpolation=cv2.INTER_CUBIC)
    lr = an["lung_r"]
    ll = an["lung_l"]
    m_r = _draw_lung(cv, 0.31, 0.44, 0.16, 0.31, 0.32 * lr, an["fluid_r"], -0.31 - an["dark"])
    m_l = _draw_lung(cv, 0.69, 0.45, 0.15, 0.30, 0.31 * ll, an["fluid_l"], -0.31 - an["dark"])
    lungs = m_r + m_l
    # ribs, vascular markings and denser bases over the lung fields
    cv.a += ((0.045 * rib + 0.05 * marks + 0.07 * np.clip(q, 0, 1)) * lungs).astype(np.float32)
    hil = np.exp(-(((p - 0.40) ** 2 + (q - 0.44) ** 2) / 0.02)) + \
        np.exp(-(((p - 0.62) ** 2 + (q - 0.44) ** 2) / 0.02))
    cv.a += (0.07 * hil * lungs).astype(np.float32)  # vessels fan out from the hila
    hs = an["heart"]
    cv.ellipse(0.55 + 0.03 * (hs - 1), 0.655, 0.145 * hs, 0.115 * min(hs, 1.15), 0.47,
               angle=-15, edge=0.15, fill=True)
    cv.ellipse(0.50, 0.30, 0.055, 0.30, 0.46, edge=0.4, fill=True)  # upper mediastinum
    cv.ellipse(0.57, 0.29, 0.045, 0.045, 0.47, edge=0.3, fill=True)  # aortic knob
    spine = 0.7 + 0.3 * np.sin(2 * np.pi * q * 13)
    band = np.clip(1.0 - np.abs(p - 0.5) / 0.032, 0.0, 1.0)
    cv.a += (0.07 * spine * band * np.clip(q / 0.3, 0, 1)).astype(np.float32)
    for side in (-1, 1):  # clavicles
        cv.ellipse(0.5 + side * 0.17, 0.13, 0.16, 0.02, 0.14, angle=side * 12, edge=0.5)
    # smooth random variation: a tilted gradient and a coarse random field
    tilt_p, tilt_q = rng.normal(0, 0.03, 2).astype(np.float32)
    cv.a += tilt_p * (p - 0.5) + tilt_q * (q - 0.5)
    field_ = rng.normal(0, 0.025, (5, 5)).astype(np.float32)
    cv.a += cv2.resize(field_, (cv.a.shape[1], cv.a.shape[0]), interpolation=cv2.INTER_CUBIC)


def _jit(rng, c, s=0.025):
    return c[0] + rng.uniform(-s, s), c[1] + rng.uniform(-s, s)


# One drawer per pattern kind: f(canvas, params, rng, anatomy, gain, size). `gain` and `size`
# are the per-image contrast and size jitter factors.

def _pat_blob(cv, pr, rng, an, gain, size):
    p, q = _jit(rng, pr["c"], pr.get("jit", 0.025))
    a, b = pr["ab"]
    cv.ellipse(p, q, a * size, b * size, pr["amp"] * gain,
               angle=pr.get("angle", 0) + rng.uniform(-10, 10),
               profile=pr.get("profile", "bump"), edge=pr.get("edge", 0.3))


def _pat_pair(cv, pr, rng, an, gain, size):
    """The same shape mirrored on both sides of the chest."""
    p, q = _jit(rng, pr["c"], 0.02)
    a, b = pr["ab"]
    for pp, ang in ((p, pr.get("angle", 0)), (1 - p, -pr.get("angle", 0))):
        cv.ellipse(pp, q, a * size, b * size, pr["amp"] * gain, angle=ang,
                   profile=pr.get("profile", "flat"), edge=0.5)


def _pat_ring(cv, pr, rng, an, gain, size):
    p, q = _jit(rng, pr["c"], 0.02)
    cv.ring(p, q, pr["r"] * size, pr["w"], pr["amp"] * gain, aspect=rng.uniform(0.8, 1.2))


def _pat_dots(cv, pr, rng, an, gain, size):
    p, q = _jit(rng, pr["c"], 0.025)
    for _ in range(rng.integers(*pr["n"])):
        dp, dq = rng.normal(0, pr["spread"], 2)
        cv.ellipse(p + dp, q + dq, pr["r"], pr["r"], pr["amp"] * gain, profile="bump")


def _pat_rings(cv, pr, rng, an, gain, size):
    """Bronchiectasis: a cluster of small thick-walled rings."""
    p, q = _jit(rng, pr["c"], 0.025)
    for _ in range(rng.integers(4, 7)):
        dp, dq = rng.normal(0, 0.035, 2)
        cv.ring(p + dp, q + dq, 0.02 * size, 0.012, 0.32 * gain)


def _pat_patchy(cv, pr, rng, an, gain, size):
    """Alveolar pattern: a fluffy, blotchy opacity."""
    p, q = _jit(rng, pr["c"], 0.025)
    a, b = pr["ab"][0] * size, pr["ab"][1] * size
    win = cv.window(p, q, a, b)
    if win is None:
        return
    sl, dp, dq = win
    env = np.clip(1 - (dp / a) ** 2 - (dq / b) ** 2, 0, None) ** 2
    blot = cv2.resize(rng.uniform(0.3, 1.0, (6, 6)).astype(np.float32),
                      (env.shape[1], env.shape[0]), interpolation=cv2.INTER_CUBIC)
    cv.a[sl] += pr["amp"] * gain * 1.4 * env * np.clip(blot, 0, 1.2)


def _pat_reticular(cv, pr, rng, an, gain, size):
    """Interstitial pattern: a fine net-like texture."""
    p, q = _jit(rng, pr["c"], 0.025)
    a, b = pr["ab"][0] * size, pr["ab"][1] * size
    win = cv.window(p, q, a, b)
    if win is None:
        return
    sl, dp, dq = win
    env = np.clip(1 - (dp / a) ** 2 - (dq / b) ** 2, 0, None)
    f = 2 * np.pi * rng.uniform(16, 20)
    net = np.maximum(np.cos(f * dp) ** 8, np.cos(f * dq + rng.uniform(0, 6)) ** 8)
    cv.a[sl] += 0.30 * gain * env * (0.45 + net)


def _pat_fracture(cv, pr, rng, an, gain, size):
    """Rib fracture: two oblique bar fragments and a callus between them."""
    p, q = _jit(rng, pr["c"], 0.025)
    ang = 25 + rng.uniform(-10, 10)
    c, s = np.cos(np.radians(ang)), np.sin(np.radians(ang))
    for sgn in (-1, 1):
        cv.ellipse(p + sgn * 0.05 * c, q + sgn * 0.05 * s, 0.045 * size, 0.02, 0.38 * gain,
                   angle=ang, edge=0.4)
    cv.ellipse(p, q, 0.035 * size, 0.035 * size, 0.28 * gain, profile="bump")


def _pat_emphysema(cv, pr, rng, an, gain, size):
    """Apical bulla with a bright wall (dark on dark lung alone would be clipped by the
    window), a smaller one opposite; render_image also darkens both lungs."""
    p, q = _jit(rng, pr["c"], 0.025)
    cv.ellipse(p, q, 0.075 * size, 0.065 * size, -0.15 * gain, profile="bump")
    cv.ring(p, q, 0.07 * size, 0.018, 0.40 * gain, aspect=0.9)
    cv.ellipse(1 - p, q, 0.05 * size, 0.05 * size, -0.10 * gain, profile="bump")


def _pat_azygos(cv, pr, rng, an, gain, size):
    """Azygos fissure: a thin curved line with a teardrop at its lower end."""
    p, q = _jit(rng, pr["c"], 0.02)
    cv.curve(((p + 0.02, q - 0.08), (p - 0.06, q), (p, q + 0.09)), 0.016, 0.45 * gain)
    cv.ellipse(p, q + 0.09, 0.022, 0.018, 0.3 * gain, profile="bump")


def _pat_hydro(cv, pr, rng, an, gain, size):
    """Air-fluid level: dark above, bright below a sharp horizontal line."""
    p, q = _jit(rng, pr["c"], 0.025)
    a, b = pr["ab"][0] * size, pr["ab"][1] * size
    win = cv.window(p, q, a, b)
    if win is None:
        return
    sl, dp, dq = win
    inside = np.clip((1 - np.sqrt((dp / a) ** 2 + (dq / b) ** 2)) / 0.2, 0, 1)
    level = rng.uniform(-0.02, 0.03)
    cv.a[sl] += inside * np.where(dq > level, 0.34, -0.14).astype(np.float32) * gain


def _pat_curve(cv, pr, rng, an, gain, size):
    pts = np.asarray(pr["pts"], np.float32) + rng.uniform(-0.02, 0.02, 2).astype(np.float32)
    pts = pts + rng.uniform(-0.01, 0.01, pts.shape).astype(np.float32)
    cv.curve(pts, pr["width"] * rng.uniform(0.9, 1.15), pr["amp"] * gain)


def _pat_streaks(cv, pr, rng, an, gain, size):
    """Subcutaneous emphysema: dark air streaks in the lateral soft tissue, both sides."""
    for side in (0, 1):
        p, q = _jit(rng, pr["c"], 0.015)
        p = p if side == 0 else 1 - p
        for _ in range(rng.integers(4, 7)):
            cv.ellipse(p + rng.normal(0, 0.018), q + rng.normal(0, 0.06), 0.009, 0.05,
                       -0.34 * gain, angle=rng.uniform(-30, 30), edge=0.6)


def _pat_crescent(cv, pr, rng, an, gain, size):
    """Pneumoperitoneum: dark crescent of free air just under the right hemidiaphragm."""
    q_dome = 0.44 + 0.32 * an["lung_r"]  # follows an elevated/lowered diaphragm
    p = pr["c"][0] + rng.uniform(-0.02, 0.02)
    cv.ring(p, q_dome + 0.065, 0.09 * size, 0.022, -0.40 * gain, aspect=0.5, upper_only=True)


def _pat_spurs(cv, pr, rng, an, gain, size):
    """Vertebral osteophytes: bright horizontal spurs along the lower spine."""
    p, q = _jit(rng, pr["c"], 0.015)
    for dq in (-0.06, 0.0, 0.06):
        cv.ellipse(p, q + dq, 0.065 * size, 0.014, 0.36 * gain, edge=0.5)


def _pat_sternotomy(cv, pr, rng, an, gain, size):
    """A vertical chain of sternal wire loops (metal: very bright)."""
    p, q = _jit(rng, pr["c"], 0.015)
    for dq in np.linspace(-0.14, 0.14, 5):
        cv.ring(p + rng.normal(0, 0.004), q + dq, 0.022, 0.011, 0.65 * gain, aspect=0.6)


def _pat_devices(cv, pr, rng, an, gain, size):
    """ECG electrodes (bright discs; the upper-left one always) with their leads."""
    spots = [(0.14, 0.08), (0.86, 0.08), (0.80, 0.86)]
    placed = []
    for i, c in enumerate(spots):
        if i == 0 or rng.random() < 0.7:
            p, q = _jit(rng, c, 0.02)
            cv.ring(p, q, 0.022, 0.022, 0.75 * gain)
            placed.append((p, q))
    for p, q in placed:
        cv.curve(((p, q), (0.5 + rng.normal(0, 0.1), 0.55), (0.5, 1.1)), 0.007, 0.35 * gain)


def _pat_anatomy(cv, pr, rng, an, gain, size):
    """Nothing to draw: applied to the anatomy before it is drawn (see _anatomy)."""


_PATTERN_DRAWERS = {
    "blob": _pat_blob, "pair": _pat_pair, "ring": _pat_ring, "dots": _pat_dots,
    "rings": _pat_rings, "patchy": _pat_patchy, "reticular": _pat_reticular,
    "fracture": _pat_fracture, "emphysema": _pat_emphysema, "azygos": _pat_azygos,
    "hydro": _pat_hydro, "curve": _pat_curve, "streaks": _pat_streaks,
    "crescent": _pat_crescent, "spurs": _pat_spurs, "sternotomy": _pat_sternotomy,
    "devices": _pat_devices, "anatomy": _pat_anatomy,
}


def _draw_pattern(cv: _Canvas, spec: PatternSpec, rng: np.random.Generator, an: dict) -> None:
    """Draw one finding with random jitter of position (~+-0.025), size and contrast (faint
    ones too, so the task is not trivial)."""
    gain = rng.uniform(0.45, 1.15)
    size = rng.uniform(0.85, 1.2)
    _PATTERN_DRAWERS[spec.kind](cv, spec.params, rng, an, gain, size)


def render_image(job: dict) -> np.ndarray:
    """Render one image (job: see _image_jobs) -> 2-D uint16 array of shape (H, W)."""
    H, W = job["shape"]
    rng = np.random.default_rng(job["seed"])
    s = RENDER_SIDE / max(H, W)
    h, w = max(16, round(H * s)), max(16, round(W * s))
    cv = _Canvas(h, w, cx=0.5 + rng.normal(0, 0.015), cy=rng.normal(0, 0.015),
                 sx=rng.uniform(0.9, 1.04), sy=rng.uniform(0.9, 1.04))
    # Like report-derived labels, a labelled finding is sometimes not visible in an image.
    specs = [sp for sp in job["patterns"] if rng.random() >= P_OCCULT]
    an = _anatomy(rng, [sp.params for sp in specs if sp.kind == "anatomy"])
    if any(sp.kind == "emphysema" for sp in specs):
        an["dark"] = 0.04
    _draw_anatomy(cv, rng, an)
    for sp in specs:
        _draw_pattern(cv, sp, rng, an)
    if rng.random() < 0.3:  # burnt-in side marker ("L"/"R") in a top corner
        y0, x0 = int(h * rng.uniform(0.02, 0.06)), int(w * rng.choice([0.04, 0.88]))
        cv.a[y0:y0 + max(2, h // 30), x0:x0 + max(2, w // 30)] = 1.1
    x = np.clip(cv.a / 1.15, 0.0, 1.0) ** np.float32(job["gamma"])
    shrink = h > H  # small images: render finer than the output and average down
    x = cv2.resize(x, (W, H), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    x += rng.standard_normal((H, W), dtype=np.float32) * np.float32(job["noise"])
    lo, hi = job["window"]
    if job["inverted"]:  # MONOCHROME1-like: high stored value = dark
        x = 1.0 - x
    vals = np.float32(lo) + np.float32(hi - lo) * x
    return np.clip(np.rint(vals), 0, 2 ** job["bits"] - 1).astype(np.uint16)


def _write_image(job: dict) -> str:
    img = render_image(job)
    ok = cv2.imwrite(job["path"], img, [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                        cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise OSError(f"{job['path']}: cv2.imwrite failed")
    return job["path"]


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core; no thread oversubscription


# ----------------------------------------------------------------------------------------
# Cohort: patients, studies, images, IDs
# ----------------------------------------------------------------------------------------

@dataclass
class Study:
    split: str  # "train" | "test"
    patient_id: str  # Excel float form, shared by colliding patients
    patient: int  # internal patient number (distinct per real patient)
    date: str  # yyyymmdd
    image_ids: list[str]
    removed: bool = False  # an extra training study listed in Removal.csv
    labels: set = field(default_factory=set)
    distractor: int = -1  # index into DISTRACTORS, -1 = none


class _IdMaker:
    """Unique ImageIDs and PatientID strings in the real shapes."""

    ALNUM = string.ascii_lowercase + string.digits

    def __init__(self, rng: np.random.Generator, pyrng: random.Random):
        self.rng, self.py = rng, pyrng
        self.images: set[str] = set()
        self.studies: set[str] = set()
        self.patient_ids: set[str] = set()

    def patient_id(self) -> str:
        """A new PatientID string: "%.2E" of a random 128-bit patient number."""
        while True:
            s = f"{self.py.randrange(10 ** 37, 2 ** 128):.2E}"
            if s not in self.patient_ids:
                self.patient_ids.add(s)
                return s

    def study_images(self, n: int) -> list[str]:
        r = self.rng.random()
        if r < 0.05:  # older export: 45-digit UID + series-number suffix
            while (sid := self._digits(45)) in self.studies:
                pass
            self.studies.add(sid)
            a, b = self.rng.integers(0, 2), self.rng.integers(0, 1000)
            c = int(self.rng.integers(0, 900))
            ids = []
            for _ in range(n):
                c += int(self.rng.integers(1, 6))
                ids.append(f"{sid}_{a:02d}-{b:03d}-{c:03d}.png")
            self.images.update(ids)
            return ids
        ndig = 38 if r < 0.13 else 39
        while (sid := self._digits(ndig)) in self.studies:
            pass
        self.studies.add(sid)
        ids = []
        for i in range(n):
            mid = "_2" if (i > 0 and self.rng.random() < 0.08) else ""
            while (iid := f"{sid}{mid}_{self._alnum(6)}.png") in self.images:
                pass
            self.images.add(iid)
            ids.append(iid)
        return ids

    def _digits(self, n: int) -> str:
        return str(self.py.randrange(10 ** (n - 1), 10 ** n))

    def _alnum(self, n: int) -> str:
        return "".join(self.py.choice(self.ALNUM) for _ in range(n))


def _random_date(rng: np.random.Generator) -> str:
    d0, d1 = dt.date(2009, 1, 1).toordinal(), dt.date(2017, 12, 31).toordinal()
    return dt.date.fromordinal(int(rng.integers(d0, d1 + 1))).strftime("%Y%m%d")


def _make_split(ids: _IdMaker, rng, split: str, n_images: int, first_patient: int) -> list[Study]:
    """Whole PatientID groups (1 patient, or 2 colliding ones) until exactly n_images images."""
    studies: list[Study] = []
    left = n_images
    patient = first_patient
    while left > 0:
        pid = ids.patient_id()
        # a collision: a second, distinct patient whose number rounds to the same "%.2E" string
        for _ in range(2 if rng.random() < COLLISION_RATE else 1):
            for _ in range(int(rng.choice(STUDIES_PER_PATIENT[0], p=STUDIES_PER_PATIENT[1]))):
                k = min(left, int(rng.choice(IMAGES_PER_STUDY[0], p=IMAGES_PER_STUDY[1])))
                if k == 0:
                    break
                studies.append(Study(split, pid, patient, _random_date(rng), ids.study_images(k)))
                left -= k
            patient += 1
    return studies


def _mark_removal(rng, studies: list[Study], n_train: int) -> None:
    """Flag whole training studies as extra Removal entries until ~REMOVAL_FRACTION of images."""
    target = max(1, round(REMOVAL_FRACTION * n_train))
    train = [s for s in studies if s.split == "train"]
    got = 0
    for i in rng.permutation(len(train)):
        if got >= target:
            break
        train[i].removed = True
        got += len(train[i].image_ids)


# ----------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------

def label_fractions(labels: list[str]) -> dict[str, float]:
    """Target positive rate per label: CXR-LT 2026 profile for its labels, else a generic
    geometric long tail (15% down to 0.4%, in file order) with 30% for a Normal label."""
    if all(lab in CXRLT2026_APPROX_COUNTS for lab in labels):
        return {lab: CXRLT2026_APPROX_COUNTS[lab] / CXRLT2026_TOTAL_IMAGES for lab in labels}
    findings = [lab for lab in labels if not is_normal_label(lab)]
    k = max(1, len(findings) - 1)
    out = {lab: 0.15 * (0.004 / 0.15) ** (i / k) for i, lab in enumerate(findings)}
    out.update({lab: 0.30 for lab in labels if is_normal_label(lab)})
    return out


def _sample_labels(rng, studies: list[Study], labels: list[str]) -> None:
    """Noisy-OR network over studies: parents first, each child's base rate solved so its
    overall rate stays on target; Normal then goes to part of the finding-free studies."""
    frac = label_fractions(labels)
    findings = [lab for lab in labels if not is_normal_label(lab)]
    rules = {c: [(p, w) for p, w in ps if p in findings] for c, ps in CORRELATIONS.items()
             if c in findings}
    order = list(graphlib.TopologicalSorter(
        {lab: [p for p, _ in rules.get(lab, [])] for lab in findings}).static_order())
    n = len(studies)
    pos = {lab: np.zeros(n, bool) for lab in findings}
    for lab in order:
        keep = np.ones(n)  # prod(1 - w) over positive parents
        for parent, w in rules.get(lab, []):
            keep *= np.where(pos[parent], 1.0 - w, 1.0)
        base = float(np.clip(1.0 - (n - frac[lab] * n) / keep.sum(), 0.0, 1.0))
        pos[lab] = rng.random(n) < 1.0 - (1.0 - base) * keep
    for i, st in enumerate(studies):
        st.labels = {lab for lab in findings if pos[lab][i]}
    normals = [lab for lab in labels if is_normal_label(lab)]
    empty = [st for st in studies if not st.labels]
    if normals and empty:
        p_norm = min(1.0, frac[normals[0]] * n / len(empty))
        for st in empty:
            if rng.random() < p_norm:
                st.labels = {normals[0]}


def _counted_images(st: Study) -> int:
    """Images of a study that count towards the minimums (kept train images / test images)."""
    return 0 if st.removed else len(st.image_ids)


def _enforce_minimums(rng, studies: list[Study], labels: list[str]) -> None:
    """Give each label MIN_POS_TRAIN / MIN_POS_TEST positive images per split by adding it to
    random studies: studies with findings first, then unlabelled ones, Normal ones last."""
    for split, need in (("train", MIN_POS_TRAIN), ("test", MIN_POS_TEST)):
        pool = [st for st in studies if st.split == split and _counted_images(st) > 0]
        for lab in labels:
            have = sum(_counted_images(st) for st in pool if lab in st.labels)
            normal = is_normal_label(lab)
            cands = [st for st in pool if lab not in st.labels]
            if normal:  # Normal can only go to finding-free studies
                cands = [st for st in cands if not st.labels]
            tier = [0 if (st.labels and not _is_normal_study(st)) else 1 if not st.labels else 2
                    for st in cands]
            perm = rng.permutation(len(cands))
            for j in sorted(perm, key=lambda j: tier[j]):
                if have >= need:
                    break
                st = cands[j]
                if not normal and _is_normal_study(st):
                    if sum(_counted_images(s) for s in pool if _is_normal_study(s)) \
                            - _counted_images(st) < need:
                        continue  # would take Normal below its own minimum
                    st.labels = set()
                st.labels.add(lab)
                have += _counted_images(st)
            if have < need:
                raise InputError(f"--n-{split} is too small to give label '{lab}' {need} "
                                 f"positive images in {split}; use a larger --n-{split}")


def _add_distractors(rng, studies: list[Study]) -> None:
    for st in studies:
        p = P_DISTRACTOR_UNLABELLED if not st.labels else \
            0.0 if _is_normal_study(st) else P_DISTRACTOR_ABNORMAL
        if rng.random() < p:
            st.distractor = int(rng.integers(len(DISTRACTORS)))


def _is_normal_study(st: Study) -> bool:
    return any(is_normal_label(lab) for lab in st.labels)


# ----------------------------------------------------------------------------------------
# Images and CSVs
# ----------------------------------------------------------------------------------------

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


def _image_jobs(rng, studies: list[Study], labels: list[str], image_dir: Path, seed: int,
                min_side: int, max_side: int) -> list[dict]:
    specs = patterns_for(labels)
    jobs = []
    for st in studies:
        pats = [specs[lab] for lab in labels if lab in st.labels and lab in specs]
        if st.distractor >= 0:
            pats.append(DISTRACTORS[st.distractor])
        for iid in st.image_ids:
            bits, window = _export_window(rng)
            jobs.append(dict(
                path=str(image_dir / iid), image_id=iid, shape=_image_size(rng, min_side, max_side),
                seed=[seed, 7, len(jobs)], patterns=pats, bits=bits, window=window,
                gamma=float(rng.uniform(0.8, 1.25)), noise=float(rng.uniform(0.002, 0.006)),
                inverted=False))
    n_inv = max(1, round(INVERTED_FRACTION * len(jobs)))
    for i in rng.choice(len(jobs), n_inv, replace=False):
        jobs[i]["inverted"] = True
    return jobs


def _rows(studies, with_labels: list[str] | None, empty_cols: int = 0) -> list[tuple]:
    """(ImageID, line) for every image of `studies`, sorted by ImageID."""
    out = []
    for st in studies:
        tail = ""
        if with_labels is not None:
            tail = "," + ",".join("1" if lab in st.labels else "0" for lab in with_labels)
        tail += "," * empty_cols
        for iid in st.image_ids:
            out.append((iid, f"{iid},{st.date},{st.patient_id}{tail}"))
    return sorted(out)


def _write_csvs(root: Path, studies: list[Study], labels: list[str]) -> None:
    train = [st for st in studies if st.split == "train"]
    test = [st for st in studies if st.split == "test"]
    removal = test + [st for st in train if st.removed]
    ids = ",".join(ID_COLUMNS)
    lab_header = ids + "," + ",".join(labels)

    def write(name, header, rows, final_newline=True):
        text = "\n".join([header] + [line for _, line in rows]) + ("\n" if final_newline else "")
        (root / name).write_bytes(text.encode("utf-8"))

    write("train.csv", lab_header, _rows(train, labels))
    write(TEST_LIST_NAME, ids + "," * len(labels), _rows(test, None, len(labels)), False)
    write("Removal.csv", ids, _rows(removal, None), False)
    write("test_labels.csv", lab_header, _rows(test, labels))


# ----------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------

def _check_args(n_train, n_test, min_side, max_side, labels) -> None:
    if n_train < 40:
        raise InputError(f"--n-train must be at least 40 (got {n_train})")
    if n_test < 10:
        raise InputError(f"--n-test must be at least 10 (got {n_test})")
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


def _load_existing(out: Path) -> dict | None:
    marker = out / MARKER_NAME
    if not marker.is_file() or not (out / "train.csv").is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def generate(out_dir, n_train: int = 1500, n_test: int = 300, seed: int = 0,
             min_side: int = 256, max_side: int = 640, labels: list[str] | None = None,
             force: bool = False, workers: int | None = None, progress: bool = True) -> dict:
    """Write the demo dataset to `out_dir` (see the module docstring) and return its summary.

    If `out_dir` already holds a complete dataset it is left alone (summary["skipped"] is True)
    unless force=True. Same arguments -> byte-identical files, whatever `workers` is.
    """
    t0 = time.perf_counter()
    labels = list(CXRLT2026_LABELS if labels is None else labels)
    _check_args(n_train, n_test, min_side, max_side, labels)
    if seed < 0:
        raise InputError(f"--seed must be >= 0 (got {seed})")
    out = Path(out_dir)
    existing = _load_existing(out)
    if existing is not None and not force:
        print(f"{out}: already holds a complete demo dataset (seed {existing.get('seed')}, "
              f"{existing.get('n_train')} train / {existing.get('n_test')} test images); "
              f"nothing to do (--force regenerates it)")
        return dict(existing, skipped=True)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not a complete demo dataset; "
                         f"use --force to replace it")

    rng = np.random.default_rng([seed, 1])
    ids = _IdMaker(rng, random.Random(seed * 1_000_003 + 17))
    studies = _make_split(ids, rng, "test", n_test, 0)
    studies += _make_split(ids, rng, "train", n_train, max(s.patient for s in studies) + 1)
    _mark_removal(rng, studies, n_train)
    _sample_labels(rng, studies, labels)
    _enforce_minimums(rng, studies, labels)
    _add_distractors(rng, studies)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        jobs = _image_jobs(rng, studies, labels, tmp / "images", seed, min_side, max_side)
        _render_all(jobs, workers or _default_workers(), progress)
        _write_csvs(tmp, studies, labels)
        summary = _summary(studies, labels, jobs, seed, min_side, max_side)
        (tmp / MARKER_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = dict(summary, skipped=False, seconds=round(time.perf_counter() - t0, 2))
    return summary


def _render_all(jobs: list[dict], workers: int, progress: bool) -> None:
    bar = tqdm(total=len(jobs), desc="demo images", unit="img", disable=not progress)
    if workers <= 1:
        for job in jobs:
            _write_image(job)
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # safe even if the caller holds threads
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as ex:
            for _ in ex.map(_write_image, jobs, chunksize=16):
                bar.update()
    bar.close()


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _summary(studies, labels, jobs, seed, min_side, max_side) -> dict:
    def counts(sel):
        return {lab: sum(len(st.image_ids) for st in sel if lab in st.labels) for lab in labels}

    train = [st for st in studies if st.split == "train"]
    test = [st for st in studies if st.split == "test"]
    kept = [st for st in train if not st.removed]
    return dict(
        generator="cxrlt.demo_data", format_version=FORMAT_VERSION, seed=seed,
        min_side=min_side, max_side=max_side, labels=labels,
        n_train=sum(len(s.image_ids) for s in train), n_test=sum(len(s.image_ids) for s in test),
        n_removal_extra=sum(len(s.image_ids) for s in train if s.removed),
        n_studies=len(studies), n_patients=len({s.patient for s in studies}),
        n_patient_ids=len({s.patient_id for s in studies}),
        n_unlabelled_images=sum(len(s.image_ids) for s in studies if not s.labels),
        positives_train_kept=counts(kept), positives_test=counts(test),
        positives_train_all=counts(train),
        inverted=sorted(j["image_id"] for j in jobs if j["inverted"]),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlt.demo_data",
                                 description="Write a synthetic dataset in the CXR-LT 2026 layout.")
    ap.add_argument("--out", required=True, help="output folder (e.g. data/demo)")
    ap.add_argument("--n-train", type=int, default=1500, help="rows of train.csv (default 1500)")
    ap.add_argument("--n-test", type=int, default=300, help="images in the test list (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=256, help="smallest image side in pixels")
    ap.add_argument("--max-side", type=int, default=640, help="largest image side in pixels")
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
    s = generate(args.out, args.n_train, args.n_test, args.seed, args.min_side, args.max_side,
                 labels, force=args.force, workers=args.workers)
    if not s["skipped"]:
        print(f"{args.out}: {s['n_train']} train images ({s['n_removal_extra']} also in "
              f"Removal.csv), {s['n_test']} test images, {len(s['labels'])} labels, "
              f"{s['n_patients']} patients / {s['n_patient_ids']} PatientIDs, "
              f"{s['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    # Run through the package module so worker processes unpickle cxrlt.demo_data objects.
    from cxrlt.cli import main_wrapper
    from cxrlt.demo_data import main as _main

    main_wrapper(_main)
