#!/usr/bin/env python
"""Re-train the classifier head of a trained run on a frozen backbone (cRT), or tau-normalise it.

    python retrain_head.py --run runs/cxrlt2026_512/paper_ldam_drw --cache data/cache/cxrlt2026_512/train \
        --out runs/cxrlt2026_512/paper_ldam_drw/crt [--method crt|tau] [--crt_epochs 10 --crt_lr 1e-3 ...]

Reads <run>/model.pt; writes into --out (never into the run folder itself): features_{train,val}.npy
(cached head inputs, float32), metrics.jsonl (one line per head epoch), summary.json and model.pt
(the full model with the new head; the original head is kept when nothing beats it on val).
--no-feature-cache keeps the features in memory only (nothing written besides model.pt and logs).
"""

import argparse

from cxrlt import config
from cxrlt.cli import main_wrapper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="trained run folder (holds model.pt)")
    ap.add_argument("--cache", required=True, help="cache folder written by preprocess.py")
    ap.add_argument("--out", required=True, help="output folder, e.g. <run>/crt")
    ap.add_argument("--method", choices=["crt", "tau"], default="crt")
    ap.add_argument("--no-feature-cache", action="store_true", help="do not keep features on disk")
    config.add_config_flags(ap, ["crt_epochs", "crt_lr", "crt_batch_size", "crt_reinit", "crt_sampler",
                                 "crt_loss", "seed", "workers", "device"])
    args = ap.parse_args()
    from cxrlt.crt import run

    ov = config.overrides_from_args(args)
    config.apply_overrides(config.DEFAULTS, ov)  # a bad value stops here, before --out is touched
    run(args.run, args.cache, args.out, ov, method=args.method, device_name=ov.get("device", "auto"),
        feature_cache=not args.no_feature_cache)
    return 0


if __name__ == "__main__":
    main_wrapper(main)
