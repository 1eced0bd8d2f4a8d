"""BackgroundSaver: checkpoints copied at once, written by a thread, atomically, in order; the
file equals a synchronous save; a write in flight finishes before the next save and before exit;
a kill during the write keeps the previous file."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from conftest import ROOT
from cxrlt.core import fileio
from cxrlt.core.fileio import torch_save
from cxrlt.models.checkpoint import BackgroundSaver, load_checkpoint


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 32, generator=g)
    return {"epoch": seed, "model": {"w": w, "b": torch.zeros(32)}, "train_model": {"w": w},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(64, 32, generator=g)}}, "param_groups": [{"lr": 0.1}]},
            "val_table": [{"full": 0.5, "ap_half_a": [0.1, 0.2]}]}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_the_file_is_the_state_at_save_time_and_equals_a_synchronous_save(tmp_path):
    state = _state(1)
    torch_save(state, tmp_path / "sync.pt")
    saver = BackgroundSaver()
    saver.save([(state, tmp_path / "last.pt")], then=lambda: (tmp_path / "after").write_text("x"))
    state["model"]["w"].add_(1.0)  # training goes on while the thread writes
    state["optimizer"]["state"][0]["exp_avg"].zero_()
    saver.wait()
    got, want = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "sync.pt")
    assert _same(got, want)
    assert got["model"]["w"].data_ptr() == got["train_model"]["w"].data_ptr()  # still one tensor, as saved
    assert (tmp_path / "after").exists()  # `then` ran after the files


def test_a_save_in_flight_finishes_before_the_next_one_starts(tmp_path, monkeypatch):
    events = []
    real = fileio.torch_save

    def slow(obj, path):
        events.append(("start", obj["epoch"]))
        time.sleep(0.2)
        real(obj, path)
        events.append(("end", obj["epoch"]))

    monkeypatch.setattr(fileio, "torch_save", slow)
    saver = BackgroundSaver()
    saver.save([(_state(1), tmp_path / "last.pt")])
    assert saver.busy
    saver.save([(_state(2), tmp_path / "last.pt")])  # waits for epoch 1's write, then queues epoch 2's
    saver.wait()
    assert events == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert _same(load_checkpoint(tmp_path / "last.pt"), _state(2))


def test_a_write_error_reaches_the_caller(tmp_path, monkeypatch):
    def broken(obj, path):
        raise OSError("disk gone")

    monkeypatch.setattr(fileio, "torch_save", broken)
    saver = BackgroundSaver()
    saver.save([(_state(1), tmp_path / "last.pt")])
    try:
        saver.wait()
        raise AssertionError("no error")
    except OSError as e:
        assert "disk gone" in str(e)


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from cxrlt.core import fileio
    from cxrlt.models.checkpoint import BackgroundSaver
    from test_checkpoint_async import _state
    out, mode = sys.argv[1], sys.argv[2]
    real_save = torch.save
    def slow_save(obj, f):  # half a file, a pause, then the rest: a kill lands inside the write
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[:len(data) // 2])
            fh.flush()
            open(out + "/writing", "w").close()
            time.sleep(float(sys.argv[3]))
            fh.write(data[len(data) // 2:])
    torch.save = slow_save
    BackgroundSaver().save([(_state(2), out + "/last.pt")])
    # main returns at once: exit must wait for the write (mode exit) or be killed during it (mode kill)
""")


def _run(tmp_path, mode, pause):
    script = tmp_path / "saver.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path), mode, str(pause)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE)


def test_the_interpreter_finishes_a_write_in_flight_before_it_exits(tmp_path):
    p = _run(tmp_path, "exit", 0.5)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    assert _same(load_checkpoint(tmp_path / "last.pt"), _state(2))


def test_a_kill_during_the_write_keeps_the_previous_last_pt(tmp_path):
    torch_save(_state(1), tmp_path / "last.pt")
    p = _run(tmp_path, "kill", 60)
    deadline = time.time() + 120
    while not (tmp_path / "writing").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert (tmp_path / "writing").exists(), p.stderr.read().decode()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _same(load_checkpoint(tmp_path / "last.pt"), _state(1))
