"""Trainer integration tests on the small demo cache (tiny timm model, CPU)."""

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script, tiny_cfg
from cxrlt.models.checkpoint import load_checkpoint
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import lock_path, read_jsonl
from cxrlt.post.inference import load_trained
from cxrlt.training.ema import EMA
from cxrlt.training.schedule import lr_multiplier
from cxrlt.training.trainer import Trainer, train


def _train_args(cache, out, *extra):
    return ["train.py", "--config", "configs/demo.yaml", "--cache", cache, "--out", out, "--model", "test_convnext",
            "--epochs", "3", "--batch_size", "16", "--workers", "0", "--device", "cpu", "--drw_epoch", "1", *extra]


def _weights(path, key="model"):
    return load_checkpoint(path)[key]


def _same_weights(a, b, atol):
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


@pytest.mark.slow
def test_run_folder_and_learning(demo_cache, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(epochs=4, loss="ldam", head="cosine", drw_epoch=2, ema=True, ema_decay=0.9)
    res = train(cfg, str(demo_cache), str(out))
    for f in ("config.yaml", "run.json", "metrics.jsonl", "last.pt", "best.pt", "model.pt", "train.log"):
        assert (out / f).exists(), f
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3]
    assert [r["drw_active"] for r in recs] == [False, False, True, True]
    assert all(set(r["val_ap"]) == set(load_checkpoint(out / "model.pt")["labels"]) for r in recs)
    ck = load_checkpoint(out / "model.pt")
    assert ck["best_map"] == pytest.approx(res["best_map"])
    assert load_trained(out / "model.pt")[0].logit_scale == 30.0  # LDAM's s, inside the model
    # the best epoch: the highest mAP on the selection set (the demo knows projections: the proxy);
    # best_map is that epoch's full val mAP
    assert recs[0]["select_on"] == "proxy" and res["selection"]["select_on"] == "proxy"
    select = [r["val_select_mAP"] for r in recs]
    assert res["best_epoch"] == select.index(max(select)) == recs[-1]["best_epoch"]
    assert res["best_map"] == pytest.approx(recs[res["best_epoch"]]["val_mAP"])
    assert all(0 < r["val_honest_mAP"] <= 1 for r in recs)
    # the run's keys, in run.json and in every checkpoint
    run = json.loads((out / "run.json").read_text())
    manifest = json.loads((demo_cache / "manifest.json").read_text())
    assert run["data_key"] == manifest["key"] and run["epochs_done"] == 4
    assert (run["image_size"], run["world_size"], run["global_batch"]) == (32, 1, 16)
    for f in ("last.pt", "best.pt", "model.pt"):
        c = load_checkpoint(out / f)
        assert (c["train_key"], c["data_key"], c["image_size"]) == (run["train_key"], run["data_key"], 32)
    # train loss goes down
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]


def test_lr_schedule_warmup_cosine_and_drw_drop():
    cfg = tiny_cfg(epochs=10, lr=1.0, min_lr=0.01, warmup_epochs=1, drw_epoch=5, drw_lr_factor=0.1)
    m = [lr_multiplier(s, cfg, 10) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)  # linear warm-up to the peak
    assert all(a > b for a, b in zip(m[10:49], m[11:50]))  # decreasing after it
    assert m[49] / m[50] > 5  # the DRW drop at epoch 5 (a factor 10 on top of the cosine)
    assert lr_multiplier(100, cfg, 10) == pytest.approx(0.1 * 0.01)  # ends at min_lr (x the DRW factor)
    # the schedule follows the epoch count: halfway through the cosine is the middle of the range
    long = tiny_cfg(epochs=20, lr=1.0, min_lr=0.01, warmup_epochs=1, drw_epoch=-1)
    short = {**long, "epochs": 10}
    assert lr_multiplier(10 + 95, long, 10) == pytest.approx(lr_multiplier(10 + 45, short, 10))
    assert lr_multiplier(10 + 45, short, 10) == pytest.approx((1 + 0.01) / 2)


