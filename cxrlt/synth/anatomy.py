"""The chest without findings, frontal (PA / AP) or lateral: body, lungs, heart, mediastinum,
spine, ribs, diaphragm domes and smooth random variation, from per-image anatomy parameters
that the 'anatomy' findings (cardiomegaly, effusion, hyperinflation, ...) change before it
is drawn."""

from __future__ import annotations

import cv2
import numpy as np

from cxrlt.synth.canvas import Canvas


def base_anatomy(rng: np.random.Generator, projection: str) -> dict:
    """Per-image anatomy parameters of a chest without findings. AP films (bedside, supine)
    magnify the heart and catch a shallower breath."""
    an = dict(heart=float(rng.uniform(0.93, 1.07)),
              lung_r=float(rng.uniform(0.95, 1.05)), lung_l=float(rng.uniform(0.95, 1.05)),
              fluid_r=0.0, fluid_l=0.0)
    if projection in ("AP", "AP_horizontal"):
        an["heart"] *= 1.08
        an["lung_r"] *= 0.95
        an["lung_l"] *= 0.95
    return an


def anatomy_change(params: dict, rng: np.random.Generator) -> dict:
    """The change one 'anatomy' finding makes (its PatternSpec params, with random degree and
    side): {key: factor} for heart / lung_* (multiplied), {fluid_*: level} (set)."""
    ch: dict[str, float] = {}
    if "heart" in params:
        ch["heart"] = params["heart"] * rng.uniform(0.95, 1.08)
    if "lungs" in params:
        ch["lung_r"] = ch["lung_l"] = params["lungs"] * rng.uniform(0.96, 1.04)
    if "elevate" in params:
        side = "lung_r" if rng.random() < 0.7 else "lung_l"
        ch[side] = params["elevate"] * rng.uniform(0.95, 1.05)
    if "fluid" in params:
        sides = [["fluid_r", "fluid_l"], ["fluid_r"], ["fluid_l"]][rng.choice(3, p=[0.5, 0.3, 0.2])]
        for sd in sides:
            ch[sd] = params["fluid"] * rng.uniform(0.8, 1.3)
    return ch


def apply_changes(an: dict, changes: list[dict]) -> dict:
    out = dict(an)
    for ch in changes:
        for k, v in ch.items():
            out[k] = v if k.startswith("fluid") else out[k] * v
    return out


def draw_anatomy(cv: Canvas, rng: np.random.Generator, an: dict, view: str) -> None:
    """The chest without findings, as a frontal or a lateral view."""
    (draw_lateral if view == "lateral" else draw_frontal)(cv, rng, an)


def anatomy_masks(cv: Canvas, an: dict, view: str) -> list[np.ndarray]:
    """The 0..1 masks of the parts the anatomy parameters shape (lungs, heart), over the whole
    grid. Two anatomies differ exactly where these do: that is an anatomy finding's box."""
    return (_lateral_masks if view == "lateral" else _frontal_masks)(cv, an)


def _frontal_masks(cv: Canvas, an: dict) -> list[np.ndarray]:
    hs = an["heart"]
    return [_lung(cv, 0.31, 0.44, 0.16, 0.31, 0.32 * an["lung_r"], an["fluid_r"]),
            _lung(cv, 0.69, 0.45, 0.15, 0.30, 0.31 * an["lung_l"], an["fluid_l"]),
            cv.ellipse_mask(0.55 + 0.03 * (hs - 1), 0.655, 0.145 * hs, 0.115 * min(hs, 1.15),
                            angle=-15, edge=0.15)]


def _lung(cv: Canvas, pc, qc, a, b_top, b_bot, fluid) -> np.ndarray:
    """A lung field mask: pear-shaped (narrow apex), lower edge = diaphragm dome. `fluid` > 0
    fills the base up to that height, with a meniscus rising laterally."""
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
    return m.astype(np.float32)


def draw_frontal(cv: Canvas, rng: np.random.Generator, an: dict) -> None:
    p = cv.p[None, :]
    q = cv.q[:, None]
    cv.a += 0.04  # air outside the body
    cv.ellipse(0.5, 0.62, 0.47, 0.76, 0.40, edge=0.08, power=3.0)  # torso (squarish)
    cv.a += np.float32(0.07) * np.clip(q, 0, 1.2) * (cv.a > 0.2)  # abdomen denser than neck
    rib = 0.5 + 0.5 * np.sin(2 * np.pi * (q * 8.5 + 1.8 * (p - 0.5) ** 2 + rng.uniform(0, 1)))
    marks = cv2.resize(rng.uniform(0, 1, (14, 14)).astype(np.float32),
                       (cv.a.shape[1], cv.a.shape[0]), interpolation=cv2.INTER_CUBIC)
    m_r, m_l, heart = _frontal_masks(cv, an)
    lungs = m_r + m_l
    cv.a -= np.float32(0.31) * lungs
    # ribs, vascular markings and denser bases over the lung fields
    cv.a += ((0.045 * rib + 0.05 * marks + 0.07 * np.clip(q, 0, 1)) * lungs).astype(np.float32)
    hil = np.exp(-(((p - 0.40) ** 2 + (q - 0.44) ** 2) / 0.02)) + \
        np.exp(-(((p - 0.62) ** 2 + (q - 0.44) ** 2) / 0.02))
    cv.a += (0.07 * hil * lungs).astype(np.float32)  # vessels fan out from the hila
    cv.a += (np.float32(0.47) - cv.a) * heart
    cv.ellipse(0.50, 0.30, 0.055, 0.30, 0.46, edge=0.4, fill=True)  # upper mediastinum
    cv.ellipse(0.57, 0.29, 0.045, 0.045, 0.47, edge=0.3, fill=True)  # aortic knob
    spine = 0.7 + 0.3 * np.sin(2 * np.pi * q * 13)
    band = np.clip(1.0 - np.abs(p - 0.5) / 0.032, 0.0, 1.0)
    cv.a += (0.07 * spine * band * np.clip(q / 0.3, 0, 1)).astype(np.float32)
    for side in (-1, 1):  # clavicles
        cv.ellipse(0.5 + side * 0.17, 0.13, 0.16, 0.02, 0.14, angle=side * 12, edge=0.5)
    _variation(cv, rng)


