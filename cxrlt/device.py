"""Where tensors run: the device a stage uses and its mixed-precision context.

`pick_device("auto")` is the local GPU (cuda:<local_rank> under torchrun) when one is present,
else the CPU. Asking for a GPU that is not there is a user mistake, not a crash: InputError.
`autocast_ctx(device, amp)` is bf16 autocast on a GPU when amp is on; a no-op elsewhere (CPU
runs are always fp32, so CPU tests and GPU runs compute the same maths).
"""

from __future__ import annotations

import contextlib

import torch

from .errors import InputError


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device ('cuda' means cuda:<local_rank>)."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"device '{name}': not a device name (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device '{name}': no CUDA GPU is available here (use --device cpu or auto)")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise InputError(f"device '{name}': only {torch.cuda.device_count()} GPU(s) present")
    elif dev.type != "cpu":
        raise InputError(f"device '{name}': only cpu and cuda devices are supported")
    return dev


def autocast_ctx(device: torch.device, amp: bool):
    """bf16 autocast on a GPU when amp is on, else a no-op context."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
