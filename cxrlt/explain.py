"""Class activation maps: where in an image a trained model finds each label (explain.py).

Methods (`method`):
  gradcam    Grad-CAM (Selvaraju et al., ICCV 2017) for any head: on the feature map A (B, K, h, w)
             that the head reads (CXRModel.features; or the output of backbone module `layer`),
             alpha_ck = mean over locations of d logit_c / d A_k and map_c = ReLU(sum_k alpha_ck A_k).
             For the linear head this is the class activation map w_c . A up to a positive factor;
             for the cosine head the gradient also carries the feature normalisation.
  attention  the CSRA head's class-specific spatial attention: softmax over locations of T * s_c,
             s = the head's per-location class scores (its 1x1 conv, divided by ||w_c|| when
             csra_normalize), T = csra_temperature. With T >= CSRA_MAX_TEMPERATURE (max pooling)
             the attention is one-hot, so the class score map ReLU(s_c) is shown instead. The
             bn_attention head's class attention: softmax over locations of its 1x1 conv on the
             BatchNorm'd map. The ml_decoder head has none per label (its queries attend, and a
             query serves several labels when mld_queries < labels): gradcam applies.
  auto       attention for a csra or bn_attention head, gradcam for the others.
The maps are computed at the feature map's resolution (upsampled, bilinear, only for display);
`peak` is the centre of the highest cell, in input pixels. Nothing here writes into the run.

Pointing game (`pointing_game`, explain.py --boxes): with boxes of where findings are (the demo
generator's boxes.csv, PadChest-style localisations: ImageID,label,x0,y0,x1,y1 in pixels of the
original image file, x1/y1 exclusive), every correctly detected positive finding (labelled
positive, probability >= the label's F1-best threshold on the same images) scores a hit when its
map's peak falls inside its box (mapped onto the cache's square image). The reference is a random
point: it falls inside a box with probability box area / image area. The ceiling is the share of
these boxes that hold a cell centre of the map's grid at all: a coarse map (2 x 2 for a stride-32
backbone at 64 px) cannot point into a small box that lies between its cell centres.

explain.py's outputs (in --out):
  <image>.png    one panel per image: the image, then the map over the image for each chosen label
                 (top-k predicted, or the --labels given), titled with the label and its probability
                 (and "labelled +" / "labelled -" when the cache has the image's labels); + marks the peak
  explain.csv    ImageID, label, prob, labelled (1/0, empty when unknown), peak_x, peak_y (the map's
                 peak in input pixels of the cache's square image, x right, y down; 0 = the image's
                 edge, a pixel's centre is at +0.5), map_h, map_w (the map's resolution), method, layer
  pointing.json  with --boxes: {"n", "hits", "hit_rate", "random_rate", "ceiling", "map_size", "boxes", "not_detected",
                 "per_label": {label: {"n", "hit_rate", "random_rate"}}, "method", "layer"}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxrlt.core.errors import InputError

METHODS = ("auto", "gradcam", "attention")


def extra_logit_scale(model, ck: dict) -> float:
    """The factor that turns the model's output into logits: 1 when the head holds the scale
    (models.py Head.logit_scale), else the checkpoint's `logit_scale` entry (older runs)."""
    return 1.0 if hasattr(model.head, "logit_scale") else float(ck.get("logit_scale", 1.0))


def resolve_method(model, method: str) -> str:
    from cxrlt.models.model import BNAttentionHead, CSRAHead, MLDecoderHead

    if method not in METHODS:
        raise InputError(f"--method {method}: choose one of {', '.join(METHODS)}")
    attends = isinstance(model.head, (CSRAHead, BNAttentionHead))
    if method == "auto":
        return "attention" if attends else "gradcam"
    if method == "attention" and isinstance(model.head, MLDecoderHead):
        raise InputError("--method attention: the ml_decoder head has no attention map per label (its queries "
                         "attend to the feature map, and one query serves several labels when mld_queries < "
                         "labels); use gradcam")
    if method == "attention" and not attends:
        raise InputError(f"--method attention needs a csra or bn_attention head (this model's head is "
                         f"{type(model.head).__name__}); use gradcam")
    return method


def _layer_module(model, layer: str):
    modules = dict(model.backbone.named_modules())
    if layer not in modules or not layer:
        names = [n for n, m in model.backbone.named_children()]
        raise InputError(f"--layer {layer!r}: no such module in the backbone (top-level ones: {', '.join(names)})")
    return modules[layer]


