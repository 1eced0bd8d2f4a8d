"""A study's report: every run's val predictions scored as evaluate.py scores them, compared with
the baseline's with bootstrap intervals, written as tables and plots.

Report (`report`; `study.py report`, the Makefile's reports/<name>/table.md rule) reads every
run's pred_val.csv and its train cache and writes reports/<name>/:

(the files: docs/formats.md, "Study outputs")

Statistics. The point metrics are evaluate.py's (cxrlt.evaluation.report.compute_metrics): macro mAP,
macro AUC, macro F1 at per-label thresholds tuned on the same val fold (optimistic, as in every
run's own report) and head/medium/tail mAP by training frequency. The intervals resample the val
fold's STUDIES (cxrlt.evaluation.metrics, 1000 resamples, 95% percentile; the resampling seed is
metrics.BOOT_SEED + fold). A run is paired with the baseline's run of the same seed and fold (same
images). One run per variant: metrics.bootstrap_map and metrics.paired_bootstrap as they are.
Several runs (seeds / folds): the value is the mean over runs +- sd, and the interval is the
bootstrap interval of that mean: every resample draws each fold's studies once and averages the
runs' statistics on it (metrics.resample_weights + metrics.resampled_ap), so the sd shows the seed
spread and the interval the split noise of the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from cxrlt.core import provenance
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import write_csv, write_text
from cxrlt.evaluation import metrics as M
from cxrlt.evaluation.plotting import GROUP_COLOURS, pyplot, save_figure
from cxrlt.evaluation.report import compute_metrics, load_eval_data
from cxrlt.pipeline.fingerprints import file_key, inputs_match, record_inputs, touch
from cxrlt.studies.spec import read_manifest


# ---- loading the runs' predictions ------------------------------------------------------------------------
@dataclass
class RunResult:
    stem: str
    variant: str
    seed: int
    fold: int
    ids: list[str]
    labels: list[str]
    y: np.ndarray
    p: np.ndarray
    studies: np.ndarray | None  # (N,) study key per image (the bootstrap unit); None: images are the units

    @property
    def units(self) -> np.ndarray:
        return self.studies if self.studies is not None else np.arange(len(self.ids))
    summary: dict  # compute_metrics' summary
    per_label: object  # compute_metrics' per-label DataFrame
    centres: np.ndarray | None = None  # (N,) centre per image (the cache's `centre` column)


def load_run(stem: str, run: dict, run_dir, cache_dir) -> RunResult:
    """A run's val predictions scored as evaluate.py scores them."""

    data = load_eval_data(Path(run_dir) / "pred_val.csv", Path(cache_dir) / "index.csv")
    summary, per_label = compute_metrics(data)
    studies = data.keys.study if data.keys is not None else None  # as evaluate.py's interval does
    return RunResult(stem, run["variant"], int(run["seed"]), int(run["fold"]), list(data.ids), list(data.labels),
                     data.y, data.p, studies, summary, per_label, data.centres)


# ---- statistics -----------------------------------------------------------------------------------------
def _label_groups(r: RunResult) -> np.ndarray:
    return r.per_label["group"].to_numpy()


def _boot_seed(fold: int) -> int:

    return M.BOOT_SEED + int(fold)