# ---- run keys: resume, extend, move aside, restore -----------------------------------------------


def test_existing_run_needs_resume(demo_cache, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(epochs=1), str(demo_cache), str(out))
    with pytest.raises(InputError, match="--resume"):
        train(tiny_cfg(epochs=1), str(demo_cache), str(out))


def test_finished_run_is_up_to_date_and_touches_model_pt(demo_cache, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(epochs=1), str(demo_cache), str(out))
    before, t_before = (out / "model.pt").read_bytes(), (out / "model.pt").stat().st_mtime_ns
    lines = (out / "metrics.jsonl").read_text()
    time.sleep(0.01)
    # post and run keys are no train keys: they never retrain, move or extend a run
    tr = Trainer(tiny_cfg(epochs=1, tta="none", normal_gating_alpha=1.0, workers=1, nan_check_steps=7),
                 str(demo_cache), str(out), resume=True)
    assert tr.up_to_date and not hasattr(tr, "model")  # decided from run.json: nothing was built
    tr.fit()
    assert (out / "model.pt").read_bytes() == before and (out / "model.pt").stat().st_mtime_ns > t_before
    assert (out / "metrics.jsonl").read_text() == lines
    assert not list(tmp_path.glob("run@*"))
    assert "up to date" in (out / "train.log").read_text()


def test_raised_epochs_extend_the_run_and_the_schedule_follows_the_new_total(demo_cache, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(epochs=1, lr=1e-3, min_lr=1e-6, warmup_epochs=0)
    train(cfg, str(demo_cache), str(out))
    first = (out / "model.pt").read_bytes()
    assert read_jsonl(out / "metrics.jsonl")[0]["lr"] == pytest.approx(1e-6)  # the end of a 1-epoch cosine
    train({**cfg, "epochs": 3}, str(demo_cache), str(out), resume=True)
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    # after epoch 2 of 3 the cosine is at a quarter of the peak, not at the old end (min_lr)
    assert recs[1]["lr"] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.25, rel=1e-3)
    assert json.loads((out / "run.json").read_text())["epochs_done"] == 3
    assert (out / "model.pt").read_bytes() != first  # rewritten at the new end
    assert load_checkpoint(out / "model.pt")["config"]["epochs"] == 3
    assert not list(tmp_path.glob("run@*"))


def test_patience_stops_the_run_and_a_raised_patience_continues_it(demo_cache, tmp_path):
    out = tmp_path / "run"
    # lr 1e-12: every update is below float32 resolution, so no epoch after the first improves
    cfg = tiny_cfg(epochs=6, lr=1e-12, min_lr=0.0, patience=1)
    res = train(cfg, str(demo_cache), str(out))
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    assert res["best_epoch"] == 0 and "early stop" in (out / "train.log").read_text()
    train({**cfg, "patience": 2}, str(demo_cache), str(out), resume=True)
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]


def test_other_train_keys_move_the_run_aside_and_an_earlier_run_is_restored(demo_cache, tmp_path):
    out = tmp_path / "run"
    a, b = tiny_cfg(epochs=1), tiny_cfg(epochs=1, lr=1e-3)
    train(a, str(demo_cache), str(out))
    tag_a = json.loads((out / "run.json").read_text())["tag"]
    model_a = (out / "model.pt").read_bytes()
    train(b, str(demo_cache), str(out), resume=True)  # another lr: a new run, the old one kept beside
    assert (tmp_path / f"run@{tag_a}" / "model.pt").read_bytes() == model_a
    assert "moved it to" in (out / "train.log").read_text()
    run_b = json.loads((out / "run.json").read_text())
    assert run_b["tag"] != tag_a and run_b["epochs_done"] == 1 and load_checkpoint(out / "model.pt")["config"]["lr"] == 1e-3
    tr = Trainer(a, str(demo_cache), str(out), resume=True)  # back to a: restored, not retrained
    assert tr.up_to_date
    tr.fit()
    assert (out / "model.pt").read_bytes() == model_a
    assert (tmp_path / f"run@{run_b['tag']}" / "model.pt").exists() and not (tmp_path / f"run@{tag_a}").exists()
    assert "restored the earlier run" in (out / "train.log").read_text()


