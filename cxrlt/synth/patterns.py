"""What each finding looks like: one PatternSpec per label and one drawing routine per kind.

A PatternSpec names a drawing routine (`kind`) and its parameters in chest coordinates (see
PatternSpec); `patterns_for(labels)` maps any label set onto them (the CXR-LT 2026 labels by
name, common aliases such as NIH's `Effusion`, then the unused patterns, then generic blobs).
DISTRACTORS are findings outside the label set. The routines draw on a canvas.Canvas.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from cxrlt.synth.canvas import Canvas
from cxrlt.synth.labelling import is_normal_label, norm_name


@dataclass(frozen=True)
class PatternSpec:
    """How one label is drawn. Coordinates are chest coordinates: on a frontal image p: 0 =
    image left .. 1 = image right; on a lateral image p: 0 = anterior (image left) .. 1 =
    posterior; q: 0 = lung apices .. ~1 = below the diaphragm in both. Sizes in the same units.

    kind: the drawing routine (see _PATTERN_DRAWERS; 'anatomy' changes the anatomy instead,
    'none' draws nothing); params: its arguments; probe: (p, q, radius, sign): a region whose
    mean windowed intensity is higher (sign +1) or lower (-1) in positive frontal images than
    in negatives, used by the tests and handy for eyeballing; gain: contrast factor;
    lateral: how the same finding projects on a lateral image (weaker, elsewhere, or not at
    all), None on lateral specs themselves.
    """
    kind: str
    params: dict = field(default_factory=dict)
    probe: tuple = (0.5, 0.5, 0.05, 1)
    gain: float = 1.0
    lateral: PatternSpec | None = None


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
    "Emphysema": PatternSpec("emphysema", dict(c=(0.27, 0.20)), (0.33, 0.24, 0.025, 1)),
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
                                          (0.11, 0.60, 0.03, -1)),
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

def _lat(kind: str, gain: float = 0.7, **params) -> PatternSpec:
    return PatternSpec(kind, params, gain=gain)


# How each finding projects on a lateral image (p = depth, anterior at 0): superimposed on
# both lungs, most are fainter; a few show better (kyphosis, a retrocardiac hernia), the
# azygos fissure not at all.
LATERAL: dict[str, PatternSpec] = {
    "aortic elongation": _lat("blob", c=(0.50, 0.24), ab=(0.07, 0.06), amp=0.24),
    "cardiomegaly": _lat("anatomy", heart=1.32),
    "pleural effusion": _lat("anatomy", fluid=0.15),
    "Nodule": _lat("blob", c=(0.45, 0.33), ab=(0.036, 0.036), amp=0.30, jit=0.04),
    "atelectasis": _lat("blob", c=(0.42, 0.57), ab=(0.12, 0.025), amp=0.28, angle=28,
                        profile="flat"),
    "pleural thickening": _lat("blob", c=(0.84, 0.34), ab=(0.025, 0.13), amp=0.26, angle=-6,
                               profile="flat", edge=0.5),
    "aortic atheromatosis": _lat("ring", c=(0.60, 0.20), r=0.04, w=0.016, amp=0.40),
    "Support Devices": _lat("devices", spots=((0.09, 0.14), (0.10, 0.74), (0.88, 0.10))),
    "alveolar pattern": _lat("patchy", c=(0.46, 0.50), ab=(0.11, 0.09), amp=0.30),
    "fracture": _lat("fracture", gain=0.5, c=(0.22, 0.48)),
    "Hernia": _lat("blob", gain=1.0, c=(0.58, 0.70), ab=(0.07, 0.055), amp=-0.30,
                   profile="flat"),
    "Emphysema": _lat("emphysema", c=(0.45, 0.18)),
    "azygos lobe": _lat("none"),
    "Hydropneumothorax": _lat("hydro", c=(0.62, 0.60), ab=(0.12, 0.12)),
    "Kyphosis": _lat("curve", gain=1.1, pts=((0.76, 0.12), (0.90, 0.45), (0.80, 0.86)),
                     width=0.04, amp=0.28),
    "Mass": _lat("blob", c=(0.55, 0.40), ab=(0.085, 0.08), amp=0.34, jit=0.03),
    "Pneumothorax": _lat("blob", gain=0.6, c=(0.55, 0.12), ab=(0.16, 0.07), amp=-0.16,
                         profile="flat", edge=0.1),
    "Subcutaneous Emphysema": _lat("streaks", c=(0.06, 0.55)),
    "pneumoperitoneo": _lat("crescent", c=(0.33, 0.0), dome=0.9),
    "vascular hilar enlargement": _lat("blob", c=(0.52, 0.42), ab=(0.07, 0.06), amp=0.30),
    "vertebral degenerative changes": _lat("spurs", c=(0.73, 0.80), w=0.03),
    "hyperinflated lung": _lat("anatomy", lungs=1.25),
    "interstitial pattern": _lat("reticular", c=(0.55, 0.62), ab=(0.12, 0.09)),
    "central venous catheter": _lat("curve", pts=((0.34, 0.0), (0.40, 0.20), (0.44, 0.46)),
                                    width=0.018, amp=0.65),
    "hypoexpansion": _lat("anatomy", lungs=0.8),
    "bronchiectasis": _lat("rings", c=(0.55, 0.56)),
    "hemidiaphragm elevation": _lat("anatomy", elevate=0.7),
    "sternotomy": _lat("sternotomy", gain=0.9, c=(0.11, 0.36)),
    "calcified densities": _lat("dots", c=(0.45, 0.55), spread=0.035, n=(5, 9), r=0.022, amp=0.7),
}
PATTERNS = {k: replace(v, lateral=LATERAL[k]) for k, v in PATTERNS.items()}


# Findings outside the label set (scoliosis, a thickened minor fissure, a skin fold): drawn in
# most unlabelled studies and some abnormal ones, never in Normal ones, so that `Normal`
# means "no pattern at all" rather than "no pattern of a listed label".
DISTRACTORS = [
    PatternSpec("curve", dict(pts=((0.5, 0.15), (0.45, 0.35), (0.55, 0.6), (0.5, 0.8)),
                              width=0.03, amp=0.2), lateral=_lat("none")),
    PatternSpec("blob", dict(c=(0.30, 0.47), ab=(0.12, 0.01), amp=0.3, profile="flat", edge=0.5),
                lateral=_lat("blob", c=(0.42, 0.47), ab=(0.16, 0.01), amp=0.3, angle=8,
                             profile="flat", edge=0.5)),
    PatternSpec("curve", dict(pts=((0.88, 0.25), (0.80, 0.5), (0.86, 0.75)), width=0.012,
                              amp=-0.22),
                lateral=_lat("curve", pts=((0.06, 0.25), (0.11, 0.5), (0.07, 0.75)), width=0.012,
                             amp=-0.22)),
]

# Name aliases so common label sets (e.g. NIH ChestX-ray14) reuse the matching pattern.
_ALIASES = {"effusion": "pleural effusion", "pleuraleffusion": "pleural effusion",
            "consolidation": "alveolar pattern", "edema": "interstitial pattern",
            "fibrosis": "interstitial pattern", "pleuralthickening": "pleural thickening",
            "pneumoperitoneum": "pneumoperitoneo", "supportdevices": "Support Devices"}


def patterns_for(labels: list[str]) -> dict[str, PatternSpec]:
    """Pattern of every finding in `labels`: the CXR-LT pattern of the same (or aliased) name,
    else the next unused CXR-LT pattern, else a generic blob at a fixed pseudo-random place."""
    by_norm = {norm_name(k): k for k in PATTERNS}
    by_norm.update({k: v for k, v in _ALIASES.items()})
    out: dict[str, PatternSpec] = {}
    used: set[str] = set()
    pending = []
    for lab in labels:
        if is_normal_label(lab):
            continue
        key = by_norm.get(norm_name(lab))
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
    lateral = _lat("blob", **dict(spec, c=(float(r.uniform(0.25, 0.75)), c[1])))
    return PatternSpec("blob", spec, (c[0], c[1], 0.03, int(np.sign(amp))), lateral=lateral)


def _jit(rng, c, s=0.025):
    return c[0] + rng.uniform(-s, s), c[1] + rng.uniform(-s, s)


def _region(cv, pr, rng, size):
    """The grid window of a pattern's ellipse (centre pr["c"] jittered, semi-axes pr["ab"] x
    size) -> (slices, dp, dq, a, b) as Canvas.window gives them plus the semi-axes, or None
    when it falls outside the image."""
    p, q = _jit(rng, pr["c"], 0.025)
    a, b = pr["ab"][0] * size, pr["ab"][1] * size
    win = cv.window(p, q, a, b)
    return None if win is None else (*win, a, b)


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
    region = _region(cv, pr, rng, size)
    if region is None:
        return
    sl, dp, dq, a, b = region
    env = np.clip(1 - (dp / a) ** 2 - (dq / b) ** 2, 0, None) ** 2
    blot = cv2.resize(rng.uniform(0.3, 1.0, (6, 6)).astype(np.float32),
                      (env.shape[1], env.shape[0]), interpolation=cv2.INTER_CUBIC)
    cv.add(sl, pr["amp"] * gain * 1.4 * env * np.clip(blot, 0, 1.2))


def _pat_reticular(cv, pr, rng, an, gain, size):
    """Interstitial pattern: a fine net-like texture."""
    region = _region(cv, pr, rng, size)
    if region is None:
        return
    sl, dp, dq, a, b = region
    env = np.clip(1 - (dp / a) ** 2 - (dq / b) ** 2, 0, None)
    f = 2 * np.pi * rng.uniform(16, 20)
    net = np.maximum(np.cos(f * dp) ** 8, np.cos(f * dq + rng.uniform(0, 6)) ** 8)
    cv.add(sl, 0.30 * gain * env * (0.45 + net))


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
    window), a smaller one opposite."""
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
    region = _region(cv, pr, rng, size)
    if region is None:
        return
    sl, dp, dq, a, b = region
    inside = np.clip((1 - np.sqrt((dp / a) ** 2 + (dq / b) ** 2)) / 0.2, 0, 1)
    level = rng.uniform(-0.02, 0.03)
    cv.add(sl, inside * np.where(dq > level, 0.34, -0.14).astype(np.float32) * gain)


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
    q_dome = 0.44 + 0.32 * an["lung_r"] * pr.get("dome", 1.0)  # follows the diaphragm
    p = pr["c"][0] + rng.uniform(-0.02, 0.02)
    cv.ring(p, q_dome + 0.065, 0.09 * size, 0.022, -0.40 * gain, aspect=0.5, upper_only=True)


