"""Exponential moving average of a model's weights, as the trainer keeps it (config ema_decay).

Ours rather than timm.utils.ModelEmaV3: the state is only (steps, module), so a resume is exact,
and the update is one fused foreach lerp over every float tensor; restart() serves the head phase.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """Exponential moving average of a model's weights (float tensors averaged, others copied).

    ema <- d * ema + (1 - d) * w after every optimizer step, with the decay ramped up as
    d = min(decay, (1 + step) / (10 + step)) so that early, random weights are forgotten quickly
    (with decay 0.9999 the horizon is ~10k optimizer steps). One fused foreach lerp per update.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        src, dst = model.state_dict(), self.module.state_dict()  # tensors sharing the weights' storage
        floats = [k for k, v in dst.items() if v.dtype.is_floating_point]
        self._avg, self._src = [dst[k] for k in floats], [src[k] for k in floats]
        self._copy = [(dst[k], src[k]) for k in dst if k not in set(floats)]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        torch._foreach_lerp_(self._avg, self._src, 1.0 - d)  # avg + (1-d)(w - avg) = d avg + (1-d) w
        for a, b in self._copy:
            a.copy_(b)

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average afresh from the current weights (decay ramp from step 0)."""
        self.steps = 0
        torch._foreach_copy_(self._avg, self._src)
        for a, b in self._copy:
            a.copy_(b)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "module": self.module.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.steps = int(sd["steps"])
        self.module.load_state_dict(sd["module"])  # in place: the lerp lists stay valid
