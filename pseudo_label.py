"""Pseudo-labels: predict a trained run's labels on every image of another cache, as soft labels.

    python pseudo_label.py --checkpoint runs/cxrlt2026_512/x/model.pt \
        --cache data/cache/nih_512/train-uzeros-bzeros-keep --out runs/cxrlt2026_512/x/pseudo_nih.csv

Writes a prediction CSV (ImageID + the run's labels, probabilities), atomically. A config trains on
it beside its real labels: pseudo_cache: <that cache>, pseudo_labels: <this CSV>, pseudo_weight: 0.5
(cxrlt/post/pseudo.py, docs/pretraining.md).
"""

from __future__ import annotations

import argparse

from cxrlt.core.cli import main_wrapper, nonnegative_int, positive_int


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="model.pt of a trained run (or its crt/ folder)")
    ap.add_argument("--cache", required=True, help="the cache to label (e.g. preprocess.py external's)")
    ap.add_argument("--out", required=True, help="soft-label CSV to write")
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--workers", type=nonnegative_int, default=0, help="data-loader processes (0: in-process)")
    ap.add_argument("--tta", default="none", help="test-time augmentation views (as predict.py)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)

    from cxrlt.core.fileio import write_csv
    from cxrlt.post.pseudo import predict_soft_labels
    from cxrlt.training.device import pick_device

    df = predict_soft_labels(a.checkpoint, a.cache, pick_device(a.device), a.batch_size, a.workers, a.tta)
    write_csv(a.out, df, float_format="%.6f")
    print(f"wrote {a.out}: soft labels of {len(df)} images x {df.shape[1] - 1} labels")
    return 0


if __name__ == "__main__":
    main_wrapper(main)