def test_init_checkpoint_content_is_part_of_the_train_key(demo_cache, tmp_path):
    from cxrlt.training.run_folder import run_train_key

    src = tmp_path / "src"
    train(tiny_cfg(epochs=1), str(demo_cache), str(src))
    cfg = tiny_cfg(init_checkpoint=str(src / "model.pt"))
    k1 = run_train_key(cfg)
    train(tiny_cfg(epochs=2), str(demo_cache), str(src), resume=True)  # the source run is extended
    assert run_train_key(cfg) != k1  # same path, other weights: another run


@pytest.fixture(scope="module")
def cache_16(demo_dataset, tmp_path_factory):
    """The demo dataset's train cache at 16 px (another image size than demo_cache)."""
    from conftest import build_caches

    return build_caches(demo_dataset, tmp_path_factory.mktemp("c16") / "root", 16)[0]


def test_a_cache_of_another_size_is_refused(demo_cache, cache_16, tmp_path, capsys):
    from test_bad_inputs import script_fails_inprocess

    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"images are 32 px but the config wants img_size 16"):
        train(tiny_cfg(epochs=1, img_size=16), str(demo_cache), str(out))
    train(tiny_cfg(epochs=1, img_size=32), str(demo_cache), str(out))
    with pytest.raises(InputError, match=r"trained on 32 px images but the cache has 16 px"):
        train(tiny_cfg(epochs=1), str(cache_16), str(out), resume=True)
    capsys.readouterr()  # the runs' own output
    for script in (["predict.py", "--checkpoint", out / "model.pt", "--split", "val", "--out", tmp_path / "p.csv"],
                   ["retrain_head.py", "--run", out, "--out", tmp_path / "crt"]):
        line = script_fails_inprocess(capsys, *script, "--cache", cache_16)
        assert line == (f"error: {cache_16}: images are 16 px but {out / 'model.pt'} was trained on 32 px images; "
                        f"use the cache of that size (IMG_SIZE=32) or retrain")


def test_init_from_without_init_checkpoint_is_refused(demo_cache, tmp_path):
    with pytest.raises(InputError, match="init_from.*--init_checkpoint"):
        train(tiny_cfg(init_from="paper_ldam_drw"), str(demo_cache), str(tmp_path / "run"))


