"""A tiny open_clip model with random weights, for the tests and the demo (its scores mean nothing).

    python -m cxrlt.zeroshot.tiny_clip --out data/demo/tiny_clip [--image-size 32] [--seed 0]

writes an open_clip model folder in the layout of a Hugging Face hub repository, so it is loaded
the way a downloaded real model is (`zeroshot.py --model local-dir:data/demo/tiny_clip`):
  open_clip_model.safetensors   the weights (written first)
  open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": ...} (written last: its
                                presence marks a complete folder; Make's target)
The architecture: a 1-layer ViT (patch 8) and a 1-layer text transformer with the standard CLIP
tokenizer (bundled with open_clip, no download), 16-d embeddings; about 1.7 M parameters, most
of them the token embedding table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TOKENIZER_VOCAB = 49408  # open_clip's SimpleTokenizer (CLIP BPE) emits ids below this


def tiny_model_cfg(image_size: int = 32) -> dict:
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": TOKENIZER_VOCAB, "width": 32, "heads": 2, "layers": 1},
    }


def write_tiny_model(out_dir, image_size: int = 32, seed: int = 0) -> Path:
    """Write the folder (see the module docstring) and return its path. Same seed -> same weights."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from cxrlt.core.errors import InputError
    from cxrlt.core.fileio import atomic_path, write_json

    if image_size < 8 or image_size % 8:
        raise InputError(f"--image-size {image_size}: must be a multiple of 8 (the patch size), >= 8")
    out = Path(out_dir)
    cfg = tiny_model_cfg(image_size)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**json.loads(json.dumps(cfg)))  # the constructor keeps references into cfg
    with atomic_path(out / "open_clip_model.safetensors", suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(out / "open_clip_config.json", {
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                           "interpolation": "bilinear", "resize_mode": "squash"},
        "note": f"random weights (seed {seed}) written by cxrlt.zeroshot.tiny_clip: for tests and the demo only",
    })
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write")
    ap.add_argument("--image-size", type=int, default=32, help="the model's input size (multiple of 8)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = write_tiny_model(a.out, a.image_size, a.seed)
    print(f"wrote {out}: tiny random open_clip model (input {a.image_size} px); use --model local-dir:{out}")
    return 0


if __name__ == "__main__":
    from cxrlt.core.cli import main_wrapper

    main_wrapper(main)