def _pat_spurs(cv, pr, rng, an, gain, size):
    """Vertebral osteophytes: bright horizontal spurs along the lower spine."""
    p, q = _jit(rng, pr["c"], 0.015)
    for dq in (-0.06, 0.0, 0.06):
        cv.ellipse(p, q + dq, pr.get("w", 0.065) * size, 0.014, 0.36 * gain, edge=0.5)


def _pat_sternotomy(cv, pr, rng, an, gain, size):
    """A vertical chain of sternal wire loops (metal: very bright)."""
    p, q = _jit(rng, pr["c"], 0.015)
    for dq in np.linspace(-0.14, 0.14, 5):
        cv.ring(p + rng.normal(0, 0.004), q + dq, 0.022, 0.011, 0.65 * gain, aspect=0.6)


def _pat_devices(cv, pr, rng, an, gain, size):
    """ECG electrodes (bright discs; the first one always) with their leads."""
    spots = pr.get("spots", ((0.14, 0.08), (0.86, 0.08), (0.80, 0.86)))
    placed = []
    for i, c in enumerate(spots):
        if i == 0 or rng.random() < 0.7:
            p, q = _jit(rng, c, 0.02)
            cv.ring(p, q, 0.022, 0.022, 0.75 * gain)
            placed.append((p, q))
    for p, q in placed:
        cv.curve(((p, q), (0.5 + rng.normal(0, 0.1), 0.55), (0.5, 1.1)), 0.007, 0.35 * gain)