def _row_means(ap: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Per resample (rows of ap (B, C)): macro mAP and the mean AP of each label group (NaN skipped)."""

    def mean(cols):
        sub = ap[:, cols]
        n = (~np.isnan(sub)).sum(1)
        return np.where(n > 0, np.nansum(sub, 1) / np.maximum(n, 1), np.nan)

    out = {"mAP": mean(np.ones(ap.shape[1], bool))}
    out.update({g: mean(groups == g) for g in M.GROUPS})
    return out


def _percentiles(v: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


class Resamples:
    """Per-resample statistics of runs, the weights drawn once per fold (shared by all runs that
    predict that fold's images, which is what pairs them)."""

    def __init__(self, n_boot: int):
        self.n_boot = n_boot
        self._weights: dict[int, np.ndarray] = {}
        self._stats: dict[str, dict[str, np.ndarray]] = {}

    def stats(self, r: RunResult) -> dict[str, np.ndarray]:

        if r.stem not in self._stats:
            if r.fold not in self._weights:
                self._weights[r.fold] = M.resample_weights(r.units, self.n_boot, _boot_seed(r.fold))
            self._stats[r.stem] = _row_means(M.resampled_ap(r.y, r.p, self._weights[r.fold]), _label_groups(r))
        return self._stats[r.stem]

    def centre(self, r: RunResult, name: str) -> tuple[float, np.ndarray] | str:
        """(mAP, per-resample mAP) of run r's images of centre `name`, on the same resamples as its
        whole fold (the weights of those images' studies); or why it is too few to score."""

        idx = np.flatnonzero(np.asarray(r.centres).astype(str) == name)
        why = M.centre_too_few(r.y[idx])
        if why:
            return why
        self.stats(r)  # draws the fold's weights
        ap = M.resampled_ap(r.y[idx], r.p[idx], self._weights[r.fold][:, idx])
        return M.macro_map(r.y[idx], r.p[idx])[0], _row_means(ap, _label_groups(r))["mAP"]


def _check_paired(r: RunResult, b: RunResult) -> None:
    if r.ids != b.ids or r.labels != b.labels:
        raise InputError(f"runs {r.stem} and {b.stem} predict different images or labels (seed {r.seed}, "
                         f"fold {r.fold}): a variant must be validated on the baseline's images")


def _pair(r: RunResult, baseline_runs: list[RunResult]) -> RunResult:
    """The baseline run to compare run r with: same seed and fold, else the first one on r's fold."""
    same = [b for b in baseline_runs if b.fold == r.fold and b.seed == r.seed] or \
           [b for b in baseline_runs if b.fold == r.fold]
    if not same:
        raise InputError(f"run {r.stem}: the baseline has no run on fold {r.fold} to compare it with")
    _check_paired(r, same[0])
    return same[0]


def _sd(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


def variant_row(variant: str, runs: list[RunResult], baseline_runs: list[RunResult], is_baseline: bool,
                n_boot: int, resamples: Resamples, centres: tuple = ()) -> dict:
    """One table row: point metrics (mean and sd over runs), bootstrap intervals, paired difference,
    and the mAP of each of `centres` (its images only) with its interval, NaN when too few."""

    row = {"variant": variant, "baseline": int(is_baseline), "runs": len(runs)}
    for key, get in (("mAP", lambda r: r.summary["mAP"]), ("mAUC", lambda r: r.summary["mAUC"]),
                     ("mF1_tuned", lambda r: r.summary["mF1_tuned"])):
        vals = [get(r) for r in runs]
        row[key], row[f"{key}_sd"] = float(np.mean(vals)), _sd(vals)
    pairs = [_pair(r, baseline_runs) for r in runs]
    if len(runs) == 1:
        r, b = runs[0], pairs[0]
        ci = M.bootstrap_map(r.y, r.p, r.studies, _label_groups(r), n_boot, _boot_seed(r.fold))
        boot = {k: (ci[k]["low"], ci[k]["high"]) for k in ("mAP", *M.GROUPS)}
        d = M.paired_bootstrap(r.y, r.p, b.p, r.studies, _label_groups(r), n_boot, _boot_seed(r.fold))["mAP"]
        diff = (d["diff"], d["low"], d["high"], d["frac_positive"])
        diff_sd = math.nan
    else:
        mean_stats = {k: np.mean([resamples.stats(r)[k] for r in runs], axis=0) for k in ("mAP", *M.GROUPS)}
        boot = {k: _percentiles(v) for k, v in mean_stats.items()}
        d = np.mean([resamples.stats(r)["mAP"] - resamples.stats(b)["mAP"] for r, b in zip(runs, pairs)], axis=0)
        diffs = [r.summary["mAP"] - b.summary["mAP"] for r, b in zip(runs, pairs)]
        fin = d[np.isfinite(d)]
        diff = (float(np.mean(diffs)), *_percentiles(d), float((fin > 0).mean()) if len(fin) else math.nan)
        diff_sd = _sd(diffs)
    row["mAP_low"], row["mAP_high"] = boot["mAP"]
    for g in M.GROUPS:
        vals = [r.summary["group_mAP"][g] for r in runs]
        row[f"{g}_mAP"] = float(np.mean(vals))  # NaN when the group has no label with a positive
        row[f"{g}_sd"] = _sd(vals)
        row[f"{g}_low"], row[f"{g}_high"] = boot[g]
    if is_baseline:
        row.update(diff_mAP=math.nan, diff_sd=math.nan, diff_low=math.nan, diff_high=math.nan, p_better=math.nan)
    else:
        row.update(diff_mAP=diff[0], diff_sd=diff_sd, diff_low=diff[1], diff_high=diff[2], p_better=diff[3])
    for name in centres:
        got = [resamples.centre(r, name) for r in runs]
        row[f"n_images_{name}"] = int(np.mean([(np.asarray(r.centres).astype(str) == name).sum() for r in runs]))
        if any(isinstance(g, str) for g in got):  # too few in some run: no number
            row.update({f"mAP_{name}": math.nan, f"mAP_{name}_low": math.nan, f"mAP_{name}_high": math.nan,
                        f"scored_{name}": 0})
        else:
            lo, hi = _percentiles(np.mean([g[1] for g in got], axis=0))
            row.update({f"mAP_{name}": float(np.mean([g[0] for g in got])), f"mAP_{name}_low": lo,
                        f"mAP_{name}_high": hi, f"scored_{name}": 1})
    row["n_images"] = int(np.mean([len(r.ids) for r in runs]))
    row["unit"] = "studies" if runs[0].studies is not None else "images"
    row["n_units"] = int(np.mean([len(set(r.units)) for r in runs]))
    row["stems"] = ";".join(r.stem for r in runs)
    return row


def compare(manifest: dict, results: dict[str, RunResult], n_boot: int | None = None):
    """-> (table DataFrame, per-label DataFrame) for the study's variants (see the module docstring)."""
    import pandas as pd


    n_boot = n_boot or M.N_BOOT
    by_variant: dict[str, list[RunResult]] = {v["name"]: [] for v in manifest["variants"]}
    for run in manifest["runs"]:
        if run["stem"] not in results:
            raise InputError(f"study '{manifest['name']}': no results for run {run['stem']} (pass --run for it)")
        by_variant[run["variant"]].append(results[run["stem"]])
    first = next(iter(results.values()))
    for r in results.values():
        if r.labels != first.labels:
            raise InputError(f"runs {first.stem} and {r.stem} have different label sets")
    resamples = Resamples(n_boot)
    base = manifest["baseline"]
    centres = sorted({str(c) for r in results.values() if r.centres is not None for c in r.centres})
    rows = [variant_row(v, runs, by_variant[base], v == base, n_boot, resamples, centres)
            for v, runs in by_variant.items()]
    table = pd.DataFrame(rows)
    pl = first.per_label[["label", "group", "train_count"]].copy()
    for v, runs in by_variant.items():
        pl[v] = np.mean([r.per_label["AP"].to_numpy(dtype=np.float64) for r in runs], axis=0)
    pl = pl.sort_values("train_count", ascending=False, kind="stable").reset_index(drop=True)
    return table, pl


# ---- writing the report ------------------------------------------------------------------------------------
def _f(v, digits=3) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _signed(v, digits=3) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:+.{digits}f}"


def _cell(row, key: str, sd_key: str, low=None, high=None) -> str:
    s = _f(row[key])
    if row["runs"] > 1 and np.isfinite(row[sd_key]):
        s += f" ± {_f(row[sd_key])}"
    if low is not None:
        s += f" [{_f(row[low])}, {_f(row[high])}]"
    return s


def provenance_footnote(where: dict) -> list[str]:
    """table.md's footnote: the distinct provenance lines (cxrlt/core/provenance.py) of the runs'
    trainings (RUN/provenance.json) and predictions (pred_val.csv.provenance.json), each with the
    runs it covers; where = {stem: (run folder, cache folder)}."""

    seen: dict[str, list[str]] = {}
    for stem, (run_dir, _) in sorted(where.items()):
        for what, path in (("training", Path(run_dir) / "provenance.json"),
                           ("predictions", provenance.beside(Path(run_dir) / "pred_val.csv"))):
            rec = provenance.read(path)
            line = f"{what}: {provenance.summary(rec)}" if rec else f"{what}: unknown (no {path.name})"
            seen.setdefault(line, []).append(stem)
    n = len(where)
    return [f"- {line} ({'all runs' if len(stems) == n else ', '.join(stems)})" for line, stems in seen.items()]


def markdown_table(manifest: dict, table, n_boot: int, footnote: list[str] | None = None) -> str:
    seeds = manifest.get("seeds")
    folds = manifest.get("folds")
    first = table.iloc[0]
    lines = [
        f"# Study `{manifest['name']}`", "",
        f"- study file: `{manifest.get('file', '')}`; baseline: `{manifest['baseline']}`",
        f"- runs per variant: {int(table['runs'].max())} (seeds {seeds if seeds else 'as configured'}, "
        f"val folds {folds if folds else 'as configured'})",
        f"- val images: {first['n_images']}" + (f" in {first['n_units']} studies" if first["unit"] == "studies" else ""),
        f"- intervals: 95% percentile bootstrap over val {first['unit']} ({n_boot} resamples); Δ: paired "
        f"(variant and baseline scored on the same resamples); * = the Δ interval excludes 0",
        "- mF1: macro F1 at per-label thresholds tuned on the same val fold (optimistic)",
    ]
    if int(table["runs"].max()) > 1:
        lines.append("- with several runs: mean ± sd over runs; the interval is that of the mean")
    lines += ["", "| variant | mAP [95% CI] | Δ mAP vs baseline [95% CI] | P(better) | mAUC | mF1 | head | medium | tail |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for _, r in table.iterrows():
        name = f"**{r['variant']}** (baseline)" if r["baseline"] else r["variant"]
        if r["baseline"]:
            diff, pb = "—", "—"
        else:
            star = "*" if r["diff_low"] > 0 or r["diff_high"] < 0 else ""
            diff = f"{_signed(r['diff_mAP'])}{star}"
            if r["runs"] > 1 and np.isfinite(r["diff_sd"]):
                diff += f" ± {_f(r['diff_sd'])}"
            diff += f" [{_signed(r['diff_low'])}, {_signed(r['diff_high'])}]"
            pb = _f(r["p_better"], 2)
        lines.append(f"| {name} | {_cell(r, 'mAP', 'mAP_sd', 'mAP_low', 'mAP_high')} | {diff} | {pb} | "
                     f"{_cell(r, 'mAUC', 'mAUC_sd')} | {_cell(r, 'mF1_tuned', 'mF1_tuned_sd')} | "
                     f"{_cell(r, 'head_mAP', 'head_sd')} | {_cell(r, 'medium_mAP', 'medium_sd')} | "
                     f"{_cell(r, 'tail_mAP', 'tail_sd')} |")
    lines += centre_table(table)
    lines += ["", "![mAP per variant](map.png)", "", "![head / medium / tail](groups.png)", "",
              "![per-label AP](per_label_ap.png)", ""]
    if footnote:
        lines += ["Provenance (code, packages, machine; docs/formats.md \"provenance.json\"):", "", *footnote, ""]
    return "\n".join(lines)


def centre_table(table) -> list[str]:
    """The per-centre mAP of every variant (its val images of that centre only), or 'too few'."""
    names = [c[len("scored_"):] for c in table.columns if c.startswith("scored_")]
    if not names:
        return []
    lines = ["", "Per centre (each centre's val images scored apart; 95% interval on the same resamples):", "",
             "| variant | overall mAP | " + " | ".join(f"{n} mAP [95% CI]" for n in names) + " |",
             "|---|---:|" + "---|" * len(names)]
    for _, r in table.iterrows():
        cells = []
        for n in names:
            if r[f"scored_{n}"]:
                cells.append(f"{_f(r[f'mAP_{n}'])} [{_f(r[f'mAP_{n}_low'])}, {_f(r[f'mAP_{n}_high'])}] "
                             f"({r[f'n_images_{n}']} images)")
            else:
                cells.append(f"too few to score ({r[f'n_images_{n}']} images)")
        lines.append(f"| {r['variant']} | {_f(r['mAP'])} | " + " | ".join(cells) + " |")
    return lines


def _interval_bars(ax, pos, low, high, vertical: bool = False) -> None:
    """Intervals drawn from low to high (not as +- errors: a percentile interval need not hold its estimate)."""
    ok = np.isfinite(low) & np.isfinite(high)
    lines = ax.vlines if vertical else ax.hlines
    lines(pos[ok], low[ok], high[ok], color="grey", lw=1.5)
    cap = "_" if vertical else "|"
    for end in (low, high):
        ax.plot(*((pos[ok], end[ok]) if vertical else (end[ok], pos[ok])), cap, color="grey", ms=8)


def plot_map(table, path) -> None:
    """Left: mAP with its interval per variant; right: the paired difference to the baseline."""


    plt = pyplot()
    n = len(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * n + 1.6), sharey=True)
    y = np.arange(n)[::-1].astype(float)
    col = lambda k: table[k].to_numpy(float)  # noqa: E731
    _interval_bars(axes[0], y, col("mAP_low"), col("mAP_high"))
    axes[0].scatter(col("mAP"), y, c=["tab:red" if b else "tab:blue" for b in table["baseline"]], zorder=3)
    axes[0].set_yticks(y, table["variant"])
    axes[0].set_xlabel("val mAP (95% bootstrap interval)")
    axes[1].axvline(0, color="tab:red", lw=1)
    _interval_bars(axes[1], y, col("diff_low"), col("diff_high"))
    axes[1].scatter(col("diff_mAP"), y, c="tab:blue", zorder=3)
    axes[1].set_xlabel("Δ mAP vs baseline (paired 95% interval)")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(6))
    fig.suptitle("mAP per variant (red: baseline)")
    save_figure(fig, path)


def plot_groups(table, path) -> None:

    plt = pyplot()
    n = len(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * n + 2), 4.2))
    x = np.arange(n)
    width = 0.8 / len(M.GROUPS)
    for i, g in enumerate(M.GROUPS):
        v = table[f"{g}_mAP"].to_numpy(float)
        ax.bar(x + (i - 1) * width, np.nan_to_num(v), width, color=GROUP_COLOURS[g], label=g)
        _interval_bars(ax, x + (i - 1) * width, table[f"{g}_low"].to_numpy(float),
                       table[f"{g}_high"].to_numpy(float), vertical=True)
    ax.set_xticks(x, table["variant"], rotation=30, ha="right")
    ax.set_ylabel("val mAP of the group (95% interval)")
    ax.set_ylim(0, 1)
    ax.legend(ncols=3, loc="upper center", bbox_to_anchor=(0.5, 1.12))
    save_figure(fig, path)


