"""Zero-shot scores for findings that have no training labels (CXR-LT 2026 Task 2).

A CLIP-style model (open_clip) embeds every cache image and every prompt of a prompt file; a
finding's score comes from the cosine similarities between an image and the finding's prompts.
Nothing is trained.

Prompt file (YAML, e.g. prompts/task2.yaml):

    findings:
      Scoliosis:                       # a label of the label set, spelled exactly
        positive: [scoliosis, thoracic scoliosis, ...]
        negative: [no scoliosis, ...]  # optional; needed by method "softmax"
      goiter: [goiter, enlarged thyroid gland]   # short form: positive prompts only

Every label of the label set needs an entry, and every entry must be a label (no typo passes).

Scoring (per image x and finding k; cosines of unit-length embeddings, float64):
  pool over a finding's prompts P (--pool):
    mean       s = mean_p cos(x, t_p)                  (mean cosine over prompts)
    max        s = max_p cos(x, t_p)
    embedding  s = cos(x, normalise(mean_p t_p))       (CLIP-style prompt ensembling)
  --method cosine   p = sigmoid((s_pos - c_k) / T)  with c_k the median of s_pos over the scored
                    images (--center median, the default: keeps probabilities away from 0 and 1,
                    where float rounding would tie images) or 0 (--center zero)
  --method softmax  p = exp(s_pos/T) / (exp(s_pos/T) + exp(s_neg/T)) = sigmoid((s_pos - s_neg) / T)
                    (CheXzero's "finding" vs "no finding" contrast)
  T (--temperature) defaults to 1 / the model's own logit scale (1/100 for most CLIP models).
Every method is monotone in s_pos per finding except softmax, so mean/embedding pooling with
--method cosine rank the images the same way (they differ in spread only).

Image embeddings are cached in an embeddings folder (one pair of files per key):
  <key16>.npy   float32 (n, d), unit rows, in the order of the scored cache rows
  <key16>.json  written last: {"key": sha256, "parts": {...}, "ids_sha256", "n", "dim", "model"}
The key covers the model's weights (a sample of every tensor, so moving or renaming the weights
file costs nothing, but new weights never reuse old embeddings), its image preprocessing (input
size, mean/std, interpolation), the open_clip version, the cache's content key and the scored
rows. Prompts, method, pool and temperature are not in it: trying another prompt file only
re-encodes the prompts. Device and batch size are not in it either (embeddings computed on a GPU
are reused on the CPU; they differ from a CPU run by float rounding only).

Images: the cache's uint8 S x S images are resized on the device to the model's input size
(antialiased, the model's interpolation), copied to 3 channels and normalised with the model's
mean/std. The cache squashed every image to a square, so the model's crop settings do not apply.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrlt.core.config import read_yaml
from cxrlt.core.errors import InputError

METHODS = ("cosine", "softmax")
POOLS = ("mean", "max", "embedding")
CENTERS = ("median", "zero")
EMBED_VERSION = 1  # bump when the embeddings produced for the same key change
_SAMPLE_PER_TENSOR = 4096  # values of each weight tensor hashed into the model fingerprint


# ---- prompt file -----------------------------------------------------------------------------


@dataclass
class Prompts:
    positive: list[str]
    negative: list[str]


def load_prompts(path, labels: list[str], need_negative: bool = False) -> dict[str, Prompts]:
    """Read and check a prompt file -> {label: Prompts} in the order of `labels`."""
    path = Path(path)
    doc = read_yaml(path, "prompt file")  # the configs' reader: a finding given twice is refused
    if not isinstance(doc, dict) or not isinstance(doc.get("findings"), dict):
        raise InputError(f"{path}: expected a mapping with a 'findings:' section (finding -> prompts)")
    findings = doc["findings"]
    unknown = [k for k in findings if k not in labels]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), labels, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"{path}: finding {unknown[0]!r} is not in the label set {labels}{hint}")
    missing = [k for k in labels if k not in findings]
    if missing:
        raise InputError(f"{path}: no prompts for {missing[0]!r} (every label needs an entry under 'findings:')")
    out = {k: _parse_entry(path, k, findings[k]) for k in labels}
    if need_negative:
        lacking = [k for k, p in out.items() if not p.negative]
        if lacking:
            raise InputError(f"{path}: finding {lacking[0]!r} has no 'negative' prompts "
                             f"(method softmax contrasts positive and negative prompts)")
    return out


def _parse_entry(path, label: str, entry) -> Prompts:
    if isinstance(entry, list):
        entry = {"positive": entry}
    if not isinstance(entry, dict):
        raise InputError(f"{path}: finding {label!r}: expected a list of prompts or positive:/negative: lists")
    extra = sorted(set(entry) - {"positive", "negative"})
    if extra:
        raise InputError(f"{path}: finding {label!r}: unknown key {extra[0]!r} (expected positive, negative)")
    pos = _prompt_list(path, label, "positive", entry.get("positive"), required=True)
    neg = _prompt_list(path, label, "negative", entry.get("negative"), required=False)
    return Prompts(pos, neg)


def _prompt_list(path, label: str, side: str, value, required: bool) -> list[str]:
    if value is None and not required:
        return []
    if not isinstance(value, list) or not value:
        raise InputError(f"{path}: finding {label!r}: '{side}' must be a non-empty list of prompts")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            raise InputError(f"{path}: finding {label!r}: {side} prompt {i + 1} is not a non-empty string ({v!r})")
    return [v.strip() for v in value]


# ---- scoring maths ---------------------------------------------------------------------------


def normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def pooled_similarity(img: np.ndarray, text: np.ndarray, pool: str) -> np.ndarray:
    """Similarity (n,) of unit image embeddings (n, d) to a finding's unit prompt embeddings (m, d)."""
    img = np.asarray(img, dtype=np.float64)
    text = np.asarray(text, dtype=np.float64)
    if pool == "embedding":
        return img @ normalise(text.mean(axis=0))
    cos = img @ text.T
    if pool == "mean":
        return cos.mean(axis=1)
    if pool == "max":
        return cos.max(axis=1)
    raise ValueError(f"unknown pool {pool!r}; expected one of {POOLS}")


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free, exact 0.5 at z = 0


