"""Stage 1: decode every training and test image once into a uint8 cache.

    python preprocess.py --train-csv T.csv --image-dir DIR [--test-csv TEST.csv]
        [--removal-csv Removal.csv] --size 512 --folds 5 --out data/cache/<dataset>_<size>

Writes <out>/images.npy, index.csv, labels.txt and manifest.json (layout: cxrlt/cache.py).
Resumable: re-run the same command after an interruption. Bad input exits with status 2 and a
one-line message naming the file (and row).
"""

from __future__ import annotations

import argparse

from cxrlt.cache_build import build_cache
from cxrlt.cli import main_wrapper


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-csv", required=True, help="training CSV: ImageID,StudyDate_DICOM,PatientID,<labels 0/1>")
    p.add_argument("--image-dir", required=True, help="folder of the images named by ImageID (subfolders searched)")
    p.add_argument("--test-csv", default=None, help="list of images to predict (ImageID column); optional")
    p.add_argument("--removal-csv", default=None, help="images to drop from training (ImageID column)")
    p.add_argument("--labels-file", default=None, help="use exactly these label columns (one name a line)")
    p.add_argument("--size", type=int, default=512, help="side of the square cached images")
    p.add_argument("--folds", type=int, default=5, help="patient-grouped stratified folds")
    p.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (reported) instead of stopping")
    p.add_argument("--window-low", type=float, default=0.5, help="16-bit: percentile mapped to 0")
    p.add_argument("--window-high", type=float, default=99.5, help="16-bit: percentile mapped to 255")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching cache or partial build exists")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    build_cache(a.train_csv, a.image_dir, a.out, a.size, test_csv=a.test_csv, removal_csv=a.removal_csv,
                folds=a.folds, seed=a.seed, workers=a.workers, skip_bad=a.skip_bad, labels_file=a.labels_file,
                low=a.window_low, high=a.window_high, force=a.force)
    return 0


if __name__ == "__main__":
    main_wrapper(main)