@pytest.mark.slow
def test_two_resumes_at_once_the_second_is_refused(demo_cache, tmp_path):
    out = tmp_path / "run"
    args = _train_args(demo_cache, out, "--epochs", "50", "--resume")
    first = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "run.lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip()):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        p = run_script(*args, check=False)
        assert p.returncode == 2
        line = p.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {out}: pid {first.pid} on {socket.gethostname()} (train.py --config ")
        assert line.endswith(") is running on this output; wait for it or stop it")
        assert first.poll() is None  # the first one goes on
    finally:
        first.kill()
        first.wait()


# ---- the training step ----------------------------------------------------------------------------


def _trainer(demo_cache, tmp_path, name="run", **kw):
    return Trainer(tiny_cfg(**kw), str(demo_cache), str(tmp_path / name))


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_head_warmup_keeps_the_backbone_frozen_for_its_epochs(demo_cache, tmp_path):
    tr = _trainer(demo_cache, tmp_path, epochs=2, head_warmup_epochs=1, weight_decay=0.1)
    bb0, head0 = _params(tr.model.backbone), _params(tr.model.head)
    tr.train_epoch(0)
    bb1, head1 = _params(tr.model.backbone), _params(tr.model.head)
    assert all(torch.equal(bb0[n], bb1[n]) for n in bb0)  # no step, no weight decay either
    assert not any(torch.equal(head0[n], head1[n]) for n in head0)
    tr.train_epoch(1)
    moved = [not torch.equal(bb1[n], p) for n, p in _params(tr.model.backbone).items()]
    assert sum(moved) > len(moved) / 2


def test_accumulating_two_batches_of_8_equals_one_batch_of_16(demo_cache, tmp_path):
    kw = dict(epochs=1, drop_path=0.0, aug_rotate=3.0)  # a LayerNorm model: no batch statistics
    big = _trainer(demo_cache, tmp_path, "big", batch_size=16, **kw)
    acc = _trainer(demo_cache, tmp_path, "acc", batch_size=8, accum_steps=2, **kw)
    assert big.steps_per_epoch == acc.steps_per_epoch
    sb, sa = big.train_epoch(0), acc.train_epoch(0)
    assert big.step == acc.step
    assert sb["train_loss"] == pytest.approx(sa["train_loss"], rel=1e-5)
    assert _same_weights(big.model.state_dict(), acc.model.state_dict(), atol=1e-5)
    one = _trainer(demo_cache, tmp_path, "one", batch_size=8, **kw)  # without accumulation: another run
    one.train_epoch(0)
    assert not _same_weights(big.model.state_dict(), one.model.state_dict(), atol=1e-5)


def _grad_norms(tr):
    norms = []

    def hook(opt, args, kwargs):
        g = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g]))))

    tr.optimizer.register_step_pre_hook(hook)
    tr.train_epoch(0)
    return norms


def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(demo_cache, tmp_path):
    free = _grad_norms(_trainer(demo_cache, tmp_path, "free", epochs=1))
    clip = min(free) / 4
    clipped = _grad_norms(_trainer(demo_cache, tmp_path, "clip", epochs=1, grad_clip=clip))
    assert len(clipped) == len(free) > 0
    assert max(clipped) == pytest.approx(clip, rel=1e-4)  # clipped to the bound, never above it


def test_ema_update_is_the_ramped_exponential_average():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.5)
    ref = {k: v.clone().double() for k, v in net.state_dict().items()}
    for step in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 3))  # BatchNorm running stats and its (integer) batch counter move
        ema.update()
        d = min(0.5, (1 + step) / (10 + step))  # 0.1818.., 0.25, ... then capped at 0.5
        for k, v in net.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double() if v.dtype.is_floating_point else v.clone().double()
    got = ema.module.state_dict()
    assert all(torch.allclose(got[k].double(), ref[k], atol=1e-6) for k in ref)
    assert int(got["1.num_batches_tracked"]) == 5


def test_nan_check_stops_the_run_within_n_batches(demo_cache, tmp_path):
    tr = _trainer(demo_cache, tmp_path, epochs=1, batch_size=8, nan_check_steps=3)
    assert tr.batches_per_epoch > 6
    calls = []

    class NanFromTheSecondBatch:
        def __init__(self, loss):
            self.loss = loss

        def set_epoch(self, epoch):
            self.loss.set_epoch(epoch)

        def __call__(self, z, y):
            calls.append(1)
            out = self.loss(z, y)
            return out * float("nan") if len(calls) >= 2 else out

    tr.loss_fn = NanFromTheSecondBatch(tr.loss_fn)
    with pytest.raises(InputError, match=r"non-finite training loss in epoch 1, between batches 1 and 3: lower the LR"):
        tr.train_epoch(0)
    assert len(calls) == 3  # stopped at the first check after it