def _forward_with_activation(model, x: torch.Tensor, layer: str | None):
    """-> (activation A (B, K, h, w), logits (B, C) computed from it).

    A is made a leaf that requires grad (the rest of the forward pass is computed from it), so the
    maps need no gradient through the layers below it and work with frozen weights too."""
    if not layer:
        feat = model.features(x).detach().requires_grad_()
        return feat, model.head.classify(model.head.pool(feat))
    store = {}

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            output = output.detach().requires_grad_()
        store["a"] = output
        return output

    handle = _layer_module(model, layer).register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = store["a"]
    if not isinstance(a, torch.Tensor) or a.dim() != 4:
        raise InputError(f"--layer {layer}: its output is not a (B, C, H, W) feature map")
    return a, logits


def gradcam(model, x: torch.Tensor, classes: list[int], layer: str | None = None):
    """Grad-CAM maps (B, len(classes), h, w) at the activation's resolution, and the logits (B, C)."""
    with torch.enable_grad():
        act, logits = _forward_with_activation(model, x, layer)
        maps = []
        for i, c in enumerate(classes):
            # the logits of different images do not interact (eval mode), so one backward serves the batch
            (g,) = torch.autograd.grad(logits[:, c].sum(), act, retain_graph=i < len(classes) - 1)
            alpha = g.float().mean(dim=(2, 3), keepdim=True)
            maps.append(F.relu((alpha * act.float()).sum(dim=1)))
    return torch.stack(maps, dim=1).detach(), logits.detach().float()


@torch.no_grad()
def csra_attention(model, x: torch.Tensor, classes: list[int]):
    """The class-specific attention maps (B, len(classes), h, w) of a csra or bn_attention head,
    and the logits (B, C)."""
    from cxrlt.models.model import CSRA_MAX_TEMPERATURE, BNAttentionHead

    head = model.head
    feat = model.features(x)
    with torch.autocast(feat.device.type, enabled=False):  # in float32, as the head computes them
        if isinstance(head, BNAttentionHead):
            b, _, h, w = feat.shape
            att = head.attention(head.normed(feat.float())).view(b, -1, h, w)
            return att[:, classes], head.classify(head.pool(feat)).float()
        s = head.class_scores(feat.float())  # (B, C, h, w) per-location class scores
    b, c, h, w = s.shape
    if head.temperature >= CSRA_MAX_TEMPERATURE:
        att = F.relu(s)
    else:
        att = torch.softmax(head.temperature * s.flatten(2), dim=2).view(b, c, h, w)
    return att[:, classes], head.classify(head.pool(feat)).float()