def plot_heatmap(per_label, variants: list[str], path) -> None:

    plt = pyplot()
    data = per_label[variants].to_numpy(float)
    fig, ax = plt.subplots(figsize=(1.0 * len(variants) + 4, 0.28 * len(per_label) + 1.8))
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_yticks(range(len(per_label)),
                  [f"{r.label} ({r.group[0]}, {int(r.train_count)})" for r in per_label.itertuples()], fontsize=7)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if data[i, j] < 0.5 else "black")
            else:
                ax.text(j, i, "no val positive", ha="center", va="center", fontsize=5, color="grey")
    fig.colorbar(im, ax=ax, label="val AP")
    ax.set_title("Per-label AP (rows: most frequent label first; (group, training count))")
    save_figure(fig, path)


def write_report(manifest: dict, table, per_label, out_dir, n_boot: int, footnote: list[str] | None = None) -> None:

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "per_label.csv", per_label, float_format="%.6g", index=False)
    plot_map(table, out / "map.png")
    plot_groups(table, out / "groups.png")
    plot_heatmap(per_label, list(table["variant"]), out / "per_label_ap.png")
    write_csv(out / "table.csv", table, float_format="%.6g", index=False)
    # table.md is Make's target: written last, so its presence means the report is complete
    write_text(out / "table.md", markdown_table(manifest, table, n_boot, footnote))