def finding_scores(img: np.ndarray, text: dict[str, tuple[np.ndarray, np.ndarray | None]], method: str,
                   pool: str, temperature: float, center: str = "median") -> np.ndarray:
    """Probabilities (n, K) float64, columns in the order of `text` ({label: (pos, neg)} embeddings)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if center not in CENTERS:
        raise ValueError(f"unknown center {center!r}; expected one of {CENTERS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    cols = []
    for label, (pos, neg) in text.items():
        s = pooled_similarity(img, pos, pool)
        if method == "softmax":
            if neg is None or len(neg) == 0:
                raise ValueError(f"{label}: method softmax needs negative prompts")
            z = s - pooled_similarity(img, neg, pool)
        else:
            z = s - (np.median(s) if center == "median" and len(s) else 0.0)
        cols.append(sigmoid(z / temperature))
    return np.stack(cols, axis=1) if cols else np.zeros((len(img), 0))


# ---- encoders --------------------------------------------------------------------------------


class ClipEncoder:
    """An open_clip model on a device: image and text embeddings (unit length), fingerprint.

    The interface the stage needs (tests give a fake with the same attributes):
      logit_scale: float;  fingerprint() -> dict;  encode_images(uint8 (B,1,S,S) tensor) -> (B,d) tensor;
      encode_texts(list[str]) -> float64 (n, d) array.
    """

    def __init__(self, model, tokenizer, device, spec: str):
        import open_clip

        self.model, self.tokenizer, self.device, self.spec = model.eval(), tokenizer, device, spec
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", 224)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = tuple(float(v) for v in pp.get("mean"))
        self.std = tuple(float(v) for v in pp.get("std"))
        self.interpolation = pp.get("interpolation", "bicubic")
        if self.interpolation not in ("bicubic", "bilinear"):
            self.interpolation = "bilinear"  # antialiased resizing exists for these two only
        self.logit_scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
        self._weights_sha = _weights_fingerprint(model)

    def fingerprint(self) -> dict:
        import open_clip

        return {"weights": self._weights_sha, "size": list(self.size), "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation,
                "open_clip": open_clip.__version__}

    def encode_images(self, x):
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(x, size=self.size, mode=self.interpolation, align_corners=False,
                                  antialias=True).clamp_(0.0, 1.0)  # bicubic overshoots
            x = x.expand(-1, 3, -1, -1)
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            return self.model.encode_image((x - mean) / std, normalize=True).float()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            tokens = self.tokenizer(texts).to(self.device)
            return self.model.encode_text(tokens, normalize=True).float().cpu().numpy().astype(np.float64)


def _weights_fingerprint(model) -> str:
    """sha256 over every tensor's name, shape, dtype and an evenly strided sample of its values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE_PER_TENSOR)
        sample = flat[::step].cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.double().numpy().tobytes())  # double: numpy has no bfloat16
    return h.hexdigest()


