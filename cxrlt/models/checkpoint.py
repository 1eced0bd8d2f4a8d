"""Checkpoint reading and writing.

Checkpoints are plain dicts of tensors, numbers, strings, lists and dicts, so that every read
uses `torch.load(..., weights_only=True)`: a file that needs pickled code to load is refused
(it could run arbitrary code) with a message that says so.

Keys of a checkpoint written by train.py / retrain_head.py (format CHECKPOINT_FORMAT):
  format       the layout version below; a file of another version (or of none: written before
               versions) is refused in one line by the readers of our checkpoints (ours=True)
  model        state_dict of cxrlt.models.model.CXRModel (EMA weights when EMA is on)
  config       the resolved run config (dict, see cxrlt/core/config.py)
  labels       label names in output order
  epoch        last finished epoch (0-based)
  best_map     full val mAP of the best epoch so far (chosen on the selection set; cRT: of the head kept)
  selection    how the best epoch was chosen and its full / proxy / honest val mAP (cxrlt/training/trainer.py)
  image_size   side of the cache images it was trained on (predict/cRT/resume refuse another size)
  train_key, data_key  what the weights were trained from (config.train_key, the cache's key)
  swa          (swa.pt, and model.pt when it holds the SWA weights) the SWA record (cxrlt/training/trainer.py)
  (last.pt only) optimizer, scheduler, ema, swa (the running mean), rng, ... for exact resume; selection_keys and
               val_table (the per-epoch scores the epoch choice needs)
"""

from __future__ import annotations

import copy
import os
import pickle
import struct

from cxrlt.core.errors import InputError


CHECKPOINT_FORMAT = 1  # bump when the keys above or their meaning change


def load_checkpoint(path, map_location="cpu", ours: bool = False) -> dict:
    """The checkpoint dict at `path` (weights only, see the module doc). ours: it must be one of
    this pipeline's checkpoints of the current format (check_format)."""
    import torch

    if not os.path.exists(path):
        raise InputError(f"{path}: checkpoint not found")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: not a readable checkpoint (the file is empty, 0 bytes)")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (legacy format: a pickle, protocol >= 2); anything else
    # would reach the unpickler and fail with a confusing error
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise InputError(f"{path}: not a PyTorch checkpoint file (it starts with {head!r}, "
                         f"neither a zip archive nor a pickle)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except LOAD_ERRORS as e:
        raise InputError(load_error(path, e)) from None
    if not isinstance(ckpt, dict):
        raise InputError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if ours:
        check_format(ckpt, path)
    return ckpt


def check_format(ckpt: dict, path) -> None:
    """InputError unless `ckpt` is a checkpoint of this pipeline in format CHECKPOINT_FORMAT."""
    fmt = ckpt.get("format")
    if fmt == CHECKPOINT_FORMAT:
        return
    if fmt is None:
        what = ("has no format version" + (": written by an older version of this pipeline" if "config" in ckpt
                                           else ": not one of this pipeline's checkpoints"))
    else:
        what = f"is format {fmt!r}"
    raise InputError(f"{path}: the checkpoint {what}; this version reads format {CHECKPOINT_FORMAT} "
                     f"(train it again: remove the run folder, or move it aside)")


# what torch.load (ours, timm's, open_clip's) raises for a file that is not plain weights: a truncated or
# corrupt file fails anywhere inside its readers
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, IndexError, KeyError, ValueError,
               struct.error)


def load_error(path, e: BaseException, what: str = "checkpoint") -> str:
    """The one line for a weights file torch.load refused: pickled code (weights_only=True, the one
    rule for every weights file the pipeline reads), or an unreadable file."""
    if needs_pickled_code(e):
        return (f"{path}: refused to load: the {what} needs pickled Python objects, which could run "
                f"arbitrary code (weights_only=True). Re-save it as a plain state_dict. ({_first_line(e)})")
    return f"{path}: not a readable {what} ({_first_line(e)})"


def needs_pickled_code(e: BaseException) -> bool:
    """torch.load(weights_only=True) refused pickled objects (raised as is, or re-raised by a library
    such as timm as another error naming weights_only)."""
    return isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e)


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message; its type when the message is empty (EOFError)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def state_dict_of(ckpt: dict) -> dict:
    """The model weights inside a checkpoint dict (ours: under 'model'; else assume a bare state_dict)."""
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict):
        raise InputError("checkpoint has no state_dict under 'model'")
    # strip wrappers added by DDP or torch.compile
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out



class BackgroundSaver:
    """Checkpoint writes off the training loop's critical path (trainer: last.pt / best.pt).

    save([(obj, path), ...], then=None) first waits for the save before it (one write in flight at
    most, so files land in the order they were asked for), then copies every tensor of the objects
    to CPU memory at once -- into pinned buffers reused from save to save when they are on a GPU
    (one device sync at the end of the copy), clones when they are on the CPU -- and returns:
    training may change the weights from then on. A thread writes each object with
    fileio.torch_save (temporary file, fsync, rename: a kill during the write keeps the previous
    file) and then calls `then` (run.json, written after last.pt). Tensors shared between objects
    (a model's weights as "model" and "train_model") stay shared, as torch.save would keep them.

    wait() joins the write in flight and re-raises its error; the thread is not a daemon, so the
    interpreter also finishes a write in flight before it exits. last_copy_s / last_write_s: the
    seconds of the last copy (what the caller waited for) and of the last write (in the thread).
    """

    def __init__(self):
        self._thread = None
        self._error: BaseException | None = None
        self._pinned: dict = {}
        self.last_copy_s = 0.0
        self.last_write_s = 0.0

    def save(self, items, then=None) -> None:
        import threading
        import time

        self.wait()
        t0 = time.perf_counter()
        memo: dict = {}
        copies = [(self._snapshot(obj, f"{i}", memo), path) for i, (obj, path) in enumerate(items)]
        if any(getattr(t, "is_pinned", lambda: False)() for t in memo.values()):
            import torch

            torch.cuda.synchronize()  # the non-blocking device -> pinned copies have landed
        self.last_copy_s = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._write, args=(copies, then), name="checkpoint-writer",
                                        daemon=False)
        self._thread.start()

    def wait(self, raise_error: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        err, self._error = self._error, None
        if err is not None and raise_error:
            raise err

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _write(self, copies, then) -> None:
        import time

        from cxrlt.core.fileio import torch_save

        t0 = time.perf_counter()
        try:
            for obj, path in copies:
                torch_save(obj, path)
            if then is not None:
                then()
        except BaseException as e:  # noqa: BLE001 - handed to the caller by wait()
            self._error = e
        self.last_write_s = time.perf_counter() - t0

    def _snapshot(self, obj, where: str, memo: dict):
        import torch

        if isinstance(obj, torch.Tensor):
            key = id(obj)
            if key not in memo:
                memo[key] = self._copy(obj.detach(), where)
            return memo[key]
        if isinstance(obj, dict):
            return {k: self._snapshot(v, f"{where}/{k}", memo) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._snapshot(v, f"{where}/{i}", memo) for i, v in enumerate(obj))
        return copy.deepcopy(obj)  # numbers, strings, small containers of them

    def _copy(self, t, where: str):
        import torch

        if t.device.type != "cuda":
            return t.clone()
        buf = self._pinned.get(where)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            self._pinned[where] = buf
        buf.copy_(t, non_blocking=True)
        return buf
