#!/usr/bin/env python
"""Peak memory of train.py, predict.py and retrain_head.py on caches of N images: must not grow with N.

    python bench/bench_memory.py [--sizes 2000 20000] [--size 256] [--json OUT.json] [--keep DIR]
    python bench/bench_memory.py --crt [--sizes 2000 20000] [--size 64] [--model test_efficientnet]

For each N a synthetic cache of N images at --size px is written (images.npy through a memmap, plus
index/labels/manifest; see bench_train_step.write_synthetic_cache), then run as subprocesses:
  train.py    1 epoch, --max-train-batches 2, batch 8, test_resnet, 1 loader worker, CPU
  predict.py  --split test, --tta none, on that run's model.pt
The work is the same for every N (2 training batches; val fold and test list are fixed at
--val/--test images), so any growth comes from what scales with N: the index (pandas DataFrame,
label matrix, row map) and anything that would read the whole image array.

Measured per run:
  maxrss_mb      ru_maxrss from os.wait4 on the child: the peak RSS of the process or of any of its
                 reaped children (the DataLoader worker), whichever was larger
  main_hwm_mb    VmHWM of the script's own process (polled from /proc/<pid>/status every 20 ms)
  main_anon_mb   peak RssAnon of that process (heap: arrays, tensors, the index)
  main_file_mb   peak RssFile (mapped files: shared libraries and touched pages of images.npy)
  worker_rss_mb  peak VmRSS over its child processes (DataLoader workers)
--crt measures retrain_head.py instead (cRT, 1 head epoch, crt_feature_cache auto), for a pooled
head (linear: float32 features of every image on disk) and a map head (csra: the float16 maps),
on a run of that head trained for 2 batches (not measured). Here the work grows with N (every
image goes through the backbone once, every head epoch covers all train rows), the memory must
not: features are written and read back batch by batch (cxrlt.data.rowfile). Defaults: 64 px and
test_efficientnet (256 features; 2x2 maps), where the features of 20,000 images are 20 MB (pooled)
and 40 MB (maps). Held in memory they show as growth of the main process's peak RssAnon (the cRT
of before this bench: +30 MB pooled, +107 MB csra from 2,000 to 20,000), less so of its peak RSS,
which is set earlier (imports, model build): run_all's rows 6c/6d judge both.

Each (script, N) runs twice: with MALLOC_MMAP_THRESHOLD_=65536 (glibc then returns every large
block on free, so a peak is the live memory and repeats agree to the MB; the growth verdict uses
these) and with the default allocator (what a user sees; its peaks vary by +-30 MB run to run).
The allowance is the growth of the index in memory between the two N (Cache.index_nbytes: the
DataFrame's deep size + the float32 label matrix + the row map).

The caches are written and the index measured in a separate process: a child's ru_maxrss starts
from the RSS of the process that spawned it (Linux carries the pre-exec high-water mark over), so
this process stays small (its own peak is reported as parent_hwm_mb; a maxrss at that value
would be the parent's, not the script's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, add_json_flag, write_result

MB = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# measuring a child process
# ----------------------------------------------------------------------------------------------
def proc_status(pid: int) -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of a process in bytes ({} if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024  # kB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc/<pid>/task/*/children, recursively)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                kids = [int(k) for k in open(f"/proc/{p}/task/{t}/children").read().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            found += kids
            todo += kids
    return found


class Poller(threading.Thread):
    """Samples the memory of a process and its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0, "worker": 0}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            st = proc_status(self.pid)
            for k, v in st.items():
                self.peak[k] = max(self.peak[k], v)
            for child in descendants(self.pid):
                self.peak["worker"] = max(self.peak["worker"], proc_status(child).get("VmRSS", 0))
            self.stop.wait(self.interval)


def measure(cmd: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run `cmd` from the repository root, its output to `log_path` -> peak memory figures (MB)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT)
        poller = Poller(p.pid)
        poller.start()
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (and its reaped children's)
        p.returncode = os.waitstatus_to_exitcode(status)
        poller.stop.set()
        poller.join()
    if p.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(map(str, cmd[:2]))} failed ({p.returncode}); log {log_path}:\n{tail}")
    pk = poller.peak
    return {"wall_s": time.perf_counter() - t0, "maxrss_mb": usage.ru_maxrss * 1024 / MB,
            "main_hwm_mb": pk["VmHWM"] / MB, "main_anon_mb": pk["RssAnon"] / MB,
            "main_file_mb": pk["RssFile"] / MB, "worker_rss_mb": pk["worker"] / MB}