def load_encoder(spec: str, weights: str | None = None, device: str = "auto") -> ClipEncoder:
    """Build the open_clip model `spec` names and load its weights.

    spec: `hf-hub:ORG/REPO` (downloads, or the Hugging Face cache when offline), `local-dir:FOLDER`
    or a FOLDER (open_clip_config.json + a weights file, e.g. a downloaded hub repo), or an
    open_clip config name (`ViT-L-14`) with `weights` = a local weights file. Never random weights.
    """
    import open_clip

    from cxrlt.training.device import pick_device

    spec, pretrained = _resolve_spec(spec, weights)
    dev = pick_device(device)
    from cxrlt.models.checkpoint import LOAD_ERRORS, load_error, needs_pickled_code

    try:
        model = open_clip.create_model(spec, pretrained=pretrained, device="cpu", require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(spec)
    except LOAD_ERRORS as e:
        if needs_pickled_code(e):  # the one rule for weights files: no pickled code
            raise InputError(load_error(weights or spec.removeprefix("local-dir:"), e, "weights file")) from None
        raise InputError(_load_error(spec, weights, e)) from None
    enc = ClipEncoder(model, tokenizer, dev, spec)  # fingerprint on the CPU, before the move
    enc.model.to(dev)
    return enc


def _resolve_spec(spec: str, weights: str | None) -> tuple[str, str | None]:
    if spec.startswith("local-dir:") or (not spec.startswith("hf-hub:") and Path(spec).is_dir()):
        folder = Path(spec.removeprefix("local-dir:"))
        if not (folder / "open_clip_config.json").is_file():
            raise InputError(f"{folder}: no open_clip_config.json (expected a downloaded open_clip model folder)")
        if weights:
            raise InputError(f"--weights {weights}: not used with a model folder ({folder} holds its weights)")
        return f"local-dir:{folder}", None
    if spec.startswith("hf-hub:"):
        if weights:
            raise InputError(f"--weights {weights}: not used with {spec} (the hub repository holds its weights)")
        return spec, None
    if not weights:
        raise InputError(f"--model {spec}: a config name needs --weights FILE "
                         f"(or use hf-hub:ORG/REPO or local-dir:FOLDER)")
    if not Path(weights).is_file():
        raise InputError(f"--weights {weights}: file not found")
    return spec, weights


def _load_error(spec: str, weights, e: BaseException) -> str:
    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    if spec.startswith("hf-hub:"):
        return (f"{spec}: cannot load ({msg}); without network, download it elsewhere "
                f"(hf download {spec.removeprefix('hf-hub:')} --local-dir DIR) and use --model local-dir:DIR")
    what = f"{spec} with weights {weights}" if weights else spec
    return f"{what}: cannot load the model ({msg})"


# ---- image embeddings (cached) ---------------------------------------------------------------


def embedding_key(encoder, cache_key: str, ids: list[str], rows: np.ndarray) -> tuple[str, dict]:
    parts = {"version": EMBED_VERSION, "model": encoder.fingerprint(), "cache": cache_key,
             "rows": _sha256("\n".join(f"{r},{i}" for r, i in zip(np.asarray(rows).tolist(), ids)))}
    return _sha256(json.dumps(parts, sort_keys=True)), parts


def image_embeddings(encoder, images_path, rows, ids: list[str], cache_key: str, emb_dir,
                     batch_size: int = 64, workers: int = 2, progress: bool = True) -> tuple[np.ndarray, dict]:
    """Unit image embeddings (n, d) float32 of cache `rows` -> (array, info with status/path)."""
    from cxrlt.core.fileio import atomic_path, write_json

    key, parts = embedding_key(encoder, cache_key, ids, rows)
    emb_dir = Path(emb_dir)
    npy, meta = emb_dir / f"{key[:16]}.npy", emb_dir / f"{key[:16]}.json"
    cached = _read_cached(npy, meta, key, len(rows))
    if cached is not None:
        return cached, {"status": "reused", "path": str(npy), "key": key}
    t0 = time.time()
    emb = _embed_rows(encoder, images_path, rows, batch_size, workers, progress)
    emb_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(npy, suffix=".npy") as tmp:
        np.save(tmp, emb)
    write_json(meta, {"key": key, "parts": parts, "n": int(emb.shape[0]), "dim": int(emb.shape[1]),
                      "model": getattr(encoder, "spec", type(encoder).__name__),
                      "seconds": round(time.time() - t0, 2)})
    return emb, {"status": "computed", "path": str(npy), "key": key, "seconds": round(time.time() - t0, 2)}


def _read_cached(npy: Path, meta: Path, key: str, n: int) -> np.ndarray | None:
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        if info.get("key") != key:
            return None
        emb = np.load(npy)
    except (OSError, ValueError):
        return None  # absent, torn or foreign: recompute
    return emb if emb.ndim == 2 and emb.shape[0] == n else None


def _embed_rows(encoder, images_path, rows, batch_size: int, workers: int, progress: bool) -> np.ndarray:
    from cxrlt.core import progress as P
    from cxrlt.data.dataset import CacheDataset, make_loader

    ds = CacheDataset(images_path, rows, num_classes=1)
    pin = getattr(getattr(encoder, "device", None), "type", "cpu") == "cuda"
    loader = make_loader(ds, batch_size, workers=workers, pin_memory=pin)
    out = []
    for x, _, _ in P.bar(loader, desc="image embeddings", unit="batch", disable=not progress, leave=False):
        out.append(encoder.encode_images(x).float().cpu().numpy())
    emb = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return normalise(emb).astype(np.float32)


# ---- the stage -------------------------------------------------------------------------------


def cache_rows(cache, split: str) -> np.ndarray:
    """Array rows of `split` (train | test | all) in index order; InputError when there are none."""
    if split == "all":
        rows = np.concatenate([_rows_of(cache, "train"), _rows_of(cache, "test")])
    else:
        rows = _rows_of(cache, split)
    if len(rows) == 0:
        raise InputError(f"{cache.path}: no {split} rows in this cache (use --split all to score every row)")
    return rows


def _rows_of(cache, split: str) -> np.ndarray:
    return np.asarray(cache.rows(split), dtype=np.int64)


def cache_ids(cache, rows) -> list[str]:
    return [str(i) for i in cache.ids(rows)]


def text_embeddings(encoder, prompts: dict[str, Prompts]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Encode every prompt once (one batch) -> {label: (pos (m, d), neg (m', d) or None)}."""
    texts = [t for p in prompts.values() for t in p.positive + p.negative]
    emb = normalise(encoder.encode_texts(texts))
    out, i = {}, 0
    for label, p in prompts.items():
        pos = emb[i:i + len(p.positive)]
        i += len(p.positive)
        neg = emb[i:i + len(p.negative)] if p.negative else None
        i += len(p.negative)
        out[label] = (pos, neg)
    return out


def score_cache(encoder, cache, split: str, prompts: dict[str, Prompts], emb_dir, method: str = "cosine",
                pool: str = "mean", temperature: float | None = None, center: str = "median",
                batch_size: int = 64, workers: int = 2, progress: bool = True):
    """Score every `split` row of `cache` -> (DataFrame ImageID + labels in prompts' order, info dict)."""
    import pandas as pd

    rows = cache_rows(cache, split)
    ids = cache_ids(cache, rows)
    img, emb_info = image_embeddings(encoder, cache.images_path, rows, ids, cache.key, emb_dir,
                                     batch_size=batch_size, workers=workers, progress=progress)
    text = text_embeddings(encoder, prompts)
    t = float(temperature) if temperature is not None else 1.0 / float(encoder.logit_scale)
    if not (t > 0 and math.isfinite(t)):
        raise InputError(f"--temperature {t}: must be a positive number")
    p = finding_scores(img, text, method, pool, t, center)
    df = pd.DataFrame(p, columns=list(prompts))
    df.insert(0, "ImageID", ids)
    info = {"split": split, "n": len(ids), "method": method, "pool": pool, "center": center,
            "temperature": t, "embeddings": emb_info,
            "prompts": {k: {"positive": len(v.positive), "negative": len(v.negative)} for k, v in prompts.items()}}
    return df, info


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
