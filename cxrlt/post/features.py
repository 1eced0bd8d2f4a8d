"""Head inputs for the head stage (cRT and tau): computed by the frozen backbone, cached on disk as
row files, or computed on the fly.

Head inputs (`model.head_input`: pooled (F,) features for linear/cosine heads, the (F, h, w) map
for CSRA) do not change while the backbone is frozen and augmentation is off, so by default they
are computed once and cached on disk in the output folder as row files (cxrlt.data.rowfile, ordinary
.npy arrays read back by row index, resident memory bounded whatever their size):

  features_train.npy   (n_train, *head input)  the train rows (cache rows not in val_fold), index order
  features_val.npy     (n_val, *head input)    the val_fold rows, index order

crt_feature_cache chooses how (printed at the start with the disk it needs):
  float32  exact: the original head scored on them reproduces the run's val mAP
  float16  half the disk (a CSRA map of convnextv2_base at 512 px is 1024x16x16: 0.5 MiB/image in
           float16); the scores move by ~1e-3 mAP
  off      no cache: the frozen backbone runs on every batch of every cRT epoch (and on the val
           rows after each epoch), E backbone passes instead of one, no disk
  auto     float32 for pooled heads, float16 for map heads, when that fits on the disk with 1 GiB to
           spare; else off
Each feature file carries a fingerprint (sidecar `.features_<split>.npy.inputs.json`, see
cxrlt.pipeline.fingerprints) of the weights (file key of the source model.pt), the cache (its content
key), the rows, the dtype and the precision they were computed in; a file whose fingerprint
differs is deleted and extracted again.
The files: docs/formats.md ("cRT folder").
"""

from __future__ import annotations

import hashlib
import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from cxrlt.core.errors import InputError
from cxrlt.data.dataset import CacheDataset, make_loader
from cxrlt.data.rowfile import RowFile, RowWriter, shape_of
from cxrlt.pipeline.fingerprints import inputs_match, record_inputs
from cxrlt.post.inference import batched_forward, feature_batches, forward_batches, model_input

FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}
DISK_SPARE = 1 << 30  # free disk a feature cache must leave


def rows_key(rows) -> str:
    return hashlib.sha256(np.asarray(rows, dtype="<i8").tobytes()).hexdigest()[:16]


def _image_loader(images_path, rows, batch_size: int, workers: int, device):

    return make_loader(CacheDataset(images_path, rows, num_classes=1), batch_size, workers=workers,
                       pin_memory=device.type == "cuda")


def _backbone_fn(model):

    cl = _is_channels_last(model)
    return lambda x: model.head_input(model_input(model, x, channels_last=cl))


def _is_channels_last(model) -> bool:
    """True when the model's weights were put in channels_last (run() does on a GPU with cfg
    channels_last): its inputs are then given that layout too."""
    w = next((p for p in model.parameters() if p.ndim == 4), None)
    return w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def head_input_shape(model, images_path, row: int, device, amp: bool) -> tuple[int, ...]:
    """The shape of one image's head input ((F,) pooled, (F, h, w) map), from one forward pass."""

    loader = _image_loader(images_path, [int(row)], 1, 0, device)
    return tuple(batched_forward(model, loader, _backbone_fn(model), device, amp)[1].shape[1:])