def test_one_epoch_of_the_winners_recipe(demo_cache, tmp_path):
    # CSRA head + distribution-balanced loss + class-aware sampling + EMA + head warm-up + clipping
    from cxrlt.core import config

    cfg = config.resolve(["configs/db_cas_csra.yaml"], dict(model="test_convnext", pretrained=False, epochs=1,
                                                             batch_size=16, workers=0, device="cpu", ema_decay=0.9))
    out = tmp_path / "run"
    res = train(cfg, str(demo_cache), str(out))
    (rec,) = read_jsonl(out / "metrics.jsonl")
    assert np.isfinite(rec["train_loss"]) and 0 < res["best_map"] <= 1
    last = load_checkpoint(out / "last.pt")
    assert "head.conv.weight" in last["model"] and last["ema"]["steps"] == last["step"] > 0
    assert not _same_weights(last["model"], last["train_model"], atol=1e-7)  # model.pt holds the EMA
    model, _ = load_trained(out / "model.pt")
    assert type(model.head).__name__ == "CSRAHead"


# ---- processes: kill and resume, DDP, several nodes, another world size ---------------------------


def _kill_after_first_epoch(cmd, out, env=None):
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if len(read_jsonl(out / "metrics.jsonl")) >= 1 and (out / "last.pt").exists():
            break
        if p.poll() is not None:
            raise AssertionError(p.stderr.read().decode()[-2000:])
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the whole group: torchrun and its workers
    p.wait()
    # torchrun may start its workers in sessions of their own: kill whatever still runs on `out`
    # and wait until it is gone (a live one would still hold the run's lock)
    for _ in range(600):
        left = _processes_on(out)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    # a process in the middle of exiting has no command line yet still holds its files: wait until
    # the run's lock is free (the condition the resume needs)
    for _ in range(600):
        if _lock_free(out):
            return
        time.sleep(0.05)
    raise AssertionError(f"{out}: its lock is still held after the kill")


def _lock_free(out) -> bool:
    path = lock_path(out)
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases it again