def _pat_nothing(cv, pr, rng, an, gain, size):
    """'anatomy' (applied to the anatomy before it is drawn, see render) and 'none'."""


_PATTERN_DRAWERS = {
    "blob": _pat_blob, "pair": _pat_pair, "ring": _pat_ring, "dots": _pat_dots,
    "rings": _pat_rings, "patchy": _pat_patchy, "reticular": _pat_reticular,
    "fracture": _pat_fracture, "emphysema": _pat_emphysema, "azygos": _pat_azygos,
    "hydro": _pat_hydro, "curve": _pat_curve, "streaks": _pat_streaks,
    "crescent": _pat_crescent, "spurs": _pat_spurs, "sternotomy": _pat_sternotomy,
    "devices": _pat_devices, "anatomy": _pat_nothing, "none": _pat_nothing,
}


def draw_pattern(cv: Canvas, spec: PatternSpec, rng: np.random.Generator, an: dict) -> None:
    """Draw one finding with random jitter of position (~+-0.025), size and contrast (faint
    ones too, so the task is not trivial)."""
    gain = rng.uniform(0.45, 1.15) * spec.gain
    size = rng.uniform(0.85, 1.2)
    _PATTERN_DRAWERS[spec.kind](cv, spec.params, rng, an, gain, size)
