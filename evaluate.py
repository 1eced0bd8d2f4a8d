#!/usr/bin/env python3
"""Score a prediction CSV: metrics, per-label table, Markdown report and plots.

    python evaluate.py --pred runs/x/pred_val.csv --labels data/cache/x/index.csv --out runs/x/eval
        [--index data/cache/x/index.csv] [--train-log runs/x/metrics.jsonl] [--thresholds THR.json]
        [--compare runs/y/pred_val.csv] [--n-boot 1000]

--labels is a cache index (scored on the rows whose ImageID is in --pred; training frequencies
from its train rows) or a training-layout label CSV (every labelled image must be predicted;
frequencies from --index if given, else from these labels). Every mAP comes with a 95% bootstrap
interval (studies resampled when the cache knows them); --compare OTHER.csv (predictions of the
same images) adds the paired-bootstrap difference mAP(--pred) - mAP(OTHER) and its interval: a
change is real when that interval excludes 0. Outputs: see cxrlt/evaluation/report.py.
"""

from __future__ import annotations

import argparse

from cxrlt.core.cli import main_wrapper, positive_int


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pred", required=True, help="prediction CSV: ImageID,<labels> (probabilities)")
    ap.add_argument("--labels", required=True, help="cache index.csv or training-layout label CSV")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--index", help="cache index.csv for training frequencies (when --labels is not one)")
    ap.add_argument("--train-log", help="training metrics.jsonl: adds training_curves.png")
    ap.add_argument("--thresholds", help="thresholds.json to apply instead of tuning on these labels")
    ap.add_argument("--compare", help="another prediction CSV of the same images: paired bootstrap difference")
    ap.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cxrlt.core.cli import check_output_dir
    from cxrlt.core.errors import InputError
    from cxrlt.evaluation.report import evaluate

    check_output_dir(args.out, "--out")
    if args.n_boot < 1:
        raise InputError(f"--n-boot must be >= 1, got {args.n_boot}")

    evaluate(args.pred, args.labels, args.out, index_path=args.index, train_log=args.train_log,
             thresholds_path=args.thresholds, compare_path=args.compare, n_boot=args.n_boot)
    print(f"wrote {args.out}/metrics.json, per_label.csv, thresholds.json, report.md and plots")
    return 0


if __name__ == "__main__":
    main_wrapper(main)
