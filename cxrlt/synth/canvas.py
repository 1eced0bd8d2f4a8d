"""The drawing surface: an attenuation map addressed in chest coordinates, with the primitive
shapes (ellipse, ring, curve) every pattern and the anatomy are drawn from.

Every local change goes through Canvas.add, which also grows the bounding box of the cells
it changed while a recording is open (Canvas.record): that box is where a finding was drawn.
"""

from __future__ import annotations

import numpy as np


class Canvas:
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
        self.box: list[int] | None = None  # [y0, x0, y1, x1] of the cells changed (recording)

    def record(self) -> None:
        """Start recording the box of the cells the next drawing changes (see `recorded`)."""
        self.box = [self.a.shape[0], self.a.shape[1], 0, 0]

    def recorded(self) -> tuple[int, int, int, int] | None:
        """Stop recording; (y0, x0, y1, x1) grid box (end-exclusive) of what changed, or None."""
        box, self.box = self.box, None
        return None if box is None or box[2] <= box[0] else tuple(box)

    def add(self, sl: tuple[slice, slice], delta: np.ndarray) -> None:
        """a[sl] += delta, recording the rows/columns where delta is not zero."""
        self.a[sl] += delta
        if self.box is None:
            return
        nz = np.abs(np.broadcast_to(delta, self.a[sl].shape)) > 1e-6
        rows, cols = np.flatnonzero(nz.any(axis=1)), np.flatnonzero(nz.any(axis=0))
        if len(rows):
            b = self.box
            b[0] = min(b[0], sl[0].start + rows[0])
            b[1] = min(b[1], sl[1].start + cols[0])
            b[2] = max(b[2], sl[0].start + rows[-1] + 1)
            b[3] = max(b[3], sl[1].start + cols[-1] + 1)

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
        win = self.ellipse_window(pc, qc, a, b, angle, profile, edge, power)
        if win is not None:
            sl, m = win
            self.add(sl, (amp - self.a[sl]) * m if fill else amp * m)

    def ellipse_mask(self, *args, **kw) -> np.ndarray:
        """The 0..1 mask of `ellipse` (same arguments less amp/fill) over the whole grid."""
        out = np.zeros_like(self.a)
        win = self.ellipse_window(*args, **kw)
        if win is not None:
            out[win[0]] = win[1]
        return out

    def ellipse_window(self, pc, qc, a, b, angle=0.0, profile="flat", edge=0.3, power=2.0):
        """(slices, 0..1 mask on them) of an ellipse (see `ellipse`); None if off the grid."""
        rad = max(a, b)
        win = self.window(pc, qc, rad, rad)
        if win is None:
            return None
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
        return sl, m

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
        self.add(sl, amp * m)

    def curve(self, pts, width, amp):
        """A line of `width` (half-width at zero) through `pts` (a smooth quadratic B-spline
        for 3+ points, a segment for 2)."""
        pts = smooth_polyline(np.asarray(pts, np.float32))
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
        self.add(sl, amp * np.clip(1.0 - np.sqrt(dmin) / width, 0.0, 1.0))


def smooth_polyline(pts: np.ndarray, n: int = 12) -> np.ndarray:
    if len(pts) < 3:
        return pts
    out = [pts[0]]
    for i in range(1, len(pts) - 1):  # quadratic Bezier through the midpoints
        a = (pts[i - 1] + pts[i]) / 2 if i > 1 else pts[0]
        c = (pts[i] + pts[i + 1]) / 2 if i < len(pts) - 2 else pts[-1]
        t = np.linspace(0, 1, n, dtype=np.float32)[1:, None]
        out.extend((1 - t) ** 2 * a + 2 * (1 - t) * t * pts[i] + t ** 2 * c)
    return np.asarray(out, np.float32)