def _processes_on(out) -> list[int]:
    """Live (not zombie) processes whose command line names `out`."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            state = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(out) in cmd and state != "Z":
            pids.append(int(d))
    return pids


# every augmentation on (CLAHE, noise, dropout and the gates: docs/augmentation.md), mixup and cutmix
# (a loss that takes mixed labels) and SWA of the last 2 epochs
EVERY_AUGMENTATION = ["--aug_hflip", "0.5", "--aug_affine_p", "0.6", "--aug_color_p", "0.5", "--aug_clahe_p", "0.5",
                      "--aug_noise_p", "0.5", "--aug_dropout_p", "0.5", "--aug_dropout_size", "0.1", "--loss", "bce",
                      "--mixup_alpha", "0.4", "--cutmix_alpha", "1.0", "--mix_prob", "0.8", "--swa_epochs", "2",
                      "--swa_model", "swa"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], EVERY_AUGMENTATION], ids=["defaults", "every_augmentation_mixing_swa"])
def test_resume_after_kill_matches_uninterrupted(demo_cache, tmp_path, extra):
    # b runs with 2 persistent loader workers (the epoch carried by the sampler), a with none
    a, b = tmp_path / "a", tmp_path / "b"
    run_script(*_train_args(demo_cache, a, *extra), env={"OMP_NUM_THREADS": "1"})
    _kill_after_first_epoch([sys.executable, *map(str, _train_args(demo_cache, b, *extra, "--workers", "2"))], b)
    assert not (b / "model.pt").exists()
    run_script(*_train_args(demo_cache, b, *extra, "--resume", "--workers", "2"), env={"OMP_NUM_THREADS": "1"})
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [0, 1, 2]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_mAP"] == pytest.approx(y["val_mAP"], rel=1e-5)
    assert _same_weights(_weights(a / "model.pt"), _weights(b / "model.pt"), atol=1e-5)
    if extra:
        assert load_checkpoint(b / "model.pt")["swa"]["epochs"] == [1, 2]
        assert _same_weights(_weights(a / "swa.pt"), _weights(b / "swa.pt"), atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_node_cmds(args):
    """Two torchrun launches, one process each, meeting at a c10d rendezvous on localhost: the
    way two machines of a cluster would start (only --node_rank differs)."""
    port = _free_port()
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
             "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
             "--rdzv_id=cxrlt-test", *map(str, args)] for rank in (0, 1)]


def _run_two_nodes(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in _two_node_cmds(args)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


DDP_COMMON = ["--epochs", "2", "--aug_hflip", "0.5", "--drop_path", "0"]


@pytest.fixture(scope="module")
def single_and_two_node_runs(demo_cache, tmp_path_factory):
    """The same 2-epoch run as one process (batch 16) and as two 'nodes' of one process (8 each)."""
    tmp = tmp_path_factory.mktemp("ddp")
    single, nodes = tmp / "single", tmp / "nodes"
    run_script(*_train_args(demo_cache, single, *DDP_COMMON))
    args = _train_args(demo_cache, nodes, *DDP_COMMON)
    args[args.index("--batch_size") + 1] = "8"  # 2 processes x 8 = the single run's 16
    _run_two_nodes(args)
    return single, nodes, args


@pytest.mark.slow
def test_two_nodes_match_a_single_process(single_and_two_node_runs):
    single, nodes, _ = single_and_two_node_runs
    rs, rd = read_jsonl(single / "metrics.jsonl"), read_jsonl(nodes / "metrics.jsonl")
    assert len(rs) == len(rd) == 2
    for x, y in zip(rs, rd):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-3)
        assert x["val_mAP"] == pytest.approx(y["val_mAP"], abs=2e-3)
    assert _same_weights(_weights(single / "model.pt"), _weights(nodes / "model.pt"), atol=1e-3)
    run = json.loads((nodes / "run.json").read_text())
    assert (run["world_size"], run["global_batch"], run["accum_steps"]) == (2, 16, 1)


@pytest.mark.slow
def test_resume_with_another_world_size_keeps_the_global_batch(single_and_two_node_runs, demo_cache, tmp_path):
    _, nodes, args = single_and_two_node_runs
    out = tmp_path / "run"
    args = [out if str(a) == str(nodes) else a for a in args]
    _kill_after_first_epoch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *map(str, args)], out)
    assert load_checkpoint(out / "last.pt")["world_size"] == 2
    p = run_script(*args, "--resume")  # one process now: 2 micro-batches of 8 per step
    assert "resuming with 1 processes instead of 2: 2 micro-batches of 8" in p.stderr
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["global_batch"], run["accum_steps"]) == (1, 16, 2)
    rn, ro = read_jsonl(nodes / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert rn[1]["train_loss"] == pytest.approx(ro[1]["train_loss"], rel=1e-3)
    assert _same_weights(_weights(nodes / "model.pt"), _weights(out / "model.pt"), atol=1e-3)


def test_resume_accum_steps_keeps_the_global_batch_or_names_the_world_sizes_that_do():
    from cxrlt.training.run_folder import resume_accum_steps

    # 4 processes x 8 x accum 2 = 64: 8 processes need 1 micro-batch, 1 process needs 8
    assert [resume_accum_steps(64, 4, 8, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(InputError, match=r"^run: this run's global batch is 24 images \(3 processes\); 2 processes "
                                         r"x batch_size 8 cannot form it: resume with 1 or 3 processes$"):
        resume_accum_steps(24, 3, 8, 2)


# ---- LR and global batch (several GPUs) ---------------------------------------------------------


def _lr_sequence(cfg, num_rows, world, accum, epochs):
    """The backbone LR at every optimizer step of `epochs` epochs, as the Trainer sets it."""
    from cxrlt.training.schedule import epoch_shape, lr_scale_factor

    g = cfg["batch_size"] * world * accum
    _, steps = epoch_shape(num_rows, cfg["batch_size"], world, accum)
    f = lr_scale_factor(cfg, g)
    return steps, [cfg["lr"] * f * lr_multiplier(s, cfg, steps) for s in range(epochs * steps)]


def test_one_process_accumulating_8_and_8_processes_have_the_same_schedule():
    from cxrlt.data.samplers import InstanceSampler

    cfg = tiny_cfg(epochs=3, batch_size=32, lr=1e-3, warmup_epochs=0.5, drw_epoch=2, drw_lr_factor=0.1)
    for n in (1000, 2047, 2048, 2049, 3583):  # rows that 8 processes pad differently
        one = _lr_sequence(cfg, n, world=1, accum=8, epochs=3)
        eight = _lr_sequence(cfg, n, world=8, accum=1, epochs=3)
        assert one == eight and one[0] == n // 256
        # each of the 8 processes has enough sampled rows for its share of the steps
        s = InstanceSampler(n, seed=0, num_replicas=8, rank=7)
        assert len(s) >= one[0] * cfg["batch_size"]
    # without a reference batch the LR is the config's, whatever the layout (today's rule)
    assert max(_lr_sequence(cfg, 2048, 8, 1, 3)[1]) == pytest.approx(1e-3)


def test_lr_scale_follows_the_global_batch_against_lr_ref_batch():
    from cxrlt.training.schedule import lr_scale_factor

    base = dict(batch_size=32, lr=1e-3)
    assert lr_scale_factor(tiny_cfg(**base), 256) == 1.0  # lr_ref_batch 0: as given
    assert lr_scale_factor(tiny_cfg(**base, lr_ref_batch=32, lr_scale="none"), 256) == 1.0
    assert lr_scale_factor(tiny_cfg(**base, lr_ref_batch=32, lr_scale="linear"), 256) == pytest.approx(8.0)
    assert lr_scale_factor(tiny_cfg(**base, lr_ref_batch=32, lr_scale="sqrt"), 128) == pytest.approx(2.0)
    assert lr_scale_factor(tiny_cfg(**base, lr_ref_batch=256, lr_scale="linear"), 256) == 1.0


def test_trainer_applies_and_logs_the_effective_lr(demo_cache, tmp_path):
    tr = _trainer(demo_cache, tmp_path, batch_size=8, accum_steps=2, lr=1e-3, head_lr=2e-3,
                  lr_ref_batch=8, lr_scale="linear")
    assert tr.global_batch == 16 and tr.lr_factor == pytest.approx(2.0)
    assert sorted({g["base_lr"] for g in tr.optimizer.param_groups}) == pytest.approx([2e-3, 4e-3])
    assert tr.batches_per_epoch == tr.steps_per_epoch * 2 == (len(tr.train_rows) // 16) * 2
    line = tr._lr_line()
    assert "global batch 16 = batch_size 8 x 1 process(es) x accum_steps 2" in line
    assert f"{tr.steps_per_epoch} optimizer steps/epoch" in line and "effective lr 2.000e-03" in line
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["global_batch"], run["steps_per_epoch"], run["effective_lr"]) == (16, tr.steps_per_epoch, 2e-3)


def test_head_only_warmup_under_no_grad_gives_the_full_backward_head(demo_cache, tmp_path):
    kw = dict(epochs=2, head_warmup_epochs=1, weight_decay=0.1, drop_path=0.1)
    fast = _trainer(demo_cache, tmp_path, "fast", **kw)
    full = _trainer(demo_cache, tmp_path, "full", **kw)
    full.head_only_no_grad = False  # the old path: whole backward, backbone LR 0
    calls = []
    fast.model.backbone.register_full_backward_hook(lambda *a: calls.append(1))
    fast.train_epoch(0)
    full.train_epoch(0)
    assert not calls  # no backward through the backbone
    assert _same_weights(_params(fast.model.head), _params(full.model.head), atol=1e-6)
    assert not any(p.grad is not None for p in fast.model.backbone.parameters())
    assert _same_weights(fast.model.state_dict(), full.model.state_dict(), atol=1e-6)
