"""Mixup and cutmix for multi-label training: images and label vectors mixed by one lambda.

A batch (x (B, ...), y (B, C)) is paired with a permutation of itself, x' = x[perm], y' = y[perm]:
  mixup  (Zhang et al. 2018)  x <- lam x + (1 - lam) x',  lam ~ Beta(mixup_alpha, mixup_alpha)
  cutmix (Yun et al. 2019)    a box of x takes x''s pixels; the box has area fraction ~ 1 - lam,
                              lam ~ Beta(cutmix_alpha, cutmix_alpha), its centre uniform, clipped
                              at the border, and lam is then set to 1 - (the clipped box's area
                              fraction), the share of the image that is x's own
and in both cases the labels are y <- lam y + (1 - lam) y' (the same lambda). A label vector of
0/1 targets becomes soft targets in [0, 1]; for the losses of the form y * positive + (1 - y) *
negative (cxrlt/models/losses.py) the loss of a mixed target is exactly lam x the loss against y
plus (1 - lam) x the loss against y' on the mixed image, the usual mixup objective. ldam and db
are refused (config RELATIONS). An unannotated target (NaN) stays NaN where either image's is:
a mixed entry counts only when both images annotate the label.

A batch is mixed with probability mix_prob; with both alphas set, one of the two at random
(half each). Every draw (mix or not, which, lam, the box, the permutation) comes from a
generator seeded by (seed, epoch, batch index in the epoch, rank): a resumed run mixes the same
pairs in the same way.
"""

from __future__ import annotations

import numpy as np
import torch

_STREAM = 0x6D6978  # "mix": keeps these draws apart from the other (seed, epoch, ...) streams


class Mixer:
    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float, seed: int, rank: int = 0):
        self.mixup_alpha, self.cutmix_alpha, self.prob = float(mixup_alpha), float(cutmix_alpha), float(prob)
        self.seed, self.rank = int(seed), int(rank)

    @classmethod
    def from_config(cls, cfg: dict, rank: int = 0) -> Mixer | None:
        """A Mixer when mixup or cutmix is on, else None."""
        if not (cfg["mixup_alpha"] > 0 or cfg["cutmix_alpha"] > 0) or cfg["mix_prob"] <= 0:
            return None
        return cls(cfg["mixup_alpha"], cfg["cutmix_alpha"], cfg["mix_prob"], cfg["seed"], rank)

    def draw(self, epoch: int, batch: int, n: int, h: int, w: int) -> dict | None:
        """The mixing of one batch of n images of h x w: None (not mixed) or {"kind", "lam",
        "perm", "box" (y0, y1, x0, x1) for cutmix}."""
        rng = np.random.default_rng([self.seed, epoch, batch, self.rank, _STREAM])
        if not rng.random() < self.prob:
            return None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            kind = "cutmix" if rng.random() < 0.5 else "mixup"
        else:
            kind = "mixup" if self.mixup_alpha > 0 else "cutmix"
        alpha = self.mixup_alpha if kind == "mixup" else self.cutmix_alpha
        lam = float(rng.beta(alpha, alpha))
        perm = rng.permutation(n)
        out = {"kind": kind, "lam": lam, "perm": perm}
        if kind == "cutmix":
            cut = np.sqrt(1.0 - lam)
            ch, cw = int(round(h * cut)), int(round(w * cut))
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            y0, y1 = np.clip([cy - ch // 2, cy + ch - ch // 2], 0, h)
            x0, x1 = np.clip([cx - cw // 2, cx + cw - cw // 2], 0, w)
            out["box"] = (int(y0), int(y1), int(x0), int(x1))
            out["lam"] = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int):
        """(x, y) of a batch -> the mixed (x, y) (the inputs themselves when it is not mixed)."""
        d = self.draw(epoch, batch, x.shape[0], x.shape[-2], x.shape[-1])
        if d is None:
            return x, y
        return mix(x, y, d)


def mix(x: torch.Tensor, y: torch.Tensor, d: dict):
    """Apply one draw of Mixer.draw to (x (B, ..., H, W), y (B, C)): new tensors."""
    perm = torch.as_tensor(d["perm"], device=x.device)
    lam = d["lam"]
    if d["kind"] == "mixup":
        x = x * lam + x[perm] * (1.0 - lam)
    else:
        y0, y1, x0, x1 = d["box"]
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    y = y * lam + y[perm.to(y.device)] * (1.0 - lam)
    return x, y
