"""Where tensors run: the device a stage uses and its mixed-precision context.

`pick_device("auto")` is the local GPU (cuda:<local_rank> under torchrun) when one is present,
else the CPU. Asking for a GPU that is not there is a user mistake, not a crash: InputError.
`autocast_ctx(device, amp)` is bf16 autocast on a GPU when amp is on; a no-op elsewhere (CPU
runs are always fp32, so CPU tests and GPU runs compute the same maths).
"""

from __future__ import annotations

import contextlib

import torch

from cxrlt.core.errors import InputError


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for config key `device` (auto | cpu | cuda | cuda:N; 'cuda' means
    cuda:<local_rank>); InputError when the name is not one of those or names a GPU this machine
    does not have."""
    from cxrlt.core.config import coerce

    name = coerce("device", name, "--device")
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                         f"use --device cpu or auto")
    dev = torch.device(f"cuda:{local_rank}") if dev.index is None else dev
    if dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def autocast_ctx(device: torch.device, amp: bool):
    """bf16 autocast on a GPU when amp is on, else a no-op context."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_cuda_fast_paths(device: torch.device) -> None:
    """On a GPU: cuDNN picks the fastest convolution for the (fixed) input size, and the fp32 parts
    (the heads, LayerNorm's reductions) may use TF32 tensor cores. Nothing changes on the CPU."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def optimizer_kwargs(device: torch.device) -> dict:
    """Extra AdamW arguments for the device: the fused CUDA kernel (one launch for all parameters,
    ~2-3% of a ConvNeXt step) on a GPU; the default foreach implementation elsewhere."""
    return {"fused": True} if device.type == "cuda" else {}
