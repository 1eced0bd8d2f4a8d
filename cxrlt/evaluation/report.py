"""Scoring a prediction CSV against labels: metrics, report, plots (used by evaluate.py).

Outputs in the output folder (each written atomically):
- metrics.json: mAP, mAUC, mF1 (at 0.5), mF1_tuned (at per-label thresholds), ece, ece_bins,
  group_mAP {head, medium, tail}, group_cutoffs, group_labels, per_label_AP {label: AP | null},
  per_label_AUC, skipped_labels (no positive: no AP/F1), skipped_labels_auc (one class only),
  n_images, n_labels, frequency_source, thresholds_source, pred, labels, provenance {"predictions",
  "training": the provenance.json records (cxrlt/core/provenance.py) found beside the files; report.md
  shows them}.
- thresholds.json: {"thresholds": {label: float}, "source": ..., "pred": ..., "labels": ...};
  `evaluate.py --thresholds` applies such a file instead of tuning.
- per_label.csv: label, group, train_count, train_fraction, positives, AP, AUC, F1, F1_tuned,
  threshold (floats; empty where undefined).
  bootstrap: 95% interval of mAP and of head/medium/tail mAP, {name: {value, low, high}, n_boot,
  seed, level, unit: "studies" | "images", n_units, keys_source}: studies (exact study keys of the
  cache) are resampled when --labels or --index is a cache index holding the evaluated images,
  else images.
  subsets (cache keys only): {"proxy": ..., "proxy_finding": ...} each {n_images, what, mAP, low, high}:
  the test-like subsets of cxrlt/evaluation/selection.py (frontal when known, one image per study; and only
  images with a finding).
  centres: {centre: {n_images, n_positives, scored, and mAP, low, high, unit, n_units when scored,
  else why}} (cxrlt.evaluation.metrics.per_centre_map): each centre's images scored apart, with its
  own interval; centres from the cache index when it holds the images, else from the ImageIDs'
  shape (cxrlt.data.identity.centre: padchest, nih, unknown).
  compare (with --compare OTHER): paired bootstrap of mAP(pred) - mAP(OTHER) on the same images,
  {other, mAP: {diff, low, high, frac_positive}, head, medium, tail, n_boot, ...}.
- report.md, ap_vs_frequency.png, pr_curves_rarest.png, training_curves.png (with --train-log).

Label alignment: predictions are matched to the labels by column NAME (the sets must be equal);
order only matters for the submission format, which `ensemble.py check` enforces.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.evaluation import metrics as M
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import read_jsonl, write_csv, write_json, write_text
from cxrlt.data.tables import LabelTable, labels_from_file, read_label_table, read_predictions
from cxrlt.evaluation.plotting import GROUP_COLOURS, pyplot, save_figure
from cxrlt.evaluation.selection import ValKeys, keys_from_index, make_keys

N_RAREST_PR = 6
ECE_BINS = 15
@dataclass
class EvalData:
    """Aligned ground truth and predictions, plus where the training frequencies come from."""

    ids: list[str]
    labels: list[str]
    y: np.ndarray  # (N, C) int8
    p: np.ndarray  # (N, C) float64
    train_counts: np.ndarray  # (C,)
    n_train: int
    frequency_source: str
    keys: ValKeys | None = None  # study/patient/projection keys of the images, when a cache has them
    keys_source: str = "none"
    centres: np.ndarray | None = None  # (N,) centre per image: the cache's, else the ImageID's shape


def load_eval_data(pred_path, labels_path, index_path=None) -> EvalData:
    """Read and align a prediction CSV with a cache index or a training-layout label CSV.

    Index: scored on the rows whose ImageID is in the predictions; frequencies from its train rows.
    Training layout: the ID sets must be equal; frequencies from index_path's train rows if given,
    else from the evaluated labels themselves (said in frequency_source).
    """
    labels = labels_from_file(labels_path)
    pred = read_predictions(pred_path, labels)
    table = read_label_table(labels_path, ids=pred.index.tolist(), ids_source=str(pred_path))
    counts, n_train, source = _train_frequencies(table, labels_path, index_path, labels)
    keys, keys_source = keys_from_index(labels_path if table.is_index else index_path, table.ids, table.y)
    centres = keys.centre if keys is not None else make_keys(table.ids, table.y).centre
    return EvalData(table.ids, labels, table.y, pred.loc[table.ids].to_numpy(), counts, n_train, source,
                    keys, keys_source, centres)


def _train_frequencies(table: LabelTable, labels_path, index_path, labels):
    if table.is_index:
        return table.train_counts, table.n_train, f"train rows of {labels_path}"
    if index_path:
        index = read_label_table(index_path, ids=[])
        if not index.is_index:
            raise InputError(f"{index_path}: not a cache index (no 'split' column)")
        if set(index.labels) != set(labels):
            raise InputError(f"{index_path}: label columns differ from {labels_path}")
        order = [index.labels.index(x) for x in labels]
        return index.train_counts[order], index.n_train, f"train rows of {index_path}"
    return table.y.sum(0).astype(np.int64), len(table.ids), f"the evaluated labels ({labels_path}; no --index given)"


def load_thresholds(path, labels) -> np.ndarray:
    """Per-label thresholds from a thresholds.json ({"thresholds": {label: float}})."""
    try:
        with open(path, encoding="utf-8") as f:
            thr = json.load(f)["thresholds"]
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a thresholds.json with a 'thresholds' object ({e})") from None
    if not isinstance(thr, dict):
        raise InputError(f"{path}: 'thresholds' must be an object {{label: threshold}}")
    missing = [x for x in labels if x not in thr]
    if missing:
        raise InputError(f"{path}: no threshold for label(s) {missing}")
    out = []
    for x in labels:
        v = thr[x]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"{path}: threshold of {x!r} is not a finite number: {v!r}")
        out.append(float(v))
    return np.array(out)


def compute_metrics(data: EvalData, thresholds=None) -> tuple[dict, pd.DataFrame]:
    """All metrics; thresholds None = tune per label on these labels. Returns (summary, per-label)."""
    y, p, labels = data.y, data.p, data.labels
    tuned = thresholds is None
    thr = M.tune_thresholds(y, p) if tuned else np.asarray(thresholds, dtype=np.float64)
    ap, auc = M.average_precision_per_label(y, p), M.auc_per_label(y, p)
    frac = data.train_counts / max(data.n_train, 1)
    groups = M.frequency_groups(data.train_counts, max(data.n_train, 1))
    per_label = pd.DataFrame({
        "label": labels, "group": groups, "train_count": data.train_counts,
        "train_fraction": frac, "positives": y.sum(0), "AP": ap, "AUC": auc,
        "F1": M.f1_per_label(y, p, 0.5), "F1_tuned": M.f1_per_label(y, p, thr), "threshold": thr,
    })
    mean_ap, skipped = M.macro_map(y, p, labels)
    mean_auc, skipped_auc = M.macro_auc(y, p, labels)
    summary = {
        "mAP": mean_ap, "mAUC": mean_auc,
        "mF1": M.f1_at(y, p, 0.5), "mF1_tuned": M.f1_at(y, p, thr),
        "ece": M.expected_calibration_error(y, p, ECE_BINS), "ece_bins": ECE_BINS,
        "group_mAP": M.group_map(ap, groups),
        "group_cutoffs": {
            "head_min_fraction": M.HEAD_MIN_FRACTION, "tail_max_fraction": M.TAIL_MAX_FRACTION,
            "n_train_images": int(data.n_train),
            "head_min_count": M.HEAD_MIN_FRACTION * data.n_train,
            "tail_max_count": M.TAIL_MAX_FRACTION * data.n_train,
            "rule": "head: train fraction >= head_min_fraction; tail: < tail_max_fraction; else medium",
        },
        "group_labels": {g: [x for x, gg in zip(labels, groups) if gg == g] for g in M.GROUPS},
        "per_label_AP": dict(zip(labels, ap)), "per_label_AUC": dict(zip(labels, auc)),
        "skipped_labels": skipped, "skipped_labels_auc": skipped_auc,
        "n_images": int(len(y)), "n_labels": len(labels),
        "frequency_source": data.frequency_source,
        "thresholds_tuned_here": tuned,
    }
    return summary, per_label


def uncertainty(data: EvalData, label_groups, other: np.ndarray | None = None, other_path=None,
                n_boot: int = M.N_BOOT) -> dict:
    """bootstrap (+ subsets with cache keys, + compare with other predictions): see the docstring."""
    from cxrlt.evaluation.selection import proxy_subset

    studies = data.keys.study if data.keys is not None else None
    out = {"bootstrap": {**M.bootstrap_map(data.y, data.p, studies, label_groups, n_boot),
                         "keys_source": data.keys_source}}
    if data.keys is not None:
        out["subsets"] = {}
        for name, finding in (("proxy", False), ("proxy_finding", True)):
            idx = proxy_subset(data.keys, data.labels, require_finding=finding)
            ci = M.bootstrap_map(data.y[idx], data.p[idx], studies[idx], n_boot=n_boot)["mAP"] if len(idx) else {}
            what = (("frontal, " if data.keys.frontal is not None else "") + "one image per study"
                    + (", with a finding" if finding else ""))
            out["subsets"][name] = {"n_images": int(len(idx)), "what": what, "mAP": ci.get("value", float("nan")),
                                    "low": ci.get("low", float("nan")), "high": ci.get("high", float("nan"))}
    if data.centres is not None:
        out["centres"] = M.per_centre_map(data.y, data.p, data.centres, studies, n_boot)
    if other is not None:
        out["compare"] = {"other": str(other_path),
                          **M.paired_bootstrap(data.y, data.p, other, studies, label_groups, n_boot)}
    return out


def _nan_to_none(obj):
    """JSON has no NaN: undefined metrics become null."""
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _fmt(v, digits=4) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def count_cutoffs(cutoffs: dict) -> tuple[int, int]:
    """(head: at least H images, tail: at most T images): the whole training counts the fraction
    rules of metrics.frequency_groups put in head and in tail (a count c is tail when
    c / n < tail_max_fraction)."""
    n = max(int(cutoffs["n_train_images"]), 1)
    grp = M.frequency_groups(np.arange(n + 1), n, cutoffs["head_min_fraction"], cutoffs["tail_max_fraction"])
    head = next((c for c, g in enumerate(grp) if g == "head"), n + 1)
    tail = max((c for c, g in enumerate(grp) if g == "tail"), default=-1)
    return head, tail


def group_rule(cutoffs: dict) -> str:
    """'head >= 5.0% (>= 70 images), tail < 0.5% (<= 6 images) of 1400 training images'."""
    head, tail = count_cutoffs(cutoffs)
    return (f"head >= {cutoffs['head_min_fraction']:.1%} (>= {head} images), tail < "
            f"{cutoffs['tail_max_fraction']:.1%} (<= {tail} images) of {cutoffs['n_train_images']} training images")


def console_table(summary: dict, per_label: pd.DataFrame) -> str:
    """The summary lines (the per-label table is report.md's alone: one place to read it)."""
    g = summary["group_mAP"]
    lines = [
        f"images {summary['n_images']}  labels {summary['n_labels']}  "
        f"(skipped for mAP, no positive: {', '.join(summary['skipped_labels']) or 'none'})",
        f"mAP {_fmt(summary['mAP'])}  mAUC {_fmt(summary['mAUC'])}  mF1@0.5 {_fmt(summary['mF1'])}  "
        f"mF1@thr {_fmt(summary['mF1_tuned'])}  ECE {_fmt(summary['ece'])}",
        f"group mAP: head {_fmt(g['head'])}  medium {_fmt(g['medium'])}  tail {_fmt(g['tail'])}  "
        f"({group_rule(summary['group_cutoffs'])}; {summary['frequency_source']})",
    ] + uncertainty_lines(summary)
    return "\n".join(lines)


def _ci(d: dict) -> str:
    return f"[{_fmt(d.get('low'))}, {_fmt(d.get('high'))}]"


def uncertainty_lines(summary: dict) -> list[str]:
    """Interval, subset and comparison lines (console and report)."""
    b = summary["bootstrap"]
    lines = [f"95% interval ({b['n_boot']} bootstrap resamples of {b['n_units']} {b['unit']}): mAP "
             f"{_ci(b['mAP'])}; head {_ci(b['head'])}  medium {_ci(b['medium'])}  tail {_ci(b['tail'])}"]
    for name, s in summary.get("subsets", {}).items():
        lines.append(f"{name} ({s['what']}): {s['n_images']} images, mAP {_fmt(s['mAP'])} {_ci(s)}")
    lines += centre_lines(summary.get("centres") or {})
    c = summary.get("compare")
    if c:
        m = c["mAP"]
        lines.append(f"vs {c['other']}: mAP difference {m['diff']:+.4f} {_ci(m)} (paired bootstrap); this file "
                     f"scores higher in {_fmt(m['frac_positive'], 3)} of the resamples")
    return lines


def centre_lines(centres: dict) -> list[str]:
    """One line per centre (cxrlt.evaluation.metrics.per_centre_map's dict): its mAP and 95%
    interval beside the overall one, or why it is not scored."""
    out = []
    for name, c in centres.items():
        if c["scored"]:
            out.append(f"centre {name}: {c['n_images']} images, mAP {_fmt(c['mAP'])} {_ci(c)}")
        else:
            out.append(f"centre {name}: {c['n_images']} images, mAP not shown: {c['why']}")
    return out


def markdown_report(summary: dict, per_label: pd.DataFrame, plots: list[str]) -> str:
    g, c = summary["group_mAP"], summary["group_cutoffs"]
    lines = [
        "# Evaluation report", "",
        f"- predictions: `{summary['pred']}`", f"- labels: `{summary['labels']}`",
        f"- images: {summary['n_images']}, labels: {summary['n_labels']}",
        f"- training frequencies from: {summary['frequency_source']}",
        f"- thresholds: {summary['thresholds_source']}", "",
        "| metric | value |", "|---|---|",
        f"| macro mAP | {_fmt(summary['mAP'])} |",
        *[f"| macro mAP, centre {name} ({c['n_images']} images) | "
          f"{_fmt(c['mAP']) + ' ' + _ci(c) if c['scored'] else 'too few to score'} |"
          for name, c in (summary.get("centres") or {}).items()],
        f"| macro AUC | {_fmt(summary['mAUC'])} |",
        f"| macro F1 @ 0.5 | {_fmt(summary['mF1'])} |",
        f"| macro F1 @ per-label thresholds | {_fmt(summary['mF1_tuned'])} |",
        f"| ECE ({summary['ece_bins']} equal-width bins, all image-label pairs) | {_fmt(summary['ece'])} |",
        f"| mAP head / medium / tail | {_fmt(g['head'])} / {_fmt(g['medium'])} / {_fmt(g['tail'])} |",
        "",
        f"Groups by training frequency: {group_rule(c)}, medium in between.",
        "",
        f"Labels without a positive here (no AP/F1, left out of the means): "
        f"{', '.join(summary['skipped_labels']) or 'none'}.", "",
        *[f"- {x}" for x in uncertainty_lines(summary)], "",
        "| label | group | train | positives | AP | AUC | F1@0.5 | F1@thr | thr |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in per_label.itertuples(index=False):
        lines.append(f"| {r.label} | {r.group} | {int(r.train_count)} | {int(r.positives)} | {_fmt(r.AP)} | "
                     f"{_fmt(r.AUC)} | {_fmt(r.F1)} | {_fmt(r.F1_tuned)} | {_fmt(r.threshold, 3)} |")
    lines += [""] + [f"![{Path(x).stem}]({Path(x).name})" for x in plots]
    lines += provenance_lines(summary.get("provenance") or {})
    return "\n".join(lines) + "\n"


def provenance_of(pred_path, train_log=None) -> dict:
    """{what: provenance record} of the files scored: the predictions (`<pred>.provenance.json`,
    written by predict.py) and the training run (provenance.json beside --train-log); a file
    without one is left out (an older run, or a CSV from elsewhere)."""
    from cxrlt.core import provenance

    found = {"predictions": provenance.read(provenance.beside(pred_path))}
    if train_log:
        found["training"] = provenance.read(Path(train_log).parent / "provenance.json")
    return {k: v for k, v in found.items() if v}


def provenance_lines(prov: dict) -> list[str]:
    """report.md's "Provenance" section: one line per record, then its command line."""
    from cxrlt.core import provenance

    if not prov:
        return ["", "## Provenance", "", "No provenance record beside the predictions (written by predict.py "
                "since provenance.json exists): code and packages unknown."]
    lines = ["", "## Provenance", ""]
    for what, p in prov.items():
        lines += [f"- {what}: {provenance.summary(p)}, {p.get('time')}", f"  `{p.get('command')}`"]
    return lines


# ---- plots (matplotlib Agg, imported lazily so the metrics need no display) --------------------------
def plot_ap_vs_frequency(per_label: pd.DataFrame, summary: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    d = per_label[per_label["AP"].notna()]
    for g in M.GROUPS:
        s = d[d["group"] == g]
        ax.scatter(np.maximum(s["train_count"], 0.8), s["AP"], c=GROUP_COLOURS[g], label=f"{g} ({len(s)})")
    for r in d.itertuples(index=False):
        ax.annotate(r.label, (max(r.train_count, 0.8), r.AP), fontsize=6, xytext=(3, 2), textcoords="offset points")
    c = summary["group_cutoffs"]
    for x in (c["tail_max_count"], c["head_min_count"]):
        if x > 0:
            ax.axvline(x, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training images with the label (log)")
    ax.set_ylabel("AP")
    ax.set_title(f"Per-label AP vs training frequency (mAP {_fmt(summary['mAP'])})")
    ax.legend()
    save_figure(fig, path)


def plot_pr_rarest(data: EvalData, per_label: pd.DataFrame, path, n: int = N_RAREST_PR) -> None:
    """PR curves of the n rarest labels (by training count) that have a positive here."""
    from sklearn.metrics import precision_recall_curve

    plt = pyplot()
    idx = [i for i in np.argsort(data.train_counts, kind="stable") if data.y[:, i].any()][:n]
    cols = 3
    rows = max(1, math.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.ravel()[len(idx):]:
        ax.axis("off")
    for ax, i in zip(axes.ravel(), idx):
        prec, rec, _ = precision_recall_curve(data.y[:, i], data.p[:, i])
        ax.step(rec, prec, where="post")
        ax.axhline(data.y[:, i].mean(), color="grey", ls=":", lw=0.8)  # chance level = prevalence
        ax.set_title(f"{data.labels[i]} (train {int(data.train_counts[i])}, AP {_fmt(per_label['AP'].iloc[i], 3)})",
                     fontsize=8)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    if not idx:
        axes[0, 0].text(0.5, 0.5, "no label has a positive", ha="center")
    fig.suptitle("Precision-recall curves of the rarest labels")
    fig.tight_layout(h_pad=1.5)  # axis labels clear of the next row's titles
    save_figure(fig, path)


def plot_training_curves(records: list[dict], path) -> None:
    """train_loss, val mAP/mAUC and lr per epoch from a training metrics.jsonl."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    # val_mAP is the full val fold; the proxy and the honest (cross-fitted) mAP of the epoch choice,
    # when the log has them (cxrlt/training/trainer.py), show how far the full fold is from the test-like numbers
    panels = [("train_loss", ["train_loss"]), ("validation", ["val_mAP", "val_proxy_mAP", "val_honest_mAP", "val_mAUC"]),
              ("learning rate", ["lr"])]
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            # metrics.jsonl counts epochs from 0 (an index); what is shown counts from 1, as the console does
            pts = [(r["epoch"] + 1, r[k]) for r in records if isinstance(r.get(k), (int, float)) and "epoch" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=8)
    lrs = [r["lr"] for r in records if isinstance(r.get("lr"), (int, float))]
    if lrs and min(lrs) > 0:  # a schedule spans decades; log needs every value > 0
        axes[2].set_yscale("log")
    save_figure(fig, path)


# ---- the whole evaluation --------------------------------------------------------------------------
def evaluate(pred_path, labels_path, out_dir, index_path=None, train_log=None, thresholds_path=None,
             compare_path=None, n_boot: int = M.N_BOOT) -> dict:
    """Score, write every output file in out_dir, print the console table; returns metrics.json's dict."""
    data = load_eval_data(pred_path, labels_path, index_path)
    thr = load_thresholds(thresholds_path, data.labels) if thresholds_path else None
    other = None
    if compare_path:
        other = read_predictions(compare_path, data.labels, expected_ids=data.ids, ids_source=str(pred_path))
        other = other.loc[data.ids].to_numpy()
    summary, per_label = compute_metrics(data, thr)
    summary.update(uncertainty(data, per_label["group"].to_numpy(), other, compare_path, n_boot))
    summary.update(pred=str(pred_path), labels=str(labels_path),
                   thresholds_source=str(thresholds_path) if thresholds_path else "tuned on these labels (max F1 per label)")
    summary["provenance"] = provenance_of(pred_path, train_log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = [out / "ap_vs_frequency.png", out / "pr_curves_rarest.png"]
    plot_ap_vs_frequency(per_label, summary, plots[0])
    plot_pr_rarest(data, per_label, plots[1])
    records = _training_log(train_log)
    if records:
        plots.append(out / "training_curves.png")
        plot_training_curves(records, plots[-1])
    write_csv(out / "per_label.csv", per_label, float_format="%.6g")
    write_json(out / "thresholds.json", {
        "thresholds": dict(zip(data.labels, per_label["threshold"].astype(float))),
        "source": summary["thresholds_source"], "pred": str(pred_path), "labels": str(labels_path)})
    write_text(out / "report.md", markdown_report(summary, per_label, [str(p) for p in plots]))
    summary = _nan_to_none(summary)
    write_json(out / "metrics.json", summary)  # last: its presence marks a finished evaluation
    print(console_table(summary, per_label))
    print(f"per-label table: {out / 'report.md'}")
    return summary


def _training_log(path) -> list[dict]:
    """Epoch records of a training metrics.jsonl (torn last line ignored); [] with a note if absent."""
    if not path:
        return []
    if not os.path.isfile(path):
        print(f"note: no training log at {path}; skipping the training-curve plot")
        return []
    records = [r for r in read_jsonl(path) if isinstance(r, dict) and "epoch" in r]
    if not records:
        print(f"note: {path} has no epoch records; skipping the training-curve plot")
    return records
