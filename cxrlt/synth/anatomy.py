"""The normal chest: body, lungs, heart, mediastinum, spine, clavicles, ribs, diaphragm domes and
smooth random variation, with the per-image anatomy parameters that 'anatomy' patterns
(cardiomegaly, effusion, hyperinflation, ...) change before it is drawn."""

from __future__ import annotations

import cv2
import numpy as np

from .canvas import Canvas


def anatomy_params(rng: np.random.Generator, mods: list[dict]) -> dict:
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


def draw_lung(cv: Canvas, pc, qc, a, b_top, b_bot, fluid, amp):
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


def draw_anatomy(cv: Canvas, rng: np.random.Generator, an: dict) -> None:
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
    m_r = draw_lung(cv, 0.31, 0.44, 0.16, 0.31, 0.32 * lr, an["fluid_r"], -0.31 - an["dark"])
    m_l = draw_lung(cv, 0.69, 0.45, 0.15, 0.30, 0.31 * ll, an["fluid_l"], -0.31 - an["dark"])
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
