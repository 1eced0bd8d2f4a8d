#!/usr/bin/env python3
"""Combine model predictions into a submission, and validate submissions.

    python ensemble.py combine --method mean|rank|weighted|greedy --test T1.csv [T2.csv ...]
        [--val V1.csv ... --val-labels index.csv] [--weights 0.5 0.5] [--select-on auto|proxy|full]
        [--proxy-require-finding false]
        --test-list CXRLT_2026_TEST_ALL_TASK1.csv --out submissions/NAME.csv [--zip submissions/NAME.zip]
        [--labels-file labels.txt]
    python ensemble.py check submissions/NAME.csv --test-list LIST.csv
        [--labels-from TRAIN_OR_INDEX.csv | --labels-file labels.txt]

combine: the --test (and --val) files must have the same ImageIDs and the same columns in the same
order; --val files pair with --test files in order. weighted without --weights fits weights on
the val fold's selection set (cxrlt/evaluation/selection.py: the test-like proxy subset when the cache at
--val-labels knows the projections, else the full fold); greedy needs --val. With --val, the val
mAP of each model and of the ensemble is printed on the full fold, the proxy subset, and the
honest number (selection set; the weights' gain cross-fitted: fitted on one patient half, scored
on the other). The submission (ImageID + the inputs' label columns, rows in test-list order) is
validated like `check` before it is written, with NAME.json beside it (what produced it: the
--make-var variables, each run's keys and resolved config, the commit, the val numbers); --zip
adds NAME.json, configs_resolved/ and code/ (git-tracked files of this repository, plus the
untracked config files named by CONFIGS). A NAME.csv already there that was built from other
inputs is first moved aside to NAME@<key>.* (said in one line). The inputs' label set must be the official 30 labels in the official order, or a
set far from them (e.g. NIH's 14); a set NEARLY the official one (an extra, missing, misspelt or
reordered label) stops, unless --labels-file gives the label set and order on purpose (the
inputs must then hold exactly those labels, in any order). check: exits 2 with one line naming
the first problem's row and column; any label set can be checked with --labels-file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from cxrlt.core import config
from cxrlt.core.cli import main_wrapper
from cxrlt.core.errors import InputError


def parse_args(argv=None) -> argparse.Namespace:
    from cxrlt.evaluation.ensembling import METHODS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("combine", help="ensemble test predictions into a submission CSV")
    c.add_argument("--method", choices=METHODS, default="mean")
    c.add_argument("--test", nargs="+", required=True, help="test prediction CSVs (one per model)")
    c.add_argument("--val", nargs="+", help="val-fold prediction CSVs, same models in the same order")
    c.add_argument("--val-labels", help="labels of the val images: cache index.csv or labelled CSV")
    c.add_argument("--weights", nargs="+", type=float, help="weights for --method weighted")
    config.add_config_flags(c, ["select_on", "proxy_require_finding"])
    c.add_argument("--test-list", required=True, help="official test list (ImageID,...)")
    c.add_argument("--out", required=True, help="submission CSV to write")
    c.add_argument("--zip", help="also write a zip with the CSV and code/")
    c.add_argument("--labels-file", help="the submission's label set and order, one label a line "
                                         "(needed for a set close to the official one but not equal)")
    c.add_argument("--make-var", action="append", default=[], metavar="VAR=VALUE",
                   help="a Make variable recorded in NAME.json (make passes them all; repeatable)")
    k = sub.add_parser("check", help="validate a submission CSV")
    k.add_argument("submission")
    k.add_argument("--test-list", required=True)
    g = k.add_mutually_exclusive_group()
    g.add_argument("--labels-from", help="take the label order from this training CSV / index header")
    g.add_argument("--labels-file", help="one label a line, in the required order")
    return ap.parse_args(argv)


def _check_args(a) -> None:
    from cxrlt.core.cli import check_output_file

    check_output_file(a.out, "--out")
    if a.zip:
        check_output_file(a.zip, "--zip")
    if a.weights is not None and a.method != "weighted":
        raise InputError("--weights only applies to --method weighted")
    if a.val and not a.val_labels:
        raise InputError("--val needs --val-labels")
    if a.val and len(a.val) != len(a.test):
        raise InputError(f"{len(a.val)} --val files for {len(a.test)} --test files (one per model, same order)")
    if a.method == "greedy" and not a.val:
        raise InputError("--method greedy needs --val and --val-labels")
    if a.method == "weighted" and a.weights is None and not a.val:
        raise InputError("--method weighted needs --weights or --val/--val-labels to fit them")
    if a.weights is not None:
        from cxrlt.evaluation.ensembling import normalise_weights

        try:
            normalise_weights(a.weights, len(a.test))
        except ValueError as e:
            raise InputError(f"--weights: {e}") from None


def read_aligned(paths: list[str]):
    """Read prediction CSVs that must share one ID set and one column list; aligned to the first."""
    from cxrlt.data.tables import read_predictions

    first = read_predictions(paths[0])
    frames = [first]
    for p in paths[1:]:
        df = read_predictions(p, expected_ids=first.index.tolist(), ids_source=paths[0])
        if list(df.columns) != list(first.columns):
            i = next((i for i, (a, b) in enumerate(zip(df.columns, first.columns)) if a != b),
                     min(len(df.columns), len(first.columns)))
            raise InputError(f"{p}: row 1, column {i + 2}: label columns differ from {paths[0]} "
                             f"(all inputs need the same columns in the same order)")
        frames.append(df.loc[first.index])
    return first.index.tolist(), list(first.columns), [f.to_numpy() for f in frames]


def combine(a) -> int:
    import pandas as pd

    from cxrlt.evaluation import ensembling
    from cxrlt.data.tables import ID, read_id_list

    _check_args(a)
    from cxrlt.evaluation import submission as S
    from cxrlt.core.hashing import file_key

    key = S.inputs_key(a.test + (a.val or []) + ([a.val_labels] if a.val_labels else []), {
        "method": a.method, "weights": a.weights, "select": config.overrides_from_args(a),
        "labels_file": file_key(a.labels_file) if a.labels_file else None})
    test_list = read_id_list(a.test_list)[ID].tolist()
    ids, labels, test = read_aligned(a.test)
    if set(ids) != set(test_list):
        missing = [i for i in test_list if i not in set(ids)]
        raise InputError(f"{a.test[0]}: ImageIDs differ from {a.test_list} "
                         f"({len(missing)} listed image(s) not predicted, e.g. {missing[:1]}; "
                         f"{len(set(ids) - set(test_list))} predicted image(s) not listed)")
    val, y_val, sets = None, None, None
    if a.val:
        val, y_val, sets = read_val(a, labels)
        print(sets["describe"])
    order = submission_order(labels, a.labels_file, a.test[0])
    labels = [labels[i] for i in order]
    test = [t[:, order] for t in test]
    if val is not None:
        val, y_val = [v[:, order] for v in val], y_val[:, order]
    select = sets["selection"] if sets else None
    ens, weights, info = ensembling.combine(a.method, test, val, y_val, a.weights, select=select)
    if weights is not None:
        print("weights: " + ", ".join(f"{p}={w:.3f}" for p, w in zip(a.test, weights)))
    for h in info.get("greedy_history", []):
        print(f"greedy step {h['step']}: + {a.test[h['model']]}  val mAP {h['val_mAP']:.4f} ({sets['select_on']})")
    numbers = {"models": [], "ensemble": None}
    if val is not None:
        for p, v in zip(a.val, val):  # a single model involves no choice: honest = its selection-set mAP
            numbers["models"].append(val_numbers(y_val, sets, v, ensembling.cross_fitted("mean", [v], y_val, sets)))
            print(val_line(numbers["models"][-1], p))
        honest = ensembling.cross_fitted(a.method, val, y_val, sets, a.weights)
        numbers["ensemble"] = val_numbers(y_val, sets, ensembling.apply_same(a.method, val, weights), honest)
        print(val_line(numbers["ensemble"], f"ensemble ({a.method}, {len(val)} model(s))"))
    df = pd.DataFrame(ens, index=pd.Index(ids, name="ImageID"), columns=labels)
    aside = S.keep_aside(a.out, key)
    if aside:
        print(aside)
    record = submission_record(a, key, weights, numbers, sets)
    n = write_outputs(df, a, labels, record)
    print(f"wrote {a.out}: {len(test_list)} rows x {len(labels)} labels ({a.method} of {len(test)} model(s))")
    print(f"wrote {S.record_path(a.out)}: what produced it (make variables, configs, runs, commit, val numbers)")
    if a.zip:
        print(f"wrote {a.zip}: {n} files (submission, {S.record_path(a.out).name}, configs_resolved/, code/)")
    return 0


def submission_record(a, key: str, weights, numbers: dict, sets) -> dict:
    """NAME.json (docs/formats.md): what produced the submission."""
    import shlex

    from cxrlt.core import provenance
    from cxrlt.evaluation.submission import run_of_predictions

    make = dict(v.partition("=")[::2] for v in a.make_var)
    runs = []
    for i, t in enumerate(a.test):
        r = {**run_of_predictions(t), "val_predictions": a.val[i] if a.val else None,
             "weight": None if weights is None else float(weights[i]),
             "val": numbers["models"][i] if numbers["models"] else None}
        runs.append(r)
    prov = provenance.collect()
    return {"name": Path(a.out).stem, "csv": a.out, "zip": a.zip, "inputs_key": key, "time": prov["time"],
            "make": make, "method": a.method, "select_on": sets["select_on"] if sets else None,
            "val": numbers["ensemble"], "runs": runs, "git": prov["git"],
            "config_files": shlex.split(make.get("CONFIGS", "")), "provenance": prov}


def read_val(a, labels):
    """Val predictions aligned with their labels, and the val subsets (cxrlt.evaluation.selection.val_sets)."""
    from cxrlt.data.tables import read_label_table
    from cxrlt.evaluation.selection import keys_from_index, make_keys, val_sets_from_keys

    val_ids, val_labels, val = read_aligned(a.val)
    if val_labels != labels:
        raise InputError(f"{a.val[0]}: label columns differ from {a.test[0]}")
    table = read_label_table(a.val_labels, ids=val_ids, ids_source=a.val[0])
    if table.labels != labels:
        if set(table.labels) != set(labels):
            raise InputError(f"{a.val_labels}: label columns differ from {a.val[0]}")
        table.y = table.y[:, [table.labels.index(x) for x in labels]]
    keys, why = keys_from_index(a.val_labels if table.is_index else None, val_ids, table.y)
    if keys is None:
        print(f"note: no study/patient keys for the val images ({why}): each image is its own study and patient")
        keys = make_keys(val_ids, table.y)
    cfg = config.apply_overrides(config.DEFAULTS, config.overrides_from_args(a))
    return val, table.y, val_sets_from_keys(keys, labels, cfg)


def val_numbers(y, sets, ens_val, honest: dict) -> dict:
    """{"full", "proxy", "honest"} val mAP of one model or the ensemble (None: undefined)."""
    from cxrlt.evaluation.metrics import macro_map
    from cxrlt.evaluation.selection import json_float

    full = macro_map(y, ens_val)[0]
    proxy = macro_map(y[sets["proxy"]], ens_val[sets["proxy"]])[0] if len(sets["proxy"]) else float("nan")
    return {"full": json_float(full), "proxy": json_float(proxy), "honest": json_float(honest["honest"])}


def val_line(v: dict, name: str) -> str:
    """'val mAP full X  proxy Y  honest Z  name' of val_numbers."""
    f = {k: "n/a" if x is None else f"{x:.4f}" for k, x in v.items()}
    return f"val mAP full {f['full']}  proxy {f['proxy']}  honest {f['honest']}  {name}"


def submission_order(labels: list[str], labels_file, source) -> list[int]:
    """Column positions, in `labels`, of the submission's labels in their required order.

    Without a labels file the inputs' own order, checked against the official label set (a set
    nearly equal to it is a mistake); with one, that file's order (the same set required)."""
    from cxrlt.core.labels import by_name, check_label_set, read_labels_file

    if not labels_file:
        want = by_name(labels)  # the official 30 in another order: read by name, written in the official order
        check_label_set(want, f"{source}: row 1 (header)")
        return [labels.index(x) for x in want]
    want = read_labels_file(labels_file)
    if set(want) != set(labels):
        missing = [x for x in want if x not in labels]
        extra = [x for x in labels if x not in want]
        raise InputError(f"{source}: row 1 (header): the label columns differ from {labels_file} "
                         f"(missing {missing}, not listed there {extra})")
    return [labels.index(x) for x in want]