def _lateral_masks(cv: Canvas, an: dict) -> list[np.ndarray]:
    hs = an["heart"]
    return [_lateral_lung(cv, 0.33 * an["lung_r"], an["fluid_r"]),
            _lateral_lung(cv, 0.32 * an["lung_l"], an["fluid_l"]),
            cv.ellipse_mask(0.34 - 0.02 * (hs - 1), 0.65, 0.17 * hs, 0.15 * min(hs, 1.15),
                            angle=25, edge=0.15)]


def _lateral_lung(cv: Canvas, b_bot: float, fluid: float) -> np.ndarray:
    """One lung seen from the side (mask 0..1): narrow apex, deep base whose diaphragm dome
    slopes down posteriorly (the posterior costophrenic recess); `fluid` fills that recess
    first, with a meniscus rising posteriorly."""
    pc, qc, a, b_top = 0.50, 0.44, 0.32, 0.32
    dp = cv.p[None, :] - pc
    dq = cv.q[:, None] - qc
    slope = 1.0 + 0.22 * np.clip(dp / a, -1, 1)
    t = np.clip((dq + b_top) / (b_top + b_bot), 0.0, 1.0)
    a_eff = a * (0.55 + 0.5 * np.sqrt(t))
    b = np.where(dq < 0, b_top, b_bot * slope)
    m = np.clip((1.0 - np.sqrt((dp / a_eff) ** 2 + (dq / b) ** 2)) / 0.12, 0.0, 1.0)
    if fluid > 0:
        level = qc + b_bot * slope - fluid - 0.07 * np.clip(dp / a, 0, 1)
        m = m * (1.0 - 0.85 * np.clip((dq + qc - level) / 0.03, 0.0, 1.0))
    return m.astype(np.float32)


def draw_lateral(cv: Canvas, rng: np.random.Generator, an: dict) -> None:
    """A lateral chest (anterior to the image left): an oval torso under raised arms, both
    lungs superimposed (the band only the lower lung covers shows the other hemidiaphragm as
    a second dome), the heart anterior-inferior, the aortic arch, the trachea, the sternum in
    front and the vertebral bodies behind."""
    p = cv.p[None, :]
    q = cv.q[:, None]
    cv.a += 0.04
    cv.ellipse(0.5, 0.60, 0.45, 0.80, 0.40, edge=0.08, power=2.3)  # torso (oval)
    cv.a += np.float32(0.07) * np.clip(q, 0, 1.2) * (cv.a > 0.2)
    cv.ellipse(0.42, 0.0, 0.14, 0.26, 0.13, angle=-12, edge=0.6)  # raised arms
    rib = 0.5 + 0.5 * np.sin(2 * np.pi * (q * 7.5 - 0.9 * (p - 0.5) + rng.uniform(0, 1)))
    marks = cv2.resize(rng.uniform(0, 1, (14, 14)).astype(np.float32),
                       (cv.a.shape[1], cv.a.shape[0]), interpolation=cv2.INTER_CUBIC)
    m_r, m_l, heart = _lateral_masks(cv, an)
    lungs = 0.5 * (m_r + m_l)
    cv.a -= np.float32(0.36) * lungs
    cv.a += ((0.04 * rib + 0.05 * marks + 0.06 * np.clip(q, 0, 1)) * lungs).astype(np.float32)
    hil = np.exp(-(((p - 0.52) ** 2 + (q - 0.42) ** 2) / 0.015))
    cv.a += (0.07 * hil * lungs).astype(np.float32)
    cv.a += (np.float32(0.47) - cv.a) * heart
    cv.curve(((0.50, -0.05), (0.53, 0.20), (0.57, 0.38)), 0.028, -0.10)  # trachea
    cv.curve(((0.40, 0.52), (0.44, 0.25), (0.58, 0.18), (0.70, 0.30), (0.72, 0.85)),
             0.035, 0.08)  # aortic arch and descending aorta
    cv.ellipse(0.10, 0.34, 0.022, 0.22, 0.12, edge=0.5)  # sternum
    verts = 0.75 + 0.25 * np.sin(2 * np.pi * q * 11)
    band = np.clip(1.0 - np.abs(p - 0.81) / 0.07, 0.0, 1.0) ** 0.5
    cv.a += (0.12 * verts * band * np.clip(q / 0.2, 0, 1)).astype(np.float32)
    _variation(cv, rng)


def _variation(cv: Canvas, rng: np.random.Generator) -> None:
    """Smooth random variation: a tilted gradient and a coarse random field."""
    p = cv.p[None, :]
    q = cv.q[:, None]
    tilt_p, tilt_q = rng.normal(0, 0.03, 2).astype(np.float32)
    cv.a += tilt_p * (p - 0.5) + tilt_q * (q - 0.5)
    field_ = rng.normal(0, 0.025, (5, 5)).astype(np.float32)
    cv.a += cv2.resize(field_, (cv.a.shape[1], cv.a.shape[0]), interpolation=cv2.INTER_CUBIC)
