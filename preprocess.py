"""Stage 1: decode every image once into a uint8 cache: the train cache and a test cache.

    python preprocess.py train --train-csv T.csv --image-dir DIR [--removal-csv Removal.csv]
        [--meta-csv META.csv[.gz]] [--labels-file L.txt] --size 512 --folds 5 --out ROOT/train
    python preprocess.py test --test-csv TEST.csv --image-dir DIR [--meta-csv META.csv[.gz]]
        --size 512 --out ROOT/test-<key>        (key: python -m cxrlt.data.identity TEST.csv [META.csv])
    python preprocess.py external --dataset {nih,chexpert,mimic} --data-dir DIR [--uncertain ones|zeros|ignore]
        [--blank zeros|ignore] [--official-test keep|drop] --size 512 --out ROOT/train
        (a public dataset in its native layout: cxrlt/data/external.py, docs/pretraining.md; repeat
        --dataset/--data-dir [--uncertain/--blank] for one cache of several datasets, the union of labels)

ROOT is data/cache/<dataset>_<size>: the caches in it reuse each other's decoded images (by
ImageID, when the file is unchanged), so a new test list, a label or Removal edit, or another
IMAGE_DIR decodes only what it must. Layout: cxrlt/data/cache.py; building: cxrlt/data/cache_build.py.
Resumable: re-run the same command after an interruption. Bad input exits with status 2 and a
one-line message naming the file (and row).
"""

from __future__ import annotations

import argparse

from cxrlt.core.cli import main_wrapper, positive_int
from cxrlt.core.errors import InputError
from cxrlt.data.external import BLANK_POLICIES, DATASETS, UNCERTAIN_POLICIES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True, metavar="{train,test,external}")
    tr = sub.add_parser("train", help="the train cache: training CSV rows minus Removal.csv",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_argument("--train-csv", required=True, help="training CSV: ImageID,StudyDate_DICOM,PatientID,<labels 0/1>")
    tr.add_argument("--removal-csv", default=None, help="images to drop from training (ImageID column)")
    tr.add_argument("--labels-file", default=None, help="use exactly these label columns (one name a line)")
    tr.add_argument("--folds", type=positive_int, default=5, help="patient-grouped stratified folds")
    tr.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    te = sub.add_parser("test", help="the test cache of one test list (never drops an image)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    te.add_argument("--test-csv", required=True, help="list of images to predict (ImageID column)")
    ex = sub.add_parser("external", help="a train cache of NIH ChestX-ray14, CheXpert or MIMIC-CXR-JPG as downloaded",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("--dataset", required=True, action="append", choices=list(DATASETS),
                    help="the dataset's layout; repeat with --data-dir for one cache of several datasets "
                         "(the union of their labels; a label a dataset lacks is unannotated)")
    ex.add_argument("--data-dir", required=True, action="append", help="the dataset folder (its label CSVs and images)")
    ex.add_argument("--uncertain", action="append", choices=list(UNCERTAIN_POLICIES),
                    help="an uncertain (-1) label: 1, 0 or unannotated (masked out of training); once for all "
                         "datasets or once per --dataset (default zeros)")
    ex.add_argument("--blank", action="append", choices=list(BLANK_POLICIES),
                    help="a blank (not mentioned) label: 0 or unannotated; once or once per --dataset (default zeros)")
    ex.add_argument("--official-test", default="keep", choices=["keep", "drop"],
                    help="the dataset's own test split (NIH test_list.txt, CheXpert valid.csv, MIMIC split=test)")
    ex.add_argument("--folds", type=positive_int, default=5, help="patient-grouped stratified folds")
    ex.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    for q in (tr, te):
        q.add_argument("--image-dir", required=True, help="folder of the images named by ImageID (subfolders searched)")
        q.add_argument("--meta-csv", default=None,
                       help="PadChest metadata CSV (plain or .gz): exact patient, study and projection")
    for q in (tr, te, ex):
        q.add_argument("--size", type=positive_int, default=512, help="side of the square cached images")
        q.add_argument("--out", required=True, help="cache folder to write (ROOT/train or ROOT/test-<key>)")
        q.add_argument("--workers", type=positive_int, default=None, help="decode processes (default: all cores)")
        q.add_argument("--skip-bad", action="store_true",
                       help="leave unreadable training images out (reported) instead of stopping")
        q.add_argument("--window-low", type=float, default=0.5, help="16-bit: percentile mapped to 0")
        q.add_argument("--window-high", type=float, default=99.5, help="16-bit: percentile mapped to 255")
        q.add_argument("--force", action="store_true", help="decode every image again, reusing nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from cxrlt.data.cache_build import build_multi_cache, build_test_cache, build_train_cache

    a = parse_args(argv)
    common = dict(workers=a.workers, skip_bad=a.skip_bad, low=a.window_low, high=a.window_high, force=a.force)
    if a.kind == "external":
        n = len(a.dataset)
        if len(a.data_dir) != n:
            raise InputError(f"preprocess.py external: {n} --dataset but {len(a.data_dir)} --data-dir (one each)")
        policies = []
        for flag, given in (("--uncertain", a.uncertain), ("--blank", a.blank)):
            given = given or ["zeros"]
            if len(given) not in (1, n):
                raise InputError(f"preprocess.py external: {len(given)} {flag} for {n} --dataset (give one, or one each)")
            policies.append(given * n if len(given) == 1 else given)
        build_multi_cache(list(zip(a.dataset, a.data_dir, *policies)), a.out, a.size,
                          official_test=a.official_test, folds=a.folds, seed=a.seed, **common)
        return 0
    common["meta_csv"] = a.meta_csv
    if a.kind == "train":
        build_train_cache(a.train_csv, a.image_dir, a.out, a.size, removal_csv=a.removal_csv,
                          labels_file=a.labels_file, folds=a.folds, seed=a.seed, **common)
    else:
        build_test_cache(a.test_csv, a.image_dir, a.out, a.size, **common)
    return 0


if __name__ == "__main__":
    main_wrapper(main)