def prepare(cache, n: int, size: int, n_val: int, n_test: int) -> float:
    """Write the cache (unless there) and measure its index, in a child process -> index MB."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from common import write_synthetic_cache; from cxrlt.data.cache import open_cache; "
            "c, n, s, v, t = Path(sys.argv[2]), *map(int, sys.argv[3:7]); "
            "(c / 'manifest.json').exists() or write_synthetic_cache(c, n_train=n - v - t, size=s, n_val=v, n_test=t); "
            "print(open_cache(c).index_nbytes)")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(cache),
                          str(n), str(size), str(n_val), str(n_test)], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / MB


def own_hwm_mb() -> float:
    return proc_status(os.getpid()).get("VmHWM", 0) / MB


def new_cache(d: Path, n: int, size: int, n_val: int, n_test: int) -> dict:
    """d/cache written (see prepare) -> {"index_mb", "images_npy_mb"}, the start of runs[N]."""
    cache = d / "cache"
    index_mb = prepare(cache, n, size, n_val, n_test)
    return {"index_mb": index_mb, "images_npy_mb": (cache / "images.npy").stat().st_size / MB}


def growth_between(runs: dict, sizes, scripts: tuple[str, ...]) -> tuple[dict, float]:
    """-> ({script: {figure: growth MB from the smallest N to the largest}}, index allowance MB)
    for the entries of runs[N] whose name starts with one of `scripts`."""
    lo, hi = str(min(sizes)), str(max(sizes))
    keys = ("maxrss_mb", "main_hwm_mb", "main_anon_mb", "main_file_mb", "worker_rss_mb")
    growth = {s: {k: runs[hi][s][k] - runs[lo][s][k] for k in keys} for s in runs[lo] if s.startswith(scripts)}
    return growth, runs[hi]["index_mb"] - runs[lo]["index_mb"]


# ----------------------------------------------------------------------------------------------
# glibc's malloc moves its mmap threshold up as large blocks are freed, after which big tensors come
# from the heap and stay resident after free; when that happens varies from run to run (peaks differ
# by +-30 MB between identical runs). A fixed threshold makes every large block an mmap returned on
# free, so the peak is the live memory and identical runs give the same figure to the MB.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run(sizes=(2000, 20000), size: int = 256, n_val: int = 64, n_test: int = 64, batch: int = 8,
        train_batches: int = 2, model: str = "test_resnet", workers: int = 1, keep=None, workdir=None,
        default_malloc: bool = True) -> dict:
    """Peak memory of train.py and predict.py for each cache size N -> per-N figures and growth.

    Every (script, N) runs with a fixed malloc mmap threshold (reproducible; the growth and the
    verdict use these) and, if default_malloc, again with the default allocator (what a user
    sees; noisier; keys "<script>_default_malloc").
    """
    py = sys.executable
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench_memory_", dir=workdir))
    runs = {}
    try:
        for n in sizes:
            runs[str(n)] = new_cache(tmp / f"n{n}", n, size, n_val, n_test)
        for mode, env in (("fixed", FIXED_MALLOC), ("default", {}))[:2 if default_malloc else 1]:
            for n in sizes:
                d = tmp / f"n{n}"
                cache = d / "cache"
                shutil.rmtree(d / "run", ignore_errors=True)
                train_cmd = [py, "train.py", "--cache", str(cache), "--out", str(d / "run"), "--model", model,
                             "--pretrained", "false", "--head", "linear", "--loss", "bce", "--epochs", "1",
                             "--max-train-batches", str(train_batches), "--batch-size", str(batch),
                             "--workers", str(workers), "--device", "cpu"]
                pred_cmd = [py, "predict.py", "--checkpoint", str(d / "run" / "model.pt"), "--cache", str(cache),
                            "--split", "test", "--out", str(d / "run" / "pred_test.csv"), "--tta", "none",
                            "--workers", str(workers), "--device", "cpu", "--batch-size", str(batch)]
                suffix = "" if mode == "fixed" else "_default_malloc"
                runs[str(n)]["train" + suffix] = measure(train_cmd, d / f"train{suffix}.log", env)
                runs[str(n)]["predict" + suffix] = measure(pred_cmd, d / f"predict{suffix}.log", env)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    growth, allowance = growth_between(runs, sizes, ("train", "predict"))
    return {"sizes": list(sizes), "size": size, "val_images": n_val, "test_images": n_test, "batch": batch,
            "train_batches": train_batches, "model": model, "workers": workers, "fixed_malloc_env": FIXED_MALLOC,
            "runs": runs, "growth_mb": growth, "index_allowance_mb": allowance,
            "parent_hwm_mb": own_hwm_mb(), "load_avg_1min": os.getloadavg()[0]}


def run_crt(sizes=(2000, 20000), size: int = 64, n_val: int = 64, model: str = "test_efficientnet",
            heads=("linear", "csra"), epochs: int = 1, workers: int = 1, keep=None, workdir=None) -> dict:
    """Peak memory of retrain_head.py for each cache size N and head -> per-N figures and growth.

    Runs with the fixed malloc threshold only (the figures the verdict uses; see FIXED_MALLOC).
    Keys of runs[N]: index_mb, images_npy_mb, and per head "crt_<head>" (measure()'s figures plus
    feature_mb, the size of the feature files it wrote, and feature_cache, the mode it chose).
    """
    py = sys.executable
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench_memory_crt_", dir=workdir))
    runs = {}
    try:
        for n in sizes:
            d, cache = tmp / f"n{n}", tmp / f"n{n}" / "cache"
            runs[str(n)] = new_cache(d, n, size, n_val, 0)
            for head in heads:
                run_dir = d / f"run_{head}"
                shutil.rmtree(run_dir, ignore_errors=True)
                train_cmd = [py, "train.py", "--cache", str(cache), "--out", str(run_dir), "--model", model,
                             "--pretrained", "false", "--head", head, "--loss", "bce", "--epochs", "1",
                             "--max-train-batches", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
                subprocess.run(train_cmd, cwd=ROOT, check=True, capture_output=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
                crt_cmd = [py, "retrain_head.py", "--run", str(run_dir), "--cache", str(cache), "--out",
                           str(run_dir / "crt"), "--crt-epochs", str(epochs), "--workers", str(workers),
                           "--device", "cpu"]
                m = measure(crt_cmd, d / f"crt_{head}.log", FIXED_MALLOC)
                summary = json.loads((run_dir / "crt" / "summary.json").read_text())
                m.update(feature_cache=summary["feature_cache"], head_input=summary["head_input"],
                         feature_mb=sum(p.stat().st_size for p in (run_dir / "crt").glob("features_*.npy")) / MB)
                runs[str(n)][f"crt_{head}"] = m
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    growth, allowance = growth_between(runs, sizes, ("crt_",))
    return {"sizes": list(sizes), "size": size, "val_images": n_val, "model": model, "epochs": epochs,
            "workers": workers, "fixed_malloc_env": FIXED_MALLOC, "runs": runs, "growth_mb": growth,
            "index_allowance_mb": allowance,
            "parent_hwm_mb": own_hwm_mb(), "load_avg_1min": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crt", action="store_true", help="measure retrain_head.py (pooled and csra heads) instead")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="cache sizes N (images)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 256; 64 with --crt)")
    ap.add_argument("--val", type=int, default=64, help="val-fold images (fixed for every N)")
    ap.add_argument("--test", type=int, default=64, help="test-list images (fixed for every N)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-batches", type=int, default=2)
    ap.add_argument("--model", default=None, help="timm model (default test_resnet; test_efficientnet with --crt)")
    ap.add_argument("--crt-epochs", type=int, default=1, help="--crt: head epochs")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keep", default=None, help="write the caches here and keep them (reused next time)")
    add_json_flag(ap)
    a = ap.parse_args()
    if a.crt:
        r = run_crt(a.sizes, a.size or 64, a.val, a.model or "test_efficientnet", epochs=a.crt_epochs,
                    workers=a.workers, keep=a.keep)
    else:
        r = run(a.sizes, a.size or 256, a.val, a.test, a.batch, a.train_batches, a.model or "test_resnet",
                a.workers, a.keep)
    print(f"{'N':>7} {'script':23} {'maxrss':>7} {'main HWM':>9} {'anon':>6} {'file':>6} {'worker':>7}  (MB)")
    for n, v in r["runs"].items():
        for s in [k for k in v if k.startswith(("train", "pred", "crt_"))]:
            m = v[s]
            print(f"{n:>7} {s:23} {m['maxrss_mb']:7.0f} {m['main_hwm_mb']:9.0f} {m['main_anon_mb']:6.0f} "
                  f"{m['main_file_mb']:6.0f} {m['worker_rss_mb']:7.0f}")
    for s, g in r["growth_mb"].items():
        print(f"growth {s}: maxrss {g['maxrss_mb']:+.1f} MB, main anon {g['main_anon_mb']:+.1f} MB "
              f"(index allowance {r['index_allowance_mb']:.1f} MB)")
    write_result(a.json, r)


if __name__ == "__main__":
    main()
