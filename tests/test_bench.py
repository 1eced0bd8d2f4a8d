"""Smoke tests of the benchmark scripts (bench/): each runs with tiny settings and returns numbers.

No timing assertions: the numbers are checked for what the code guarantees (positive, counts match
the work done, temporary files gone, memory peaks see a known allocation, the FLOP count of a known
model), and bench/run_all.py's table and budget are checked on known inputs.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import bench_crt  # noqa: E402
import bench_memory  # noqa: E402
import bench_predict  # noqa: E402
import bench_train_step  # noqa: E402
import common  # noqa: E402
import run_all  # noqa: E402


def _positive(d, *keys):
    for k in keys:
        assert math.isfinite(d[k]) and d[k] > 0, (k, d[k])


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # the bench functions set 1 thread; give the other tests theirs back
    yield
    torch.set_num_threads(n)


def test_synthetic_cache_is_a_valid_cache(tmp_path):
    from cxrlt.data.cache import open_cache

    out = common.write_synthetic_cache(tmp_path / "c", n_train=20, size=16, n_val=6, n_test=5, num_labels=7, chunk=8)
    c = open_cache(out)
    assert c.images.shape == (31, 16, 16) and c.images.dtype == np.uint8
    assert c.images.min() > 0 or c.images.max() > 0  # real content, not a sparse zero file
    assert len(c.rows("train", fold=0)) == 6 and len(c.rows("train", exclude_fold=0)) == 20
    assert len(c.rows("test")) == 5 and np.isnan(c.targets(c.rows("test"))).all()
    for rows in (c.rows("train", fold=0), c.rows("train", exclude_fold=0)):
        assert (c.targets(rows).sum(0) >= 1).all()  # every label has a positive in val and in train


def test_train_step_bench_tiny(tmp_path):
    r = bench_train_step.run(model="test_resnet", size=32, batch=4, steps=3, repeats=1, workers=1,
                             workdir=tmp_path)
    _positive(r, "trainer_ms_per_step", "bare_ms_per_step", "trainer_cpu_ms_per_step", "bare_cpu_ms_per_step",
              "trainer_images_per_s")
    assert 0.0 <= r["data_wait_frac"] <= 1.0 and r["torch_threads"] == 1
    assert r["trainer_worker_cpu_ms_per_step"] > 0  # the loader worker's CPU was counted
    assert list(tmp_path.iterdir()) == []  # the temporary cache and run folder are gone


def test_flop_count_of_a_known_model():
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7), torch.nn.Linear(7, 5))
    # forward 2*(12*7 + 7*5); backward: both weight grads again, plus the input grad of layer 2 only
    expected = 2 * (12 * 7 + 7 * 5) + 2 * (12 * 7 + 7 * 5) + 2 * 7 * 5
    assert bench_train_step.flops_per_image(m, 2, 3, torch.device("cpu"), amp=False) == expected


def test_gpu_section_code_path_runs_on_cpu(tmp_path):
    rows = [dict(model="test_convnext", head=h, size=32, batch=4, channels_last=False, compile=False,
                 grad_checkpointing=gc) for h, gc in (("linear", False), ("csra", True))]
    r = bench_train_step.run_gpu(rows, steps=2, workers=1, device="cpu", workdir=tmp_path)
    assert [(g["head"], g["grad_checkpointing"], g["oom"]) for g in r["rows"]] == [("linear", False, False),
                                                                                  ("csra", True, False)]
    for g in r["rows"]:
        assert g["flops_per_image"] > 0 and g["images_per_s"] > 0 and 0.0 <= g["data_wait_frac"] <= 1.0
        assert g["mfu"] is None and g["device_name"] == "cpu"  # no known peak on a CPU
        assert g["host_syncs_per_step"] is None and g["max_mem_gb"] is None  # GPU-only columns
    table = bench_train_step.gpu_lines(r)
    assert len(table) == 4 + 2 and "| test_convnext + CSRA | 32 | 4 | False | False | True |" in table[-1]


def test_gpu_matrix_has_the_issue_rows_and_the_cli_selects_them():
    m = bench_train_step.GPU_MATRIX
    for model in ("convnext_large", "convnextv2_base"):
        at512 = {(r["channels_last"], r["compile"], r["grad_checkpointing"]) for r in m
                 if r["model"] == model and r["size"] == 512 and r["batch"] == 32}
        assert {(False, False, False), (True, False, False), (True, True, False), (True, False, True)} <= at512
        assert {r["size"] for r in m if r["model"] == model and r["grad_checkpointing"]} == {512, 768, 1024}
    assert all(r["head"] == "csra" for r in m if r["model"] == "convnextv2_base")
    smoke = bench_train_step.select_rows("test_resnet", 64, 4)
    assert smoke and all((r["model"], r["size"], r["batch"]) == ("test_resnet", 64, 4) for r in smoke)
    assert {r["size"] for r in bench_train_step.select_rows("convnext_large", 768)} == {768}


def test_predict_bench_tiny(tmp_path):
    r = bench_predict.run(model="test_resnet", size=32, batch=4, batches=3, repeats=1, workers=1, workdir=tmp_path)
    _positive(r, "bare_ms_per_image", "none_ms_per_view_image", "flip_scale_ms_per_view_image",
              "none_cpu_ms_per_view_image", "flip_scale_cpu_ms_per_view_image")
    assert r["images"] == 12 and list(tmp_path.iterdir()) == []


def test_forward_clock_groups_views_into_batches():
    clock = bench_predict.ForwardClock(torch.nn.Identity())
    clock.handle.remove()
    clock.stamps = [0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 1.4, 2.0, 2.1, 2.2, 2.6]  # 3 batches x 4 views
    assert clock.batch_gaps(4) == pytest.approx([1.1, 1.2])


def test_crt_bench_tiny(tmp_path):
    r = bench_crt.run(model="test_resnet", size=32, n_train=16, n_val=8, epochs=2, batch=8, workers=0,
                      workdir=tmp_path)
    _positive(r, "extract_s", "head_epochs_s", "backbone_every_epoch_s", "speedup_incl_extract",
              "speedup_excl_scoring", "uncached_head_epochs_s")
    assert (r["train_images"], r["val_images"]) == (16, 8) and r["val_scoring_s_per_call"] > 0
    assert r["val_mAP_cached"] == pytest.approx(r["val_mAP_uncached"], abs=1e-5)  # the same head either way
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # four script runs (two train.py, two retrain_head.py)
def test_crt_memory_bench_tiny(tmp_path):
    r = bench_memory.run_crt(sizes=(30,), size=16, n_val=6, model="test_resnet", workers=0, workdir=tmp_path)
    run = r["runs"]["30"]
    for head, mode, shape in (("linear", "float32", 1), ("csra", "float16", 3)):
        m = run[f"crt_{head}"]
        _positive(m, "maxrss_mb", "main_hwm_mb", "main_anon_mb", "feature_mb")
        assert m["feature_cache"] == mode and len(m["head_input"]) == shape
        assert r["growth_mb"][f"crt_{head}"]["maxrss_mb"] == 0  # one size: no growth
    assert list(tmp_path.iterdir()) == []


def test_memory_measure_sees_a_known_allocation(tmp_path):
    # b"x" * n writes every byte (a zeroed bytearray could stay untouched, i.e. not resident).
    # The child allocates more than the parent: a sample taken between fork and exec sees the
    # child holding the parent's pages, so only "child >= its own allocation" is a stable check.
    code = ("import time, subprocess, sys; b = b'x' * (60 * 2**20); "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; x = b\"x\" * (200 * 2**20); time.sleep(0.6)']); "
            "time.sleep(0.6); c.wait()")
    m = bench_memory.measure([sys.executable, "-c", code], tmp_path / "log.txt")
    assert 60 <= m["main_hwm_mb"] < 200 and m["main_anon_mb"] >= 60  # the parent, without its child
    assert m["worker_rss_mb"] >= 200 and m["maxrss_mb"] >= 200  # the child, seen apart from its parent
    with pytest.raises(RuntimeError, match="boom"):
        bench_memory.measure([sys.executable, "-c", "raise SystemExit('boom')"], tmp_path / "log2.txt")


@pytest.mark.slow  # train.py and predict.py as scripts
def test_memory_bench_tiny(tmp_path):
    r = bench_memory.run(sizes=(40,), size=16, n_val=4, n_test=4, batch=4, train_batches=1, workdir=tmp_path,
                         default_malloc=False)
    run = r["runs"]["40"]
    for s in ("train", "predict"):
        _positive(run[s], "maxrss_mb", "main_hwm_mb", "main_anon_mb", "main_file_mb")
        assert run[s]["maxrss_mb"] >= run[s]["main_hwm_mb"] - 1  # wait4 sees at least the main process's peak
    assert run["index_mb"] > 0 and r["growth_mb"]["train"]["maxrss_mb"] == 0  # one size: no growth
    assert list(tmp_path.iterdir()) == []


# ---- run_all: the table ----------------------------------------------------------------------
def _stage(result, others=0.3):
    return {"ok": True, "error": None, "result": result, "wall_s": 1.0, "others_cores": others,
            "load_before": 0.5, "log": "bench/out/logs/x.log"}


FAKE = {
    "preprocess": {"n_images": 8, "size": 512, "bare_decode_img_s": 10.0, "cache_w1_img_s": 9.0, "cache_w2_img_s": 12.0,
                   "w1_vs_decode": 0.9, "w2_vs_w1": 1.333, "w2_vs_w1_call": 1.2, "w1_cpu_s_per_img": 0.1,
                   "w2_cpu_s_per_img": 0.1, "w1_cores_busy": 1.0, "w2_cores_busy": 1.3},
    "loader": {"size": 512, "cache_images_per_s": 400.0, "decode_resize_images_per_s": 5.0, "ratio": 80.0,
               "target_ratio": 20.0},
    "train_step": {"model": "m", "size": 128, "batch": 32, "workers": 1, "torch_threads": 1, "steps": 6, "repeats": 2,
                   "trainer_ms_per_step": 120.0, "bare_ms_per_step": 100.0, "ratio": 1.2, "ratio_per_repeat": [1.2, 1.2],
                   "trainer_cpu_ms_per_step": 105.0, "bare_cpu_ms_per_step": 100.0, "cpu_ratio": 1.05,
                   "trainer_worker_cpu_ms_per_step": 5.0, "epoch_ratio": 1.3, "trainer_first_step_s": 0.5,
                   "data_wait_frac": 0.02},
}


def test_table_rows_targets_and_failed_stage():
    stages = {k: _stage(v) for k, v in FAKE.items()}
    stages["crt"] = {"ok": False, "error": "timed out after 300 s", "result": None, "wall_s": 300.0,
                     "others_cores": 0.1, "load_before": 0.2, "log": "bench/out/logs/crt.log"}
    rows = run_all.build_rows(stages)
    by_key = {r.key: r for r in rows}
    assert [r.key for r in rows] == ["1a", "1b", "2", "3a", "3b", "5"]
    assert by_key["1a"].met == "yes" and by_key["1b"].met == "no"  # 0.90 >= 0.8; 1.33 < 1.8
    assert by_key["3a"].met == "no" and by_key["3b"].met == "yes"  # 1.20 > 1.10; 1.05 <= 1.10
    assert by_key["3a"].ratio == "1.20x" and "120 ms/step" in by_key["3a"].ours
    assert by_key["5"].met == "failed" and "timed out" in by_key["5"].what
    md = run_all.table_markdown(rows, stages)
    assert md.count("\n") == len(rows) + 2 and "| 0.3 cores |" in md


def test_memory_rows_use_the_index_allowance():
    def runs(train_mb, pred_mb):
        m = lambda v: {"maxrss_mb": v, "main_hwm_mb": v, "main_anon_mb": v / 2, "main_file_mb": v / 2,  # noqa: E731
                       "worker_rss_mb": 10.0}
        return {"index_mb": 1.0, "images_npy_mb": 100.0, "train": m(train_mb), "predict": m(pred_mb)}

    r = {"sizes": [20, 200], "size": 256, "runs": {"20": runs(1000, 900), "200": runs(1010, 1200)},
         "index_allowance_mb": 8.0, "train_batches": 2, "batch": 8, "val_images": 64, "test_images": 64,
         "growth_mb": {"train": {"maxrss_mb": 10.0}, "predict": {"maxrss_mb": 300.0}}}
    rows = run_all.rows_memory(r)
    assert [(x.key, x.met) for x in rows] == [("6a", "yes"), ("6b", "no")]  # 10 <= 8 + 5; 300 > 13
    notes = run_all.notes_markdown({"memory": _stage(r)})
    assert "1.0 -> 1.0 MB" in notes and "; default allocator" not in notes  # those runs were not made


def test_crt_memory_rows_use_the_index_allowance():
    def m(v, feat):
        return {"maxrss_mb": v, "main_hwm_mb": v, "main_anon_mb": v / 2, "main_file_mb": v / 2, "worker_rss_mb": 10.0,
                "feature_mb": feat, "feature_cache": "float32", "head_input": [256]}

    r = {"sizes": [20, 200], "size": 64, "model": "m", "epochs": 1, "index_allowance_mb": 2.0,
         "runs": {"20": {"crt_linear": m(900, 2.0), "crt_csra": m(950, 4.0)},
                  "200": {"crt_linear": m(906, 20.0), "crt_csra": m(990, 40.0)}},
         "growth_mb": {"crt_linear": {"maxrss_mb": 6.0, "main_anon_mb": 3.0},
                       "crt_csra": {"maxrss_mb": 4.0, "main_anon_mb": 40.0}}}
    rows = run_all.rows_crt_memory(r)
    assert [(x.key, x.met) for x in rows] == [("6c", "yes"), ("6d", "no")]  # 6 <= 2 + 5; heap 40 > 7
    assert "2.0 -> 20.0 MB" in rows[0].what
    assert "6c/6d" in run_all.notes_markdown({"crt_memory": _stage(r)})


def test_render_has_machine_versions_and_gpu_line():
    stages = {k: _stage(v) for k, v in FAKE.items()}
    meta = run_all.machine_info()
    meta.update(date="2026-01-01 00:00:00", quick=False, load_start=1.0, load_end=2.0, total_s=700.0,
                budget_used_s=700.0, budget_s=600.0)
    md = run_all.render(run_all.build_rows(stages), stages, meta, run_all.gpu_markdown(None, False))
    assert f"torch {torch.__version__}" in md and f"{meta['cores']} cores" in md
    assert "OVER the 600 s budget" in md and "no GPU here: GPU rows skipped" in md
    assert "| 3a |" in md and "## Notes" in md


@pytest.mark.slow  # an end-to-end run: make test runs it, make test-fast skips it
def test_run_all_cli_writes_results(tmp_path):
    out = tmp_path / "results.md"
    p = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--only", "loader", "--out", str(out),
                        "--workdir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| 2 |" in p.stdout and out.read_text().count("| 2 |") == 1
    raw = json.loads((tmp_path / "work" / "results.json").read_text())
    loader = raw["stages"]["loader"]
    assert loader["ok"] and loader["result"]["size"] == 64 and (tmp_path / "work" / "logs" / "loader.log").exists()
    bad = subprocess.run([sys.executable, "bench/run_all.py", "--only", "nosuch", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr


def test_run_all_stops_a_stage_at_the_budget_and_starts_none_without_enough_left(tmp_path, monkeypatch):
    import time

    # a stage is a command that writes its JSON result to the path given after --json
    def nap(s):
        return [sys.executable, "-c", f"import sys, time; time.sleep({s}); open(sys.argv[-1], 'w').write('{{}}')"]

    monkeypatch.setattr(run_all, "MIN_STAGE_S", 1.0)
    cmds = {"quick": nap(0), "slow": nap(30), "late": nap(0)}
    t0 = time.perf_counter()
    st = run_all.run_stages(list(cmds), cmds, tmp_path, deadline=t0 + 3.0, budget=3.0, limit=300.0)
    assert time.perf_counter() - t0 < 10  # the slow stage was stopped at the deadline, not at its 30 s
    assert st["quick"]["ok"] and st["quick"]["result"] == {}
    assert not st["slow"]["ok"] and st["slow"]["error"].startswith("timed out after ")
    assert not st["late"]["ok"] and st["late"]["error"] == "not run: 0 s of the 3 s budget left"
    rows = run_all.build_rows({"crt_memory": st["late"]})
    assert (rows[0].key, rows[0].met) == ("6c", "failed") and "not run" in rows[0].what
