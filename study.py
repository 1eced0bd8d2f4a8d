#!/usr/bin/env python
"""Studies: expand a study file into configs, and compare its trained variants in one report.

    make study STUDY=studies/losses.yaml        # the usual way: trains, evaluates, then reports
    python study.py expand studies/losses.yaml [--state .make]
    python study.py report --manifest .make/studies/losses/study.json --out reports/losses \\
        --run losses.bce runs/cxrlt2026_512/losses.bce data/cache/cxrlt2026_512/train [--run ...] [--n-boot 1000]

`expand` writes the generated configs and study.json under <state>/studies/<name>/ and prints
one line per run (stem, variant, seed, fold, config file). `report` reads each run's
pred_val.csv and its train cache and writes table.md, table.csv, per_label.csv, map.png,
groups.png and per_label_ap.png into --out. File formats and statistics: cxrlt/studies/spec.py.
"""

import argparse

from cxrlt.core.cli import main_wrapper, positive_int


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expand", help="write the study's generated configs and study.json")
    e.add_argument("study", help="study file (studies/*.yaml)")
    e.add_argument("--state", default=".make", help="Make's state folder (the configs go to <state>/studies/<name>/)")
    r = sub.add_parser("report", help="compare the study's trained variants")
    r.add_argument("--manifest", required=True, help="study.json written by expand (make study)")
    r.add_argument("--out", required=True, help="report folder, e.g. reports/<study>")
    r.add_argument("--run", nargs=3, action="append", default=[], metavar=("STEM", "RUN_DIR", "CACHE_DIR"),
                   help="a run of the study: its stem, run folder (holds pred_val.csv) and train cache folder")
    r.add_argument("--n-boot", type=positive_int, default=None, help="bootstrap resamples (default: cxrlt.evaluation.metrics.N_BOOT)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from cxrlt.studies import spec

    if a.cmd == "expand":
        s = spec.expand(a.study, a.state)
        for r in s.runs:
            print(f"{r['stem']}\t{r['variant']}\tseed {r['seed']}\tfold {r['fold']}\t{r['config']}")
        return 0
    if a.n_boot is not None and a.n_boot < 10:
        from cxrlt.core.errors import InputError

        raise InputError(f"--n-boot {a.n_boot}: use at least 10 resamples (1000 for a real report)")
    from cxrlt.studies import report

    report.report(a.manifest, [tuple(r) for r in a.run], a.out, a.n_boot)
    return 0


if __name__ == "__main__":
    main_wrapper(main)