def write_outputs(df, a, labels, record: dict) -> int:
    """Write the submission CSV (validated with the `check` rules first), NAME.json and the zip;
    -> files zipped.

    The CSV is make's target, so it is renamed into place last: a run killed while zipping leaves
    no CSV, and the next `make` redoes both instead of keeping a submission without its zip."""
    import json

    import yaml

    from cxrlt.core.fileio import write_text
    from cxrlt.evaluation.submission import record_path, write_submission, write_zip

    text = json.dumps(record, indent=1, default=str) + "\n"
    if not a.zip:
        write_submission(df, a.out, a.test_list, labels)
        write_text(record_path(a.out), text)
        return 0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = {record_path(out).name: text}
    for r in record["runs"]:  # resolved configs, named after their run folders
        if r["config"] is not None:
            texts[f"configs_resolved/{Path(r['run']).name}.yaml"] = yaml.safe_dump(r["config"], sort_keys=False)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as d:
        staged = Path(d) / out.name  # the zip stores the CSV under its final name
        write_submission(df, staged, a.test_list, labels)
        n = write_zip(staged, a.zip, Path(__file__).resolve().parent, texts, also=record["config_files"])
        write_text(record_path(out), text)
        os.replace(staged, out)
    return n


def check(a) -> int:
    from cxrlt.core.labels import CXRLT2026_LABELS, read_labels_file
    from cxrlt.evaluation.submission import validate_submission
    from cxrlt.data.tables import labels_from_file

    if a.labels_from:
        labels = labels_from_file(a.labels_from)
    elif a.labels_file:
        labels = read_labels_file(a.labels_file)
    else:
        labels = list(CXRLT2026_LABELS)
    df = validate_submission(a.submission, a.test_list, labels)
    print(f"OK: {len(df)} rows x {len(labels)} labels")
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    return combine(a) if a.command == "combine" else check(a)


if __name__ == "__main__":
    main_wrapper(main)
