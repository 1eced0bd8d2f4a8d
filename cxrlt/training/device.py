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


# ---- torch.compile: auto, and eager when it fails ---------------------------------------------------
COMPILE_BACKEND_ENV = "CXRLT_COMPILE_BACKEND"  # inductor unless set (the CPU tests use aot_eager: no C++ build)


def compile_on(value: str, device: torch.device) -> bool:
    """Config key compile (auto | true | false) for this device: auto = on a GPU, off on the CPU."""
    return value == "true" or (value == "auto" and device.type == "cuda")


class CompiledOrEager:
    """Calls torch.compile(module); when compiling fails (a graph break is not a failure: an
    error raised by dynamo or the backend), says so in one warning line and calls the eager
    module from then on. Out-of-memory errors are not compile failures and propagate.
    Attributes (normalize, eval, state_dict, no_sync) are the eager module's: a compiled
    module shares its parameters, so checkpoints never see the `_orig_mod.` prefix."""

    def __init__(self, module, what: str = "model", warn=None, backend=None):
        import os

        self.module = module
        self.what = what
        self.warn = warn or (lambda msg: print(msg, flush=True))
        self.compiled = torch.compile(module, backend=backend or os.environ.get(COMPILE_BACKEND_ENV, "inductor"))

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any compiler error: run eagerly instead
                first = (str(e).strip().splitlines() or [""])[0][:200]
                self.warn(f"warning: torch.compile failed for the {self.what} ({type(e).__name__}: {first}); "
                          f"running it eagerly")
                self.compiled = None
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["module"], name)


def maybe_compile(module, on: bool, what: str = "model", warn=None):
    """CompiledOrEager(module) when on, else module itself."""
    return CompiledOrEager(module, what, warn) if on else module


# ---- activation checkpointing: auto -----------------------------------------------------------------
CHECKPOINT_HEADROOM = 0.9  # use at most this fraction of the free memory for the step


def step_memory_bytes(fixed: float, per_image: float, batch: int, n_params: int, ema: bool) -> float:
    """Estimated peak device bytes of one training step: a probe's fixed part (weights, their
    gradients, workspace) + per_image x batch (activations) + AdamW's two fp32 moments per
    parameter (not allocated before the first step) + an fp32 EMA copy."""
    return fixed + per_image * batch + 8.0 * n_params + (4.0 * n_params if ema else 0.0)


def probe_step_memory(model, size: int, in_chans: int, device: torch.device, amp: bool) -> tuple[float, float]:
    """(fixed, per_image) bytes of a forward + backward of `model` (eager, no checkpointing) on
    1 and 2 images of `size` px, from the peak allocated memory (CUDA only). Gradients are
    dropped afterwards."""
    peaks = []
    model.train()
    for b in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        x = torch.zeros(b, in_chans, size, size, device=device)
        with autocast_ctx(device, amp):
            out = model(x)
        out.float().sum().backward()
        del x, out
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        model.zero_grad(set_to_none=True)
    per_image = max(0.0, float(peaks[1] - peaks[0]))
    return max(0.0, float(peaks[0]) - per_image), per_image


def choose_grad_checkpointing(value: str, device: torch.device, probe=None, batch: int = 1, n_params: int = 0,
                              ema: bool = False, free_bytes: float | None = None) -> tuple[bool, str]:
    """(on, why) for config key grad_checkpointing: true / false as set; auto is off on the CPU
    and on a GPU on exactly when step_memory_bytes (from probe() -> (fixed, per_image)) exceeds
    CHECKPOINT_HEADROOM x the free device memory (free_bytes, default torch.cuda.mem_get_info)."""
    if value in ("true", "false"):
        return value == "true", "set in the config"
    if device.type != "cuda":
        return False, "auto: off on the CPU (no device memory to fit)"
    fixed, per_image = probe()
    need = step_memory_bytes(fixed, per_image, batch, n_params, ema)
    if free_bytes is None:
        free_bytes = float(torch.cuda.mem_get_info(device)[0])
    room = CHECKPOINT_HEADROOM * free_bytes
    gb = 1e9
    if need > room:
        return True, (f"auto: a step of batch {batch} needs ~{need / gb:.1f} GB without it, more than "
                      f"{CHECKPOINT_HEADROOM:.0%} of the {free_bytes / gb:.1f} GB free")
    return False, (f"auto: a step of batch {batch} needs ~{need / gb:.1f} GB, within {CHECKPOINT_HEADROOM:.0%} "
                   f"of the {free_bytes / gb:.1f} GB free")
