"""One image from its job: anatomy, findings, noise, export window -> 16-bit PNG.

Kept free of heavy imports: worker processes (spawned) import only this module's tree.
"""

from __future__ import annotations

import cv2
import numpy as np

from .anatomy import anatomy_params, draw_anatomy
from .canvas import Canvas
from .patterns import draw_pattern

P_OCCULT = 0.08  # a labelled finding is not drawn in an image (label noise, as in reports)
RENDER_SIDE = 192  # long side of the low-resolution render before upsampling


def render_image(job: dict) -> np.ndarray:
    """Render one image (job: see _image_jobs) -> 2-D uint16 array of shape (H, W)."""
    H, W = job["shape"]
    rng = np.random.default_rng(job["seed"])
    s = RENDER_SIDE / max(H, W)
    h, w = max(16, round(H * s)), max(16, round(W * s))
    cv = Canvas(h, w, cx=0.5 + rng.normal(0, 0.015), cy=rng.normal(0, 0.015),
                 sx=rng.uniform(0.9, 1.04), sy=rng.uniform(0.9, 1.04))
    # Like report-derived labels, a labelled finding is sometimes not visible in an image.
    specs = [sp for sp in job["patterns"] if rng.random() >= P_OCCULT]
    an = anatomy_params(rng, [sp.params for sp in specs if sp.kind == "anatomy"])
    if any(sp.kind == "emphysema" for sp in specs):
        an["dark"] = 0.04
    draw_anatomy(cv, rng, an)
    for sp in specs:
        draw_pattern(cv, sp, rng, an)
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


def write_image(job: dict) -> str:
    img = render_image(job)
    ok = cv2.imwrite(job["path"], img, [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                        cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise OSError(f"{job['path']}: cv2.imwrite failed")
    return job["path"]


def worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core; no thread oversubscription
