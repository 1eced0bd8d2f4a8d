"""bench/gpu_check.py (`make gpu-check`): --dry-run runs every row on the CPU (tiny model, a few
steps); a row that fails, runs out of memory or times out is a line of its own and the other rows
are kept, each line written as soon as it is measured."""

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_dry_run_measures_every_row_on_the_cpu(tmp_path):
    out = tmp_path / "check.jsonl"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = {r["row"]: r for r in _lines(out)}
    assert list(recs) == ["meta", *gpu_check.ROWS]
    assert recs["meta"]["dry_run"] is True and recs["meta"]["device"] == "cpu"
    bad = {k: r.get("error") for k, r in recs.items() if r["status"] != "ok"}
    assert not bad
    for k in ("bare_step_eager", "bare_step_compiled", "trainer_step_eager", "trainer_step_compiled",
              "trainer_step_v2b_csra", "res768_gc_off", "res768_gc_on"):
        assert recs[k]["images_per_s"] > 0 and recs[k]["flops_per_image"] > 0, k
    assert recs["trainer_step_compiled"]["compiled"] and not recs["trainer_step_eager"]["compiled"]
    assert recs["trainer_step_v2b_csra"]["head"] == "csra"
    assert 0 <= recs["data_wait_workers_2"]["data_wait_frac"] < 1
    assert (recs["res768_gc_off"]["grad_checkpointing"], recs["res768_gc_on"]["grad_checkpointing"]) == (False, True)
    assert recs["res768_gc_off"]["auto_would_choose"] is False  # the CPU: off
    ck = recs["checkpoint_save"]
    assert ck["last_pt_gb"] > 0 and ck["sync_save_s"] > 0 and ck["copy_s"] >= 0 and ck["write_s"] > 0
    assert ck["stall_frac_of_epoch"] is not None  # the trainer rows measured a rate before it
    assert all(recs[k]["images_per_s"] > 0 for k in ("predict_bs64", "predict_bs256", "crt_extract_csra"))
    head = recs["head_bf16_vs_fp32"]
    assert head["distinct_frac_fp32"] >= head["distinct_frac_bf16"] and 0 < head["mAP_fp32"] <= 1


def test_a_failed_row_is_a_line_and_the_other_rows_are_kept(tmp_path):
    out = tmp_path / "check.jsonl"
    seen = {}

    def ok(ctx):
        return {"value": 1.0}

    def oom(ctx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken(ctx):
        seen["before"] = [r["row"] for r in _lines(out)]  # earlier rows are on disk already
        raise RuntimeError("kernel failed")

    def slow(ctx):
        while True:
            time.sleep(0.01)

    rows = {"a": ok, "b": oom, "c": broken, "d": slow, "e": ok}
    recs = gpu_check.run(out, list(rows), dry=True, row_timeout=0.5, rows=rows, workdir=tmp_path)
    assert [(r["row"], r["status"]) for r in recs] == [("a", "ok"), ("b", "oom"), ("c", "error"), ("d", "timeout"),
                                                        ("e", "ok")]
    assert seen["before"] == ["meta", "a", "b"]
    assert [r["row"] for r in _lines(out)] == ["meta", "a", "b", "c", "d", "e"]
    assert "kernel failed" in recs[2]["error"] and recs[4]["value"] == 1.0


def test_rows_after_the_budget_are_skipped(tmp_path):
    out = tmp_path / "check.jsonl"

    def slow(ctx):
        while True:
            time.sleep(0.01)

    rows = {"a": slow, "b": slow}
    recs = gpu_check.run(out, list(rows), dry=True, row_timeout=0, rows=rows, workdir=tmp_path, budget_s=1.5)
    assert [r["status"] for r in recs] == ["timeout", "skipped"]


def test_make_bench_shows_the_rows_a_timed_out_gpu_stage_wrote(tmp_path):
    import run_all

    out = tmp_path / "gpu_check.jsonl"
    rows = {"a": lambda c: {"images_per_s": 12.5, "mfu": 0.31, "copy_s": 0.2},
            "b": lambda c: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory"))}
    gpu_check.run(out, list(rows), dry=True, row_timeout=0, rows=rows, workdir=tmp_path)
    with open(out, "a") as f:
        f.write('{"row": "c", "sta')  # the stage was killed in the middle of a line
    stage = {"ok": False, "error": "timed out after 900 s", "log": "bench/out/logs/gpu.log"}
    md = run_all.gpu_markdown(stage, True, out)
    assert md.startswith("GPU stage failed: timed out after 900 s")
    assert "| a | ok | 12.5 | 31.0% | - | - | copy_s 0.2 |" in md and "| b | oom |" in md and "| c |" not in md
