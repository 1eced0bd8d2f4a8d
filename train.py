#!/usr/bin/env python
"""Train a backbone on the image cache.

    python train.py --config configs/paper_ldam_drw.yaml --cache data/cache/cxrlt2026_512/train \
        --out runs/cxrlt2026_512/paper_ldam_drw [--resume] [--lr 3e-4 --epochs 20 ...]
    torchrun --nproc_per_node=8 train.py ...   # DDP, one process per GPU

Writes to --out: config.yaml (resolved), metrics.jsonl (one line per epoch), train.log,
last.pt (full state, for --resume), best.pt (best val mAP) and, at the end, model.pt (the
weights later stages read). Any config key can be overridden with --key-name VALUE (or --key_name VALUE).
While it runs it holds <out>.lock: a second train.py on the same --out stops with a message
naming the first one.
"""

import argparse
import contextlib
import os

from cxrlt.core import config
from cxrlt.core.cli import main_wrapper
from cxrlt.core.fileio import output_lock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="*", default=[], help="YAML config file(s), later ones override")
    ap.add_argument("--cache", required=True, help="cache folder written by preprocess.py")
    ap.add_argument("--out", required=True, help="run folder")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    config.add_config_flags(ap)
    args = ap.parse_args()
    cfg = config.resolve(args.config, config.overrides_from_args(args))

    # under torchrun only the global rank 0 takes the lock: a second launch on the same folder
    # stops there (before the slow imports), and torchrun then stops its other ranks
    with output_lock(args.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        from cxrlt.training.trainer import train

        train(cfg, args.cache, args.out, resume=args.resume)
    return 0


if __name__ == "__main__":
    main_wrapper(main, resume_hint="run the same command with --resume (make re-runs do) to continue "
                                   "from the last finished epoch")