def extract_features(model, images_path, rows, device, path, dtype=np.float32, shape=None, batch_size: int = 64,
                     workers: int = 2, amp: bool = True, desc: str = "features") -> Path:
    """Write the head inputs of cache `rows` into the row file `path`, batch by batch (`shape`:
    one row's, when the caller knows it)."""

    shape = shape or head_input_shape(model, images_path, rows[0], device, amp)
    loader = _image_loader(images_path, rows, batch_size, workers, device)
    tdtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
    cuda = torch.device(device).type == "cuda"
    with RowWriter(path, (len(rows), *shape), dtype) as w, _WriterThread(w) as writer:
        i = 0
        for _, f in forward_batches(model, loader, _backbone_fn(model), device, amp, progress=True, desc=desc):
            f = f.to(tdtype)  # converted where it was computed (on a GPU: not by the CPU)
            if cuda:  # an asynchronous copy into pinned memory; the writer waits for its event
                host = torch.empty(f.shape, dtype=tdtype, pin_memory=True)
                host.copy_(f, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            else:
                host, done = f, None
            writer.put(i, host, done)
            i += len(f)
    return Path(path)


class _WriterThread:
    """Writes (start row, CPU tensor, CUDA event or None) batches into a RowWriter from a thread,
    in order, each after its event (its device->host copy) completed; at most MAX_PENDING batches
    wait (the GPU runs ahead of the disk by that much). An error in the thread is raised by the
    next put() or by the end of the `with` block."""

    MAX_PENDING = 4

    def __init__(self, writer):

        self.w = writer
        self.q = queue.Queue(self.MAX_PENDING)
        self.error = None
        self.thread = threading.Thread(target=self._run, name="feature-writer", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after an error
            i, host, done = item
            try:
                if done is not None:
                    done.synchronize()
                self.w.write(i, host.numpy())
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                self.error = e

    def put(self, i: int, host, done) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((i, host, done))

    def __exit__(self, *exc) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


def classify_fp32(head, f: torch.Tensor) -> torch.Tensor:
    """head.classify in float32 whatever autocast is active (the head is trained in float32)."""
    with torch.autocast(f.device.type, enabled=False):
        return head.classify(f.float())


def head_probs(head, feats, device, batch_size: int = 1024) -> np.ndarray:
    """sigmoid(head.classify(features)) for an (n, ...) feature array or row file -> (n, C) float32."""

    return batched_forward(head, feature_batches(feats, batch_size), lambda f: torch.sigmoid(head.classify(f)),
                           device)[1]


class CachedInputs:
    """Head inputs of a set of rows, read from a row file."""

    def __init__(self, path):
        self.file = RowFile(path)

    def __len__(self) -> int:
        return len(self.file)

    def batches(self, order: np.ndarray, batch_size: int, device):
        for s in range(len(order) // batch_size):
            yield torch.from_numpy(self.file[order[s * batch_size:(s + 1) * batch_size]]).to(device).float()

    def probs(self, head, device) -> np.ndarray:
        return head_probs(head, self.file, device)


class BackboneInputs:
    """Head inputs of a set of rows computed by the frozen backbone at every use (no cache)."""

    def __init__(self, model, images_path, rows, device, amp: bool, workers: int, batch_size: int = 64):
        self.model, self.images_path, self.rows = model, images_path, np.asarray(rows, dtype=np.int64)
        self.device, self.amp, self.workers, self.batch_size = device, amp, workers, batch_size

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, order: np.ndarray, batch_size: int, device):

        n = len(order) // batch_size * batch_size  # whole batches, as CachedInputs
        loader = _image_loader(self.images_path, self.rows[order[:n]], batch_size, self.workers, device)
        for _, f in forward_batches(self.model, loader, _backbone_fn(self.model), device, self.amp):
            yield f.float()

    def probs(self, head, device) -> np.ndarray:

        fn = _backbone_fn(self.model)
        head.eval()
        loader = _image_loader(self.images_path, self.rows, self.batch_size, self.workers, device)
        return batched_forward(self.model, loader, lambda x: torch.sigmoid(classify_fp32(head, fn(x))), device,
                               self.amp)[1]


def choose_feature_cache(setting: str, head_input: tuple, need_bytes: dict, free_bytes: int,
                         where) -> tuple[str, str]:
    """-> (mode "float32" | "float16" | "off", a line saying why). need_bytes: dtype name -> bytes
    still to write for that dtype. InputError when an explicit dtype does not fit on the disk."""
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    is_map = len(head_input) > 1
    what = f"{'map' if is_map else 'pooled'} head inputs {'x'.join(map(str, head_input))}"
    fits = {d: need_bytes[d] + DISK_SPARE <= free_bytes for d in FEATURE_DTYPES}
    if setting == "off":
        return "off", f"{what}; crt_feature_cache off: the frozen backbone runs every cRT epoch (no disk)"
    if setting in FEATURE_DTYPES:
        if not fits[setting]:
            raise InputError(f"{where}: crt_feature_cache {setting} needs {gb(need_bytes[setting])} of disk "
                             f"for the cRT features and {gb(free_bytes)} is free (1 GiB kept spare); free some, "
                             f"or set crt_feature_cache float16 (half) or off (backbone every cRT epoch)")
        return setting, f"{what}; crt_feature_cache {setting}: {gb(need_bytes[setting])} to write in {where}"
    want = "float16" if is_map else "float32"
    if fits[want]:
        return want, (f"{what}; crt_feature_cache auto -> {want} cache on disk: {gb(need_bytes[want])} to write "
                      f"in {where} ({gb(free_bytes)} free)")
    return "off", (f"{what}; crt_feature_cache auto -> off: the {want} cache needs {gb(need_bytes[want])} and "
                   f"{where} has {gb(free_bytes)} free, so the frozen backbone runs every cRT epoch")


def feature_fingerprint(model_key: str, data_key: str, rows, dtype: str, precision: str) -> dict:
    return {"model": model_key, "cache": data_key, "rows": rows_key(rows), "dtype": dtype, "precision": precision}


def _feature_file_ok(path: Path, fp: dict, n_rows: int) -> bool:

    got = shape_of(path)
    return got is not None and got[0][0] == n_rows and inputs_match(path, fp)


def prepare_inputs(model, cache, splits: dict, out: Path, cfg: dict, model_key: str, device, amp: bool, log=print):
    """Head inputs for each split ({name: rows}) -> ({name: CachedInputs | BackboneInputs}, info)."""

    for name, rows in splits.items():
        if not len(rows):
            raise InputError(f"{cache.path}: no {name} rows for val_fold {cfg['val_fold']}")
    precision = "bf16" if amp and device.type == "cuda" else "fp32"
    images = cache.images_path
    shape = head_input_shape(model, images, splits["train"][0], device, amp)
    per_row = int(np.prod(shape))
    fps, need = {}, {d: 0 for d in FEATURE_DTYPES}
    for d in FEATURE_DTYPES:
        for name, rows in splits.items():
            fp = feature_fingerprint(model_key, cache.key, rows, d, precision)
            fps[name, d] = fp
            if not _feature_file_ok(out / f"features_{name}.npy", fp, len(rows)):
                need[d] += len(rows) * per_row * np.dtype(d).itemsize
    mode, why = choose_feature_cache(cfg["crt_feature_cache"], shape, need, shutil.disk_usage(out).free, out)
    log(f"cRT features: {why}")
    inputs, t0 = {}, time.perf_counter()
    for name, rows in splits.items():
        path = out / f"features_{name}.npy"
        if mode == "off":
            inputs[name] = BackboneInputs(model, images, rows, device, amp, cfg["workers"])
            continue
        fp = fps[name, mode]
        if _feature_file_ok(path, fp, len(rows)):
            log(f"cRT features: {path.name} matches the weights and rows: reused")
        else:
            if path.exists():
                log(f"cRT features: {path.name} was computed from other weights, rows or precision: re-extracting")
            path.unlink(missing_ok=True)  # first, so that the stale and the new file never hold the disk together
            extract_features(model, images, rows, device, path, FEATURE_DTYPES[mode], shape, workers=cfg["workers"],
                             amp=amp, desc=f"features {name}")
            record_inputs(path, fp)
        inputs[name] = CachedInputs(path)
    return inputs, {"feature_cache": mode, "head_input": list(shape), "feature_seconds": time.perf_counter() - t0}
