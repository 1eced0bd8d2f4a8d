#!/usr/bin/env python
"""Re-train the classifier head of a trained run on its frozen backbone (cRT), or tau-normalise it.

    python retrain_head.py --run runs/cxrlt2026_512/paper_ldam_drw --cache data/cache/cxrlt2026_512/train \
        --out runs/cxrlt2026_512/paper_ldam_drw/crt [--config configs/paper_ldam_drw.yaml] [--method crt|tau] \
        [--crt-epochs 10 --crt-lr 1e-3 --crt-feature-cache auto ...]

Reads <run>/model.pt; writes into --out (never into the run folder itself): features_{train,val}.npy
(the cached head inputs, unless crt_feature_cache is off), metrics.jsonl (one line per head epoch),
summary.json and model.pt (the full model with the new head; the original head is kept when nothing
beats it on val). See cxrlt/post/retrain_head.py for the feature cache choices and when tau applies.

The post keys (crt_*, ...), run keys (workers, device) and seed come from --config (+ flags), as Make
passes them; without --config from the run's own config.yaml copy (+ flags). The train keys always
come from the run. When --out/model.pt was built from the same weights, cache and crt_* keys it is
only touched (so that make settles).
"""

import argparse

from cxrlt.core import config
from cxrlt.core.cli import main_wrapper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="*", default=[], help="YAML config file(s) (post/run keys and seed are read)")
    ap.add_argument("--run", required=True, help="trained run folder (holds model.pt)")
    ap.add_argument("--cache", required=True, help="the train cache folder written by preprocess.py")
    ap.add_argument("--out", required=True, help="output folder, e.g. <run>/crt")
    ap.add_argument("--method", choices=["crt", "tau", "none"], default=None,
                    help="default: the config's crt_method (crt)")
    config.add_config_flags(ap)
    args = ap.parse_args()
    from cxrlt.post.retrain_head import run

    ov = config.overrides_from_args(args)
    config.apply_overrides(config.DEFAULTS, ov)  # a bad value stops here, before --out is touched
    run(args.run, args.cache, args.out, ov, method=args.method, config_files=args.config)
    return 0


if __name__ == "__main__":
    main_wrapper(main)
