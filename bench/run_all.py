#!/usr/bin/env python
"""Run every benchmark, print one table and write it to bench/results.md (`make bench`).

    python bench/run_all.py [--quick] [--only NAME ...] [--skip NAME ...] [--out bench/results.md]

Stages (each a subprocess writing JSON; its console output goes to bench/out/logs/NAME.log):
  preprocess  bench_preprocess.py  cache build images/s per worker vs cv2.imread; 2 workers vs 1
  loader      bench_loader.py      training loader from the cache vs decode-and-resize per access
  train_step  bench_train_step.py  Trainer step vs a bare PyTorch loop
  predict     bench_predict.py     predict_tta per view vs a bare forward pass
  crt         bench_crt.py         cRT on cached features vs the frozen backbone every epoch
  memory      bench_memory.py      peak RSS of train.py / predict.py on caches of 2,000 and 20,000 images
  crt_memory  bench_memory.py --crt  peak RSS of retrain_head.py (pooled and csra heads), 2,000 vs 10,000
                                   images (the script's own default, 20,000, takes ~5 min alone)
  gpu         gpu_check.py (make gpu-check's rows, one JSON line each as measured: a stage that times
              out keeps the rows it wrote), only when torch.cuda.is_available()
Every ratio in the table is measured within this run, with the absolute figures beside it.
Settings are sized for a 2-core CPU, where the CPU stages take about 7 minutes. They share a
total budget (--budget, 600 s): each stage may run for what is left of it (and at most --timeout);
a stage that would start with less than MIN_STAGE_S left is not run, and its row says so. The
GPU stage is outside the budget (compiling the large models alone takes minutes).
--quick uses tiny settings (a smoke test of the whole chain, numbers meaningless).

Files: bench/results.md (Markdown: date, machine, versions, the table, notes, per-stage load);
bench/out/results.json (every stage's raw numbers); bench/out/logs/<stage>.log.
Exit status 1 if a stage failed (its row says so); targets missed do not change the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, children_cpu_seconds

HERE = Path(__file__).resolve().parent
STAGE_TIMEOUT_S = 300  # one stuck stage must not hold `make bench` forever
BUDGET_S = 600  # all CPU stages together
MIN_STAGE_S = 20  # a stage is not started with less of the budget left (it could not finish)


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def stage_commands(quick: bool, out: Path) -> dict[str, list[str]]:
    """Stage name -> command line (without --json)."""
    py = sys.executable
    b = lambda name: str(HERE / name)  # noqa: E731
    keep = str(out / "preprocess_images")  # synthetic PNGs kept between runs (~6 MB each)
    if quick:
        return {
            "preprocess": [py, b("bench_preprocess.py"), "--n", "4", "--repeats", "1", "--keep", keep + "_quick"],
            "loader": [py, b("bench_loader.py"), "--n", "2", "--passes", "1", "--size", "64",
                       "--src-h", "250", "--src-w", "200"],
            "train_step": [py, b("bench_train_step.py"), "--size", "32", "--batch", "4", "--steps", "3",
                           "--repeats", "1"],
            "predict": [py, b("bench_predict.py"), "--size", "32", "--batch", "4", "--batches", "3",
                        "--repeats", "1"],
            "crt": [py, b("bench_crt.py"), "--size", "32", "--train", "32", "--val", "16", "--epochs", "2",
                    "--batch", "8"],
            "memory": [py, b("bench_memory.py"), "--sizes", "40", "400", "--size", "32", "--val", "8",
                       "--test", "8", "--batch", "4", "--train-batches", "1"],
            "crt_memory": [py, b("bench_memory.py"), "--crt", "--sizes", "40", "400", "--size", "32", "--val", "8"],
            "gpu": [py, b("gpu_check.py"), "--dry-run", "--rows", "trainer_step_eager", "--out",
                    str(out / "gpu_check.jsonl")],
        }
    return {
        "preprocess": [py, b("bench_preprocess.py"), "--n", "24", "--repeats", "2", "--keep", keep],
        "loader": [py, b("bench_loader.py"), "--n", "8", "--passes", "5"],
        "train_step": [py, b("bench_train_step.py"), "--repeats", "8"],
        "predict": [py, b("bench_predict.py"), "--repeats", "5"],
        "crt": [py, b("bench_crt.py")],
        "memory": [py, b("bench_memory.py")],
        "crt_memory": [py, b("bench_memory.py"), "--crt", "--sizes", "2000", "10000"],
        "gpu": [py, b("gpu_check.py"), "--out", str(out / "gpu_check.jsonl")],  # one line per row as it comes
    }


def cpu_busy_seconds() -> float:
    """Seconds of CPU time used by everything on the machine so far (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_stage(name: str, cmd: list[str], out: Path, timeout: float) -> dict:
    """Run one stage -> {"ok", "result", "wall_s", "others_cores", "load_before", "log"}."""
    js, log = out / f"{name}.json", out / "logs" / f"{name}.log"
    js.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    busy0, ours0, t0 = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    err = None
    with open(log, "w") as f:
        try:
            p = subprocess.run([*cmd, "--json", str(js)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                               timeout=timeout)
            if p.returncode != 0:
                err = f"exit status {p.returncode}"
        except subprocess.TimeoutExpired:
            err = f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    # CPU the rest of the machine used meanwhile, in cores: the other engineer's load
    others = (cpu_busy_seconds() - busy0 - (children_cpu_seconds() - ours0)) / max(wall, 1e-9)
    res = None
    if err is None:
        try:
            res = json.loads(js.read_text())
        except (OSError, json.JSONDecodeError) as e:
            err = f"no JSON result ({e})"
    return {"ok": err is None, "error": err, "result": res, "wall_s": wall, "others_cores": max(0.0, others),
            "load_before": load0, "log": str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log)}


def run_stages(names: list[str], cmds: dict, work: Path, deadline: float, budget: float, limit: float) -> dict:
    """Run the stages in order, each for at most `limit` s and what is left until `deadline` (the
    GPU stage: 3 x limit, outside the budget) -> {name: run_stage's record}."""
    stages = {}
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", end=" ", file=sys.stderr, flush=True)
        timeout = limit * 3 if name == "gpu" else min(limit, deadline - time.perf_counter())
        if timeout < MIN_STAGE_S:
            why = f"not run: {max(0.0, timeout):.0f} s of the {budget:.0f} s budget left"
            stages[name] = {"ok": False, "error": why, "result": None, "wall_s": 0.0, "log": "-"}
        else:
            stages[name] = run_stage(name, cmds[name], work, timeout)
        st = stages[name]
        print(f"{st['wall_s']:.0f} s" + ("" if st["ok"] else f"  FAILED: {st['error']} (see {st['log']})"),
              file=sys.stderr, flush=True)
    return stages


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    what: str
    ours: str
    baseline: str
    ratio: str
    target: str
    met: str  # "yes" | "no" | "-" | "failed"
    stage: str


def _x(v: float) -> str:
    return f"{v:.2f}x"


def rows_preprocess(r: dict) -> list[Row]:
    busy = f" (cores kept busy: 1 worker {r['w1_cores_busy']:.2f}, 2 workers {r['w2_cores_busy']:.2f})"
    return [
        Row("1a", f"preprocess: images/s per worker ({r['n_images']} PNGs 2000x2500 16-bit -> {r['size']} px)",
            f"{r['cache_w1_img_s']:.2f} img/s (cache build, 1 worker)", f"{r['bare_decode_img_s']:.2f} img/s (cv2.imread)",
            _x(r["w1_vs_decode"]), ">= 0.80x", "yes" if r["w1_vs_decode"] >= 0.8 else "no", "preprocess"),
        Row("1b", "preprocess: 2 workers vs 1" + busy,
            f"{r['cache_w2_img_s']:.2f} img/s (2 workers)", f"{r['cache_w1_img_s']:.2f} img/s (1 worker)",
            _x(r["w2_vs_w1"]), ">= 1.80x", "yes" if r["w2_vs_w1"] >= 1.8 else "no", "preprocess"),
    ]


def rows_loader(r: dict) -> list[Row]:
    return [Row("2", f"training loader @ {r['size']} px with augmentation, 1 process",
                f"{r['cache_images_per_s']:.0f} img/s (cache memmap)",
                f"{r['decode_resize_images_per_s']:.1f} img/s (decode + resize per access)",
                f"{r['ratio']:.1f}x", f">= {r['target_ratio']:.0f}x", "yes" if r["ratio"] >= r["target_ratio"] else "no",
                "loader")]


def rows_train(r: dict) -> list[Row]:
    what = (f"train step: Trainer.train_epoch vs bare loop ({r['model']} @ {r['size']} px, batch {r['batch']}, "
            f"{r['workers']} loader worker, {r['torch_threads']} torch thread(s))")
    return [
        Row("3a", what + ", wall clock", f"{r['trainer_ms_per_step']:.0f} ms/step", f"{r['bare_ms_per_step']:.0f} ms/step",
            _x(r["ratio"]), "<= 1.10x", "yes" if r["ratio"] <= 1.10 else "no", "train_step"),
        Row("3b", "train step: CPU time per step (main process + loader worker)",
            f"{r['trainer_cpu_ms_per_step']:.0f} ms/step", f"{r['bare_cpu_ms_per_step']:.0f} ms/step",
            _x(r["cpu_ratio"]), "<= 1.10x", "yes" if r["cpu_ratio"] <= 1.10 else "no", "train_step"),
    ]


def rows_predict(r: dict) -> list[Row]:
    out = []
    for key, tta, views in (("4a", "none", 1), ("4b", "flip_scale", 4)):
        ratio = r[f"{tta}_ratio"]
        out.append(Row(key, f"predict: predict_tta tta={tta} ({views} view{'s' * (views > 1)}) per view per image vs "
                            f"bare model(x) ({r['model']} @ {r['size']} px, batch {r['batch']})",
                       f"{r[f'{tta}_ms_per_view_image']:.2f} ms", f"{r['bare_ms_per_image']:.2f} ms",
                       f"{_x(ratio)} (CPU {_x(r[f'{tta}_cpu_ratio'])})", "<= 1.10x", "yes" if ratio <= 1.10 else "no",
                       "predict"))
    return out


def rows_crt(r: dict) -> list[Row]:
    return [Row("5", f"cRT, {r['epochs']} head epochs on {r['train_images']}+{r['val_images']} images "
                     f"({r['model']} @ {r['size']} px): crt_feature_cache float32 vs off (backbone every epoch)",
                f"{r['cached_total_s']:.1f} s ({r['extract_s']:.1f} s extraction + {r['head_epochs_s']:.1f} s head)",
                f"{r['backbone_every_epoch_s']:.1f} s",
                f"{_x(r['speedup_incl_extract'])} ({_x(r['speedup_excl_scoring'])} without val scoring)",
                f"> 1x (ideal ~{r['epochs']}x)", "yes" if r["speedup_incl_extract"] > 1 else "no", "crt")]


MEMORY_SLACK_MB = 5.0  # arrays derived from the index (row lists, target copies, sampler) on top of it


def rows_memory(r: dict) -> list[Row]:
    lo, hi = (str(s) for s in (min(r["sizes"]), max(r["sizes"])))
    allow = r["index_allowance_mb"]
    out = []
    for key, s in (("6a", "train"), ("6b", "predict")):
        a, b = r["runs"][lo][s], r["runs"][hi][s]
        g = r["growth_mb"][s]["maxrss_mb"]
        what = (f"peak RSS of {s}.py, cache of {int(lo):,} vs {int(hi):,} images @ {r['size']} px "
                f"(same work; images.npy {r['runs'][hi]['images_npy_mb']:.0f} MB at {int(hi):,}; fixed malloc threshold)")
        out.append(Row(key, what, f"{b['maxrss_mb']:.0f} MB (N={int(hi):,})", f"{a['maxrss_mb']:.0f} MB (N={int(lo):,})",
                       f"{g:+.1f} MB", f"growth <= index +{allow:.1f} MB (+{MEMORY_SLACK_MB:.0f})",
                       "yes" if g <= allow + MEMORY_SLACK_MB else "no", "memory"))
    return out


CRT_MEMORY_ROWS = (("6c", "crt_linear", "pooled linear head, float32 features"),
                   ("6d", "crt_csra", "csra head, float16 maps"))


def rows_crt_memory(r: dict) -> list[Row]:
    lo, hi = (str(s) for s in (min(r["sizes"]), max(r["sizes"])))
    allow = r["index_allowance_mb"]
    out = []
    for key, s, what in CRT_MEMORY_ROWS:
        if s not in r["growth_mb"]:
            continue
        a, b = r["runs"][lo][s], r["runs"][hi][s]
        # the heap too: the process's peak RSS is set early (imports, model build) and hides tens of MB of
        # features held later in memory; its peak RssAnon does not
        g_rss, g_anon = r["growth_mb"][s]["maxrss_mb"], r["growth_mb"][s]["main_anon_mb"]
        g = max(g_rss, g_anon)
        desc = (f"peak RSS and heap (RssAnon) of retrain_head.py ({what}), {int(lo):,} vs {int(hi):,} images @ "
                f"{r['size']} px, {r['model']} (features on disk {a['feature_mb']:.1f} -> {b['feature_mb']:.1f} MB; "
                f"fixed malloc threshold)")
        out.append(Row(key, desc, f"{b['maxrss_mb']:.0f} MB (N={int(hi):,})", f"{a['maxrss_mb']:.0f} MB (N={int(lo):,})",
                       f"{g_rss:+.1f} MB (heap {g_anon:+.1f} MB)", f"growth <= index +{allow:.1f} MB (+{MEMORY_SLACK_MB:.0f})",
                       "yes" if g <= allow + MEMORY_SLACK_MB else "no", "crt_memory"))
    return out


ROW_BUILDERS = {"preprocess": rows_preprocess, "loader": rows_loader, "train_step": rows_train,
                "predict": rows_predict, "crt": rows_crt, "memory": rows_memory, "crt_memory": rows_crt_memory}
FAILED_KEYS = {"preprocess": "1", "loader": "2", "train_step": "3", "predict": "4", "crt": "5", "memory": "6",
               "crt_memory": "6c"}


def build_rows(stages: dict) -> list[Row]:
    """Rows for every stage that ran (a failed stage gets one 'failed' row naming its log)."""
    rows = []
    for name, build in ROW_BUILDERS.items():
        st = stages.get(name)
        if st is None:
            continue
        if st["ok"]:
            try:
                rows += build(st["result"])
                continue
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                st = {**st, "error": f"unexpected result ({type(e).__name__}: {e})"}
        rows.append(Row(FAILED_KEYS[name], f"{name}: {st['error']}", "-", "-", "-", "-", "failed", name))
    return rows


def table_markdown(rows: list[Row], stages: dict) -> str:
    head = ("| # | measurement | ours | baseline | ratio | target | met | others' load |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        st = stages.get(r.stage, {})
        load = f"{st['others_cores']:.1f} cores" if "others_cores" in st else "-"
        lines.append(f"| {r.key} | {r.what} | {r.ours} | {r.baseline} | {r.ratio} | {r.target} | {r.met} | {load} |")
    return head + "\n".join(lines) + "\n"


GPU_COLUMNS = (("images_per_s", "images/s", "{:.1f}"), ("mfu", "MFU", "{:.1%}"),
               ("data_wait_frac", "data wait", "{:.1%}"), ("max_mem_gb", "peak GB", "{:.1f}"))


def gpu_check_table(lines: list[dict]) -> str:
    """bench/gpu_check.py's JSON lines (as many as were written) as a markdown table."""
    meta = next((r for r in lines if r.get("row") == "meta"), {})
    out = [f"gpu_check on {meta.get('device', '?')} (torch {meta.get('torch', '?')}, dry run: "
           f"{meta.get('dry_run', '?')}); one line per row, docs/gpu.md", "",
           "| row | status | " + " | ".join(c[1] for c in GPU_COLUMNS) + " | other |",
           "|---|---|" + "---|" * len(GPU_COLUMNS) + "---|"]
    shown = {c[0] for c in GPU_COLUMNS} | {"row", "status", "device", "wall_s"}
    for r in lines:
        if r.get("row") == "meta":
            continue
        cells = [c[2].format(r[c[0]]) if isinstance(r.get(c[0]), (int, float)) else "-" for c in GPU_COLUMNS]
        other = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in shown and not isinstance(v, (dict, list)))
        out.append(f"| {r['row']} | {r['status']} | " + " | ".join(cells) + f" | {other} |")
    return "\n".join(out)


def read_gpu_lines(path) -> list[dict]:
    lines = []
    try:
        text = Path(path).read_text()
    except OSError:
        return lines
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line
    return lines


def gpu_markdown(stage: dict | None, has_gpu: bool, jsonl=None) -> str:
    """The GPU section: gpu_check's lines (also those a timed-out or failed stage wrote before it ended)."""
    if not has_gpu:
        return ("no GPU here: GPU rows skipped. Nothing has been measured on a GPU yet; `make gpu-check` "
                "(bench/gpu_check.py, docs/gpu.md) measures the GPU rows on one card in ~5 minutes, one JSON "
                "line each; its --dry-run (the test suite) runs every row on the CPU with a tiny model\n")
    if stage is None:
        return "GPU present but the gpu stage was not run\n"
    lines = read_gpu_lines(jsonl) if jsonl else []
    head = "" if stage["ok"] else f"GPU stage failed: {stage['error']} (log: {stage['log']}); the rows it wrote:\n\n"
    if not lines:
        return head or "GPU stage wrote no rows\n"
    return head + gpu_check_table(lines) + "\n"


def machine_info() -> dict:
    import numpy
    import torch

    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for mod in ("timm", "cv2"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {"cpu_model": model, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1),
            "cuda": torch.cuda.is_available(), "versions": versions, "platform": platform.platform()}


# ----------------------------------------------------------------------------------------------
def notes_markdown(stages: dict) -> str:
    """What each row measures and what the numbers mean (filled from the results)."""
    n = []
    r = (stages.get("train_step") or {}).get("result")
    if r:
        n.append(f"- **3** Steady-state step = median gap between optimizer steps (an optimizer post-hook), "
                 f"{r['repeats']} Trainer epochs of {r['steps']} steps alternating with {r['repeats']} bare epochs; "
                 f"ratio = median of the paired per-repeat ratios ({', '.join(f'{x:.2f}' for x in r['ratio_per_repeat'])}). "
                 f"Not in the steady state: the loader's start-up each epoch (worker fork + first batch) "
                 f"{r['trainer_first_step_s']:.2f} s, i.e. whole-epoch ratio {r['epoch_ratio']:.2f}x over "
                 f"{r['steps']} steps (negligible over a real epoch of thousands of steps). Data wait "
                 f"{100 * r['data_wait_frac']:.1f}% of the epoch; loader worker CPU {r['trainer_worker_cpu_ms_per_step']:.0f} "
                 f"ms/step, on the second core.")
    r = (stages.get("predict") or {}).get("result")
    if r:
        n.append(f"- **4** Per batch: median gap between the ends of consecutive batches' last forward pass (forward "
                 f"hook), / (views x batch); per-repeat ratios none {', '.join(f'{x:.2f}' for x in r['none_ratio_per_repeat'])}, "
                 f"flip_scale {', '.join(f'{x:.2f}' for x in r['flip_scale_ratio_per_repeat'])}. Loader start-up per "
                 f"predict_tta call {r['none_startup_s']:.2f} s (once per predict.py run); including it, "
                 f"{r['none_call_ms_per_view_image']:.2f} / {r['flip_scale_call_ms_per_view_image']:.2f} ms per view per image "
                 f"over only {r['images']} images.")
    r = (stages.get("crt") or {}).get("result")
    if r:
        n.append(f"- **5** Both are the same library call (cxrlt.post.retrain_head.run, {r['head']} head) with only "
                 f"crt_feature_cache changed; both compute the val mAP/mAUC {r['val_scoring_calls']} times "
                 f"(sklearn, {r['val_scoring_s_per_call']:.2f} s per call here, timed apart on the same labels); "
                 f"the speed-up without it is what caching changes: {r['uncached_excl_scoring_s']:.1f} s vs "
                 f"{r['cached_total_excl_scoring_s']:.1f} s. The head epochs alone are {_x(r['speedup_head_only'])} "
                 f"faster. Val mAP cached {r['val_mAP_cached']:.4f}, uncached {r['val_mAP_uncached']:.4f} (same head).")
    r = (stages.get("crt_memory") or {}).get("result")
    if r:
        lo, hi = (str(s) for s in (min(r["sizes"]), max(r["sizes"])))
        parts = [f"{s}: main RssAnon {r['runs'][lo][s]['main_anon_mb']:.0f} -> {r['runs'][hi][s]['main_anon_mb']:.0f} MB, "
                 f"RssFile {r['runs'][lo][s]['main_file_mb']:.0f} -> {r['runs'][hi][s]['main_file_mb']:.0f} MB, loader "
                 f"worker {r['runs'][lo][s]['worker_rss_mb']:.0f} -> {r['runs'][hi][s]['worker_rss_mb']:.0f} MB "
                 f"(feature cache {r['runs'][hi][s]['feature_cache']}, head input {'x'.join(map(str, r['runs'][hi][s]['head_input']))})"
                 for _, s, _ in CRT_MEMORY_ROWS if s in r["growth_mb"]]
        n.append(f"- **6c/6d** retrain_head.py does work proportional to N (one backbone pass over every image, "
                 f"{r['epochs']} head epoch(s) over every train row) in memory that must not grow with it: the "
                 f"features go to disk batch by batch and come back by index (cxrlt.data.rowfile), images are read "
                 f"with pread. " + "; ".join(parts) + ".")
    r = (stages.get("preprocess") or {}).get("result")
    if r:
        busy = (f"the 2 workers kept {r['w2_cores_busy']:.2f} cores busy on average (start-up included), 1 worker "
                f"{r['w1_cores_busy']:.2f}")
        if r["w2_cores_busy"] < 1.7:
            why = (f"1b needs 2 free cores, but {busy}: the rest went to other processes, so 1b measures the "
                   f"contention more than the code.")
        else:
            why = (f"1b had both cores ({busy}), so a shortfall there is not contention: compare the CPU s per "
                   f"image of the two paths.")
        n.insert(0, f"- **1** images/s are the marginal rate between an N/2- and an N-image build, timed from "
                    f"outside (per-call costs such as the worker start-up cancel out; whole call with 2 workers: "
                    f"{r['w2_vs_w1_call']:.2f}x); CPU s per image: 1 worker {r['w1_cpu_s_per_img']:.3f}, 2 workers "
                    f"{r['w2_cpu_s_per_img']:.3f}. " + why)
    r = (stages.get("memory") or {}).get("result")
    if r:
        lo, hi = (str(s) for s in (min(r["sizes"]), max(r["sizes"])))
        parts = []
        for s in ("train", "predict"):
            a, b = r["runs"][lo][s], r["runs"][hi][s]
            da, db = r["runs"][lo].get(s + "_default_malloc"), r["runs"][hi].get(s + "_default_malloc")
            default = f"; default allocator {da['maxrss_mb']:.0f} -> {db['maxrss_mb']:.0f} MB" if da and db else ""
            parts.append(f"{s}.py: main process peak RssAnon {a['main_anon_mb']:.0f} -> {b['main_anon_mb']:.0f} MB, "
                         f"RssFile {a['main_file_mb']:.0f} -> {b['main_file_mb']:.0f} MB, loader worker "
                         f"{a['worker_rss_mb']:.0f} -> {b['worker_rss_mb']:.0f} MB{default}")
        n.append(f"- **6** Peak RSS = ru_maxrss of the child (os.wait4: the script or its loader worker, whichever "
                 f"peaked higher). Same work for both N ({r['train_batches']} training batches of {r['batch']}, "
                 f"{r['val_images']} val and {r['test_images']} test images), so growth can only come from what "
                 f"scales with N. Index in memory (DataFrame + labels + row map): {r['runs'][lo]['index_mb']:.1f} -> "
                 f"{r['runs'][hi]['index_mb']:.1f} MB. Rows 6a/6b run with MALLOC_MMAP_THRESHOLD_=65536: glibc then "
                 "returns large freed blocks at once, so a peak is the live memory and repeated runs agree to the "
                 "MB; with the default allocator, peaks wander by +-30 MB between identical runs (freed activations "
                 "stay in the heap or not) and are 100-150 MB higher for train.py. " + "; ".join(parts)
                 + ". Most of the ~0.9-1.1 GB is the imports (torch alone ~0.5 GB RSS) and activations, not data.")
    return "\n".join(n) + ("\n" if n else "")


def load_sentence(stages: dict) -> str:
    busiest = max((st.get("others_cores", 0.0) for st in stages.values()), default=0.0)
    if busiest >= 0.3:
        return ("The machine was shared (another engineer running tests), so wall-clock figures carry that "
                "noise; the CPU-time figures (3b, 4) are less sensitive to it.")
    return "Other processes were nearly idle during the run."


def render(rows, stages, meta, gpu_md: str) -> str:
    v = meta["versions"]
    others = [f"{name} {st['others_cores']:.1f}" for name, st in stages.items() if "others_cores" in st]
    lines = [
        "# Benchmarks (`make bench`)", "",
        f"- date: {meta['date']}",
        f"- machine: {meta['cpu_model']}, {meta['cores']} cores, {meta['memory_gb']} GB RAM ({meta['platform']})",
        f"- versions: python {v['python']}, torch {v['torch']}, timm {v.get('timm', '?')}, numpy {v['numpy']}, "
        f"opencv {v.get('cv2', '?')}",
        f"- total time: {meta['total_s']:.0f} s ({'within' if meta['budget_used_s'] <= meta['budget_s'] else 'OVER'} "
        f"the {meta['budget_s']:.0f} s budget of the CPU stages)"
        + (" - QUICK settings, numbers meaningless" if meta["quick"] else ""),
        f"- load: 1-min load average {meta['load_start']:.2f} at the start, {meta['load_end']:.2f} at the end; CPU "
        f"used by other processes during each stage (cores of {meta['cores']}): {', '.join(others)}. "
        + load_sentence(stages), "",
        table_markdown(rows, stages),
        "## Notes", "",
        notes_markdown(stages),
        "## GPU", "",
        gpu_md,
        "## Reproduce", "",
        "`make bench` (= `.venv/bin/python bench/run_all.py`); one stage: `python bench/<script>.py --help`. "
        "Raw numbers: `bench/out/results.json`; each stage's console output: `bench/out/logs/<stage>.log`.", "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks the chain, numbers meaningless")
    ap.add_argument("--only", nargs="+", default=None, help="run only these stages")
    ap.add_argument("--skip", nargs="+", default=[], help="skip these stages")
    ap.add_argument("--out", default=str(HERE / "results.md"), help="Markdown file to write")
    ap.add_argument("--workdir", default=str(HERE / "out"), help="raw JSON, logs, kept synthetic images")
    ap.add_argument("--timeout", type=float, default=STAGE_TIMEOUT_S, help="seconds per stage at most")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all CPU stages together")
    a = ap.parse_args()

    from cxrlt.core.fileio import write_json, write_text

    t_start = time.perf_counter()
    work = Path(a.workdir)
    cmds = stage_commands(a.quick, work)
    unknown = (set(a.only or []) | set(a.skip)) - set(cmds)
    if unknown:
        print(f"error: unknown stage(s) {sorted(unknown)}; stages: {', '.join(cmds)}", file=sys.stderr)
        return 2
    names = [s for s in cmds if (a.only is None or s in a.only) and s not in a.skip]
    work.mkdir(parents=True, exist_ok=True)
    meta = machine_info()
    meta.update(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), quick=a.quick, load_start=os.getloadavg()[0],
                budget_s=a.budget)
    if not meta["cuda"] and "gpu" in names:
        names.remove("gpu")
    stages = run_stages(names, cmds, work, t_start + a.budget, a.budget, a.timeout)
    total = time.perf_counter() - t_start
    meta.update(total_s=total, budget_used_s=total - stages.get("gpu", {}).get("wall_s", 0.0),
                load_end=os.getloadavg()[0])
    rows = build_rows(stages)
    gpu_md = gpu_markdown(stages.get("gpu"), meta["cuda"], work / "gpu_check.jsonl")
    write_text(a.out, render(rows, stages, meta, gpu_md))
    write_json(work / "results.json", {"meta": meta, "stages": stages})
    print(table_markdown(rows, stages))
    print(gpu_md.rstrip())
    print(f"\nwrote {a.out} ({meta['total_s']:.0f} s)")
    return 0 if all(st["ok"] for st in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