def report(manifest_path, runs: list[tuple[str, str, str]], out_dir, n_boot: int | None = None) -> dict:
    """The study's report from its manifest and (stem, run folder, train cache folder) per run.

    Like every stage Make runs: when the inputs (manifest + every prediction file's content + each
    cache's key) are those the existing report was built from, it only touches table.md."""

    manifest = read_manifest(manifest_path)
    n_boot = n_boot or M.N_BOOT
    where = {stem: (run_dir, cache_dir) for stem, run_dir, cache_dir in runs}
    unknown = sorted(set(where) - {r["stem"] for r in manifest["runs"]})
    if unknown:
        raise InputError(f"--run {unknown[0]}: not a run of study '{manifest['name']}' ({manifest_path})")
    missing = [r["stem"] for r in manifest["runs"] if r["stem"] not in where]
    if missing:
        raise InputError(f"study '{manifest['name']}': no --run given for {', '.join(missing)}")
    inputs = {"manifest": {k: manifest[k] for k in ("name", "baseline", "variants", "runs")}, "n_boot": n_boot,
              "runs": {s: {"pred": file_key(Path(d) / "pred_val.csv"), "index": file_key(Path(c) / "index.csv")}
                       for s, (d, c) in sorted(where.items())}}
    target = Path(out_dir) / "table.md"
    if inputs_match(target, inputs):
        touch(target)
        print(f"{target}: up to date")
        return {"up_to_date": True}
    results = {r["stem"]: load_run(r["stem"], r, *where[r["stem"]]) for r in manifest["runs"]}
    table, per_label = compare(manifest, results, n_boot)
    write_report(manifest, table, per_label, out_dir, n_boot, provenance_footnote(where))
    record_inputs(target, inputs)
    print(markdown_table(manifest, table, n_boot).split("\n\n![")[0])
    return {"table": table, "per_label": per_label}
