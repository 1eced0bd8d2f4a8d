"""cxrlt.core.fileio: atomic writes and the output lock."""

import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import lock_path, output_lock, write_text

HOLD = ("import sys, time; sys.path.insert(0, {root!r}); from cxrlt.core.fileio import output_lock\n"
        "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")


def _holder(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT)), str(folder)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_naming_the_first_and_a_dead_holder_frees_the_lock(tmp_path):
    out = tmp_path / "run"
    p = _holder(out)
    try:
        with pytest.raises(InputError) as e:
            with output_lock(out):
                pass
        msg = str(e.value)
        assert msg.startswith(f"{out}: pid {p.pid} on {socket.gethostname()} (")
        assert f"(-c {out})" in msg and msg.endswith("is running on this output; wait for it or stop it")
        assert "\n" not in msg
    finally:
        p.kill()  # kill -9: the kernel drops the lock with the process
        p.wait()
    with output_lock(out) as path:
        assert path == lock_path(out) == tmp_path / "run.lock"
        assert path.read_text().startswith(f"pid {os.getpid()} on {socket.gethostname()} (")
    assert path.read_text() == ""  # released: no holder described


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path):
    f = tmp_path / "a.txt"
    write_text(f, "one")
    write_text(f, "two")
    assert f.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_full_disk_during_an_atomic_write_is_one_line_naming_the_file(tmp_path):
    import errno

    import pytest

    from cxrlt.core.errors import InputError
    from cxrlt.core.fileio import atomic_path

    final = tmp_path / "model.pt"
    with pytest.raises(InputError) as e:
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(e.value)
    assert msg.startswith(f"{final}: the disk is full") and "free on that filesystem" in msg and "\n" not in msg
    assert not final.exists() and list(tmp_path.iterdir()) == []  # nothing half-written is left


def test_a_full_disk_outside_an_atomic_write_exits_2_with_one_line(tmp_path, capsys):
    import errno

    import pytest

    from cxrlt.core.cli import main_wrapper

    def main():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))

    with pytest.raises(SystemExit) as e:
        main_wrapper(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {tmp_path / 'metrics.jsonl'}: the disk is full")
    assert err.count("\n") == 1