def class_maps(model, images: torch.Tensor, classes: list[int], method: str = "auto", layer: str | None = None,
               logit_scale: float = 1.0):
    """Maps for `classes` of uint8 images (B, 1, H, W) -> (probs (B, C), maps (B, K, h, w) float32 >= 0 at
    the feature map's resolution; `upsample` them for display, `peak` locates them in input pixels).

    `logit_scale`: see extra_logit_scale (only the probabilities depend on it)."""
    model.eval()
    method = resolve_method(model, method)
    x = model.normalize(images)
    if method == "attention":
        if layer:
            raise InputError("--layer applies to gradcam only (the head's attention lives on its feature map)")
        maps, logits = csra_attention(model, x, classes)
    else:
        maps, logits = gradcam(model, x, classes, layer)
    probs = torch.sigmoid(logits * logit_scale)
    return probs.cpu().numpy(), maps.clamp_min(0).cpu().numpy().astype(np.float32)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Maps (..., h, w) -> (..., H, W), bilinear (for display over the image)."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    lead = t.shape[:-2]
    t = F.interpolate(t.reshape(-1, 1, *t.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return t.reshape(*lead, *size).numpy()


def peak(m: np.ndarray, size: tuple[int, int]) -> tuple[float, float]:
    """(x, y) in input pixels (image of `size` (H, W)) of the centre of a map's (h, w) highest cell.

    The cell centre, not the argmax of the upsampled map: bilinear upsampling of a coarse map is flat
    beyond the outer cell centres, so its argmax would sit at an image corner."""
    h, w = m.shape
    i, j = np.unravel_index(int(np.argmax(m)), m.shape)
    return (j + 0.5) * size[1] / w, (i + 0.5) * size[0] / h


def for_display(m: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] (all zeros stays zeros)."""
    top = float(m.max())
    return m / top if top > 0 else m


def render_panel(image: np.ndarray, maps: np.ndarray, titles: list[str], path, suptitle: str = "") -> None:
    """The image and one overlay per map (K, h, w; upsampled to the image) with its peak marked, as one PNG."""
    from cxrlt.evaluation.plotting import pyplot, save_figure

    plt = pyplot()
    k = len(maps)
    fig, axes = plt.subplots(1, k + 1, figsize=(2.6 * (k + 1), 2.9), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("image", fontsize=8)
    for ax, m, title in zip(axes[1:], maps, titles):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.imshow(for_display(upsample(m, image.shape)), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        px, py = peak(m, image.shape)
        ax.plot([px - 0.5], [py - 0.5], marker="+", color="white", ms=9, mew=1.5)  # pixel centres at integers
        ax.set_title(title, fontsize=8)
    for ax in axes:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=8)
    save_figure(fig, path)


# ---- explain.py ---------------------------------------------------------------------------------------------
def _choose_classes(probs_row: np.ndarray, labels: list[str], wanted: list[str] | None, top: int) -> list[int]:
    if wanted:
        return [labels.index(x) for x in wanted]
    return [int(i) for i in np.argsort(-probs_row, kind="stable")[:top]]


def check_labels(wanted: list[str] | None, labels: list[str], source) -> None:
    bad = [x for x in wanted or [] if x not in labels]
    if bad:
        raise InputError(f"--labels: {bad[0]!r} is not a label of {source} (labels: {', '.join(labels)})")


def panel_name(image_id: str) -> str:
    """A file name for an ImageID's panel (its stem; path separators replaced)."""
    return Path(str(image_id).replace("/", "_").replace("\\", "_")).stem + ".png"


def explain_images(model, ck: dict, images: np.ndarray, ids: list[str], truth: np.ndarray | None, out_dir,
                   wanted: list[str] | None = None, top: int = 3, method: str = "auto", layer: str | None = None,
                   device="cpu", batch_size: int = 16) -> list[dict]:
    """Panels + explain.csv for uint8 images (N, H, W); truth (N, C) 0/1 or NaN (unknown), or None.
    -> the explain.csv rows."""
    from cxrlt.core.fileio import write_csv

    import pandas as pd

    labels = list(ck["labels"])
    check_labels(wanted, labels, "the checkpoint")
    method_used = resolve_method(model, method)
    scale = extra_logit_scale(model, ck)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size]))[:, None].to(device)
        with torch.no_grad():
            p_all = torch.sigmoid(model(model.normalize(x)).float() * scale).cpu().numpy()
        for j in range(len(x)):
            i = s + j
            classes = _choose_classes(p_all[j], labels, wanted, top)
            probs, maps = class_maps(model, x[j:j + 1], classes, method_used, layer, scale)
            titles = []
            for k, c in enumerate(classes):
                t = None if truth is None or not np.isfinite(truth[i, c]) else int(truth[i, c] > 0.5)
                px, py = peak(maps[0, k], images[i].shape)
                rows.append({"ImageID": ids[i], "label": labels[c], "prob": float(probs[0, c]),
                             "labelled": "" if t is None else t, "peak_x": px, "peak_y": py,
                             "map_h": maps.shape[2], "map_w": maps.shape[3], "method": method_used, "layer": layer or ""})
                titles.append(f"{labels[c]}\np = {probs[0, c]:.2f}" + ("" if t is None else f"  labelled {'+' if t else '-'}"))
            render_panel(images[i], maps[0], titles, out / panel_name(ids[i]), suptitle=str(ids[i]))
    write_csv(out / "explain.csv", pd.DataFrame(rows, columns=["ImageID", "label", "prob", "labelled", "peak_x",
                                                               "peak_y", "map_h", "map_w", "method", "layer"]), index=False)
    return rows


def images_from_cache(cache_dir, ids: list[str] | None, n: int | None, val_fold: int):
    """(images (N, S, S) uint8, ImageIDs, labels (N, C) float with NaN for unlabelled rows, label names)
    from a cache: the given ImageIDs, else the first n val-fold images with at least one positive
    label, else (n None) every val-fold image."""
    from cxrlt.data.cache import open_cache
    from cxrlt.evaluation.selection import rows_of_ids

    cache = open_cache(cache_dir)
    if ids:
        try:
            rows = rows_of_ids(cache, ids)
        except KeyError as e:
            raise InputError(f"{cache_dir}: {e.args[0]}") from None
    else:
        rows = cache.rows("train", fold=val_fold)
        if n is not None:
            rows = rows[np.nansum(cache.targets(rows), axis=1) > 0][:n]
        if not len(rows):
            raise InputError(f"{cache_dir}: no labelled val-fold (fold {val_fold}) image to explain; pass --images")
    return RowImages(np.load(cache.images_path, mmap_mode="r"), rows), list(cache.ids(rows)), cache.targets(rows), \
        list(cache.labels)


class RowImages:
    """Cache images of some rows, read when indexed (a whole val fold at 512 px does not fit in memory)."""

    def __init__(self, pixels: np.ndarray, rows: np.ndarray):
        self.pixels, self.rows = pixels, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *pixels.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return np.array(self.pixels[self.rows[i]])  # a copy: torch wants writable arrays


def images_from_files(files: list[str], size: int):
    """Image files decoded and resized exactly as the cache does (imaging.load_for_cache)."""
    from cxrlt.data.imaging import load_for_cache

    return np.stack([load_for_cache(f, size) for f in files]), [Path(f).name for f in files]


