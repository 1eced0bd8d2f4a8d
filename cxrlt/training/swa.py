"""Stochastic weight averaging (Izmailov et al. 2018) of the last k epochs' weights.

With cfg swa_epochs = k > 0 the trainer adds the training weights at the end of each of the
epochs epochs-k ... epochs-1 (the window) to an equal-weight running mean: after n of them every
floating tensor of the state dict is the plain mean of those n epochs' tensors (integer
buffers, e.g. BatchNorm's num_batches_tracked, are the last epoch's). The mean is part of
last.pt ("swa": the epochs it holds and the mean), so a resumed run averages the same weights.
When the window moves (epochs raised after the run finished) the epochs of the old window are
dropped and the mean starts again in the new one.

BatchNorm: the running statistics of averaged weights are not the average of the statistics
(they depend on the weights non-linearly), so when the model has BatchNorm layers they are
recomputed with the averaged weights on the training batches of the last epoch: running
statistics reset, momentum None (a cumulative average over the batches), a forward pass in
train mode without gradients (recompute_bn; as torch.optim.swa_utils.update_bn). Under DDP every
rank recomputes on its share and the statistics are averaged across ranks. A model without
BatchNorm (ConvNeXt: LayerNorm) keeps the averaged tensors as they are.

The trainer evaluates the SWA weights on the val fold like an epoch and writes swa.pt; what
model.pt then holds is cfg swa_model (cxrlt/training/trainer.py, docs/augmentation.md).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def window(epochs: int, k: int) -> range:
    """The (0-based) epochs whose end-of-epoch weights SWA averages."""
    return range(max(0, epochs - k), epochs)


class SWA:
    def __init__(self, k: int):
        self.k = int(k)
        self.epochs: list[int] = []
        self.mean: dict[str, torch.Tensor] | None = None

    def add(self, model: nn.Module, epoch: int, total_epochs: int) -> bool:
        """Add model's weights at the end of `epoch` when it is in the window of a run of
        `total_epochs` epochs; -> whether it was added."""
        win = window(total_epochs, self.k)
        if epoch not in win:
            return False
        if any(e not in win or e >= epoch for e in self.epochs):  # another window (or a redone epoch)
            self.epochs, self.mean = [], None
        sd = model.state_dict()
        n = len(self.epochs)
        with torch.no_grad():
            if self.mean is None:
                self.mean = {k: v.detach().clone() for k, v in sd.items()}
            else:
                for k, v in sd.items():
                    m = self.mean[k]
                    if m.device != v.device:  # a mean read from last.pt (on the CPU), a model on a GPU
                        m = self.mean[k] = m.to(v.device)
                    if m.dtype.is_floating_point:
                        m.add_(v.detach().to(m.dtype) - m, alpha=1.0 / (n + 1))  # running mean of n + 1
                    else:
                        m.copy_(v)
        self.epochs.append(int(epoch))
        return True

    def averaged(self, model: nn.Module) -> nn.Module:
        """A copy of `model` holding the averaged weights (eval mode)."""
        if self.mean is None:
            raise RuntimeError("SWA: no epoch averaged yet")
        out = copy.deepcopy(model)
        out.load_state_dict(self.mean)
        return out.eval()

    def state_dict(self) -> dict:
        return {"k": self.k, "epochs": list(self.epochs), "mean": self.mean}

    def load_state_dict(self, sd: dict) -> None:
        self.epochs = [int(e) for e in sd.get("epochs", [])]
        self.mean = sd.get("mean")
        if not self.epochs:
            self.mean = None


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_bn(model: nn.Module, batches) -> int:
    """Recompute the running statistics of model's BatchNorm layers over `batches` (model
    inputs): the equal-weight average of the batches' means and (unbiased) variances. Returns
    the number of batches seen (0 and nothing changed when the model has no BatchNorm)."""
    bns = batchnorms(model)
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    n = 0
    for x in batches:
        model(x)
        n += 1
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.train(was_training)
    return n
