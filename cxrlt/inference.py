"""Inference: test-time augmentation (post-processing of the probabilities: cxrlt/postproc.py).

TTA views are applied on the device to whole uint8 batches (as float 0..255, before the model's
normalisation), so a view costs one forward pass and nothing on the CPU:

    none        identity
    flip        identity, horizontal flip
    flip_scale  identity, flip, zoom-in 1.1 (centre crop), zoom-out 0.9 (zero padding)
    medium      flip_scale's four views plus the flipped zooms (6 views)

Views are merged by the mean probability (`prob`) or by the mean logit (`logit`, then sigmoid).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TTA_VIEWS = {
    "none": [(False, 1.0)],
    "flip": [(False, 1.0), (True, 1.0)],
    "flip_scale": [(False, 1.0), (True, 1.0), (False, 1.1), (False, 0.9)],
    "medium": [(False, 1.0), (True, 1.0), (False, 1.1), (False, 0.9), (True, 1.1), (True, 0.9)],
}


def apply_view(x: torch.Tensor, flip: bool, scale: float) -> torch.Tensor:
    """One TTA view of a float batch (B, C, H, W): optional h-flip, then zoom about the centre."""
    if flip:
        x = torch.flip(x, dims=[3])
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


@torch.no_grad()
def predict_tta(model, loader, device, logit_scale: float, tta: str = "none", merge: str = "prob",
                amp: bool = True, channels_last: bool = False, progress: bool = True, desc: str = "predict"):
    """-> (rows (n,), probs (n, C)) with the TTA views merged."""
    from tqdm import tqdm

    from .trainer import autocast_ctx

    views = TTA_VIEWS[tta]
    model.eval()
    rows, out = [], []
    for x, _, r in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        x = x.to(device, non_blocking=True).float()
        acc = None
        for flip, scale in views:
            v = model.normalize(apply_view(x, flip, scale))
            if channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            with autocast_ctx(device, amp):
                z = model(v).float() * logit_scale
            z = torch.sigmoid(z) if merge == "prob" else z
            acc = z if acc is None else acc + z
        acc = acc / len(views)
        p = acc if merge == "prob" else torch.sigmoid(acc)
        out.append(p.cpu().numpy().astype(np.float32))
        rows.append(np.asarray(r))
    return np.concatenate(rows), np.concatenate(out)


def load_trained(path, device="cpu"):
    """Build the model a checkpoint describes and load its weights -> (model, checkpoint dict).

    The weights come from the checkpoint only: hub/local pretrained loading is switched off.
    """
    from .checkpoint import load_checkpoint, state_dict_of
    from .config import check_dict
    from .errors import InputError
    from .models import build_model

    ck = load_checkpoint(path)
    for key in ("config", "labels", "model"):
        if key not in ck:
            raise InputError(f"{path}: not a cxrlt checkpoint (no '{key}' entry)")
    cfg = check_dict(ck["config"], str(path))
    cfg.update(pretrained=False, pretrained_file="", init_checkpoint="")
    model = build_model(cfg, len(ck["labels"]), labels=list(ck["labels"]))
    try:
        model.load_state_dict(state_dict_of(ck))
    except RuntimeError as e:
        raise InputError(f"{path}: weights do not fit the model its config describes ({str(e)[:200]})") from None
    ck["config"] = cfg
    return model.to(device).eval(), ck