# ---- the pointing game ---------------------------------------------------------------------------------------
BOX_COLUMNS = ["ImageID", "label", "x0", "y0", "x1", "y1"]


def read_boxes(path, labels: list[str]):
    """boxes.csv (BOX_COLUMNS) -> DataFrame; InputError naming the file, row and column."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype={"ImageID": str, "label": str})
    except FileNotFoundError:
        raise InputError(f"{path}: boxes file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in BOX_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (expected {','.join(BOX_COLUMNS)})")
    for c in ("x0", "y0", "x1", "y1"):
        bad = ~pd.to_numeric(df[c], errors="coerce").notna()
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise InputError(f"{path}: row {r + 2}, column {c}: not a number ({df[c].iloc[r]!r})")
        df[c] = pd.to_numeric(df[c])
    bad = (df["x1"] <= df["x0"]) | (df["y1"] <= df["y0"])
    if bad.any():
        raise InputError(f"{path}: row {int(np.flatnonzero(bad)[0]) + 2}: empty box (need x0 < x1 and y0 < y1)")
    unknown = sorted(set(df["label"]) - set(labels))
    if unknown:
        raise InputError(f"{path}: column label: {unknown[0]!r} is not a label of the model")
    return df[BOX_COLUMNS]


def image_size(path) -> tuple[int, int]:
    """(height, width) of an image file: from a PNG's header when it is one, else by decoding it."""
    import cv2

    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"{path}: cannot read the image (needed for its size)")
    return img.shape[:2]


def pointing_game(model, ck: dict, images: np.ndarray, ids: list[str], y: np.ndarray, boxes, sizes: dict,
                  method: str = "auto", layer: str | None = None, device="cpu", batch_size: int = 64) -> dict:
    """Hit rate of the maps' peaks in the boxes of correctly detected findings vs a random point's.

    images (N, S, S) uint8 as the model sees them; y (N, C) their labels; boxes: read_boxes' frame;
    sizes: ImageID -> (height, width) of the original file the boxes' pixels refer to."""
    from cxrlt.evaluation.metrics import tune_thresholds

    labels = list(ck["labels"])
    scale = extra_logit_scale(model, ck)
    method = resolve_method(model, method)
    probs = []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size]))[:, None].to(device)
        with torch.no_grad():
            probs.append(torch.sigmoid(model(model.normalize(x)).float() * scale).cpu().numpy())
    p = np.concatenate(probs)
    thr = tune_thresholds(y, p)
    where = {i: k for k, i in enumerate(ids)}
    side = images.shape[1:]
    per_label: dict[str, list] = {}
    n = hits = not_detected = ceiling = 0
    rnd = 0.0
    grid = None
    considered = boxes[boxes["ImageID"].isin(where)]
    for b in considered.itertuples(index=False):
        i, c = where[b.ImageID], labels.index(b.label)
        if y[i, c] < 0.5 or p[i, c] < thr[c]:
            not_detected += int(y[i, c] >= 0.5)
            continue
        h, w = sizes[b.ImageID]
        # the cache squashes the image to S x S, so box coordinates scale per axis
        x0, x1 = b.x0 * side[1] / w, b.x1 * side[1] / w
        y0, y1 = b.y0 * side[0] / h, b.y1 * side[0] / h
        x = torch.from_numpy(np.ascontiguousarray(images[i]))[None, None].to(device)
        _, m = class_maps(model, x, [c], method, layer, scale)
        px, py = peak(m[0, 0], side)
        hit = bool(x0 <= px < x1 and y0 <= py < y1)
        area = (min(x1, side[1]) - max(x0, 0)) * (min(y1, side[0]) - max(y0, 0)) / (side[0] * side[1])
        # the best any map of this resolution can do: some cell centre lies inside the box
        cx, cy = (np.arange(m.shape[3]) + 0.5) * side[1] / m.shape[3], (np.arange(m.shape[2]) + 0.5) * side[0] / m.shape[2]
        reachable = bool(((cx >= x0) & (cx < x1)).any() and ((cy >= y0) & (cy < y1)).any())
        n, hits, rnd, ceiling = n + 1, hits + hit, rnd + area, ceiling + reachable
        per_label.setdefault(b.label, []).append((hit, area))
        grid = list(m.shape[2:])
    return {"n": n, "hits": hits, "hit_rate": hits / n if n else float("nan"),
            "random_rate": rnd / n if n else float("nan"), "ceiling": ceiling / n if n else float("nan"),
            "map_size": grid, "boxes": int(len(considered)),
            "not_detected": not_detected, "method": method, "layer": layer or "",
            "per_label": {k: {"n": len(v), "hit_rate": float(np.mean([h for h, _ in v])),
                              "random_rate": float(np.mean([a for _, a in v]))} for k, v in sorted(per_label.items())}}
