"""Inference: the one batched forward loop and test-time augmentation (post-processing of the
probabilities: cxrlt/post/postproc.py).

`batched_forward(model, loader, fn, device, amp)` is the only loop that runs a model over a
loader without gradients: predict_tta (predictions, also the trainer's validation), cRT's
feature extraction and its head scoring all go through it. fn maps a device batch to a tensor;
the loop returns (rows, outputs as float32 numpy); `forward_batches` is the same loop handing out
one batch at a time (cRT writes features to disk as they come: they never all sit in memory).
A model's output is real logits (the head holds LDAM's scale, see models.py), so a probability
is just sigmoid(model(x)).

TTA views are applied on the device to whole uint8 batches (as float 0..255, before the model's
normalisation), so a view costs one forward pass and nothing on the CPU:

    none        identity
    flip        identity, horizontal flip
    flip_scale  identity, flip, zoom-in 1.1 (centre crop), zoom-out 0.9 (zero padding)
    medium      flip_scale's four views plus the flipped zooms (6 views)
    released_medium  the CXR-LT 2026 winner's "medium" (github hieuphamha19/CXR_LT, tta.py):
                identity, flip, rotations by +5 and -5 degrees, zoom-in 1.1, zoom-out 0.9 (6 views;
                its zoom-out pads by reflection, ours with black like flip_scale's)

A view is (flip, scale, rotation in degrees); rotations are about the centre, black outside.

Views are merged by the mean probability (`prob`) or by the mean logit (`logit`, then sigmoid).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cxrlt.core.config import check_registry

TTA_VIEWS = {
    "none": [(False, 1.0, 0.0)],
    "flip": [(False, 1.0, 0.0), (True, 1.0, 0.0)],
    "flip_scale": [(False, 1.0, 0.0), (True, 1.0, 0.0), (False, 1.1, 0.0), (False, 0.9, 0.0)],
    "medium": [(False, 1.0, 0.0), (True, 1.0, 0.0), (False, 1.1, 0.0), (False, 0.9, 0.0), (True, 1.1, 0.0),
               (True, 0.9, 0.0)],
    "released_medium": [(False, 1.0, 0.0), (True, 1.0, 0.0), (False, 1.0, 5.0), (False, 1.0, -5.0),
                        (False, 1.1, 0.0), (False, 0.9, 0.0)],
}
check_registry("tta", TTA_VIEWS)


def apply_view(x: torch.Tensor, flip: bool, scale: float, rotate: float = 0.0) -> torch.Tensor:
    """One TTA view of a float batch (B, C, H, W): optional h-flip, rotation by `rotate` degrees
    about the centre (black outside), then zoom about the centre."""
    if flip:
        x = torch.flip(x, dims=[3])
    if rotate:
        a = np.deg2rad(rotate)
        theta = torch.tensor([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0]],
                             dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if scale != 1.0:
        h, w = x.shape[-2:]
        nh, nw = int(round(h * scale)), int(round(w * scale))
        y = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1.0)
        if scale > 1.0:  # centre crop back to (h, w)
            top, left = (nh - h) // 2, (nw - w) // 2
            x = y[..., top:top + h, left:left + w]
        else:  # pad with black back to (h, w)
            top, left = (h - nh) // 2, (w - nw) // 2
            x = F.pad(y, (left, w - nw - left, top, h - nh - top), value=0.0)
    return x


def forward_batches(model, loader, fn, device, amp: bool = False, progress: bool = False, desc: str = "predict"):
    """The loop of batched_forward, one batch at a time: yields (rows (b,) int64, fn's output on
    `device` as float32) for every batch, computed without gradients (and under autocast when amp),
    for a consumer that writes each batch away (cRT's feature files) or trains on it at once."""
    from cxrlt.core import progress as P
    from cxrlt.training.device import autocast_ctx

    model.eval()
    for x, _, r in P.bar(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        with torch.no_grad(), autocast_ctx(device, amp):
            y = fn(x.to(device, non_blocking=True))
        yield np.asarray(r, dtype=np.int64), y.float()


def batched_forward(model, loader, fn, device, amp: bool = False, progress: bool = False, desc: str = "predict"):
    """fn(batch on `device`) for every (x, _, rows) batch of `loader`, in eval mode, without
    gradients, under bf16 autocast when amp (GPU only) -> (rows (n,) int64, outputs (n, ...) float32).

    `model` is only switched to eval mode here; fn does the work (see model_input).
    """
    rows, out = [], []
    for r, y in forward_batches(model, loader, fn, device, amp, progress, desc):
        out.append(y)  # stays on the device: one copy to the host at the end, no sync per batch
        rows.append(r)
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(rows), torch.cat(out).cpu().numpy()


INFERENCE_BATCH = {"cpu": 64, "cuda": 256}  # predict.py's default --batch-size by device type


def inference_batch(device) -> int:
    """Images per inference batch when none is given: larger on a GPU (no gradients or optimizer
    state; 256 images of ConvNeXt-L at 1024 px in bf16 is an estimate of ~30 GB, not measured yet:
    make gpu-check times two batch sizes)."""
    return INFERENCE_BATCH.get(torch.device(device).type, 64)


def model_input(model, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """A device batch of images (uint8, or float 0..255) -> the model's normalised input."""
    v = model.normalize(x)
    return v.contiguous(memory_format=torch.channels_last) if channels_last else v


def feature_batches(feats: np.ndarray, batch_size: int):
    """(features, None, rows) batches of an in-memory (n, ...) array, for batched_forward."""
    for i in range(0, len(feats), batch_size):
        f = torch.from_numpy(np.asarray(feats[i:i + batch_size], dtype=np.float32))
        yield f, None, np.arange(i, i + len(f))


def predict_tta(model, loader, device, tta: str = "none", merge: str = "prob", amp: bool = True,
                channels_last: bool = False, progress: bool = True, desc: str = "predict"):
    """-> (rows (n,), probs (n, C) float32) with the TTA views merged (tta "none": one plain pass)."""
    views = TTA_VIEWS[tta]

    def merged(x):
        x = x.float()
        acc = None
        for flip, scale, rotate in views:
            z = model(model_input(model, apply_view(x, flip, scale, rotate), channels_last)).float()
            z = torch.sigmoid(z) if merge == "prob" else z
            acc = z if acc is None else acc + z
        acc = acc / len(views)
        return acc if merge == "prob" else torch.sigmoid(acc)

    return batched_forward(model, loader, merged, device, amp, progress, desc)


def load_trained(path, device="cpu"):
    """Build the model a checkpoint describes and load its weights -> (model, checkpoint dict).

    The weights come from the checkpoint only: hub/local pretrained loading is switched off.
    It must be one of our checkpoints of the current format (models/checkpoint.py). Callers check
    the cache they apply it to with check_cache_size.
    """
    from cxrlt.models.checkpoint import check_format, load_checkpoint, state_dict_of
    from cxrlt.core.config import check_dict
    from cxrlt.core.errors import InputError
    from cxrlt.models.model import build_model

    ck = load_checkpoint(path)
    for key in ("config", "labels", "model"):
        if key not in ck:
            raise InputError(f"{path}: not a cxrlt checkpoint (no '{key}' entry)")
    check_format(ck, path)
    cfg = check_dict(ck["config"], str(path))
    cfg.update(pretrained=False, pretrained_file="", init_checkpoint="")
    model = build_model(cfg, len(ck["labels"]), labels=list(ck["labels"]))
    try:
        model.load_state_dict(state_dict_of(ck))
    except RuntimeError as e:
        raise InputError(f"{path}: weights do not fit the model its config describes ({str(e)[:200]})") from None
    ck["config"] = cfg
    return model.to(device).eval(), ck


def check_cache_size(ck: dict, cache, path) -> None:
    """InputError when the cache's image size is not the one checkpoint `ck` was trained at
    (`image_size`; a checkpoint without it, not written by the trainer, is not checked)."""
    from cxrlt.core.errors import InputError

    trained = ck.get("image_size")
    if trained is not None and int(trained) != int(cache.size):
        raise InputError(f"{cache.path}: images are {cache.size} px but {path} was trained on {trained} px "
                         f"images; use the cache of that size (IMG_SIZE={trained}) or retrain")
