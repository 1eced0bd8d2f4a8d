"""Atomic file writing and output locks.

Atomic writes: nothing half-written ever sits at a final path. Every stage writes to a
temporary name in the same directory, fsyncs it, and renames it into place when complete
(rename is atomic on POSIX within one filesystem; the fsync first means a power cut cannot
leave a renamed but empty checkpoint). A crash leaves at most a `.<name>.*.tmp*` file, which
the next write of the same name deletes.

Output locks: `output_lock(folder)` holds an exclusive flock on `<folder>.lock` (a file beside
the folder, so moving or deleting the folder never races with the lock) for as long as a stage
writes into the folder. The file holds one JSON line {"pid", "host", "cmd"} of the holder; a
second stage on the same folder stops at once with an InputError naming them. The kernel
drops the lock when the holder dies (kill -9 included), so a stale file never blocks anyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `final`; rename it to `final` if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        if os.path.exists(tmp):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
            _fsync(tmp)
        os.replace(tmp, final)
        _fsync(final.parent)  # the rename itself
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path) -> None:
    """Flush a file's (or a folder's) data to disk; best effort where the filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. some network filesystems refuse fsync on a folder
    finally:
        os.close(fd)


def _remove_stale_temps(final: Path) -> None:
    """Delete temp files a killed writer of `final` left behind (a big last.pt each time)."""
    import glob

    for p in final.parent.glob(f".{glob.escape(final.name)}.*.tmp*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                p.unlink()


def lock_path(folder) -> Path:
    """The lock file of an output folder: `<folder>.lock`, beside it."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}.lock"


@contextlib.contextmanager
def output_lock(folder):
    """Hold the exclusive lock of output `folder` (see the module docstring) for the block.

    InputError (one line) when another process holds it: "<folder>: pid P on HOST (CMD) is
    running on this output; wait for it or stop it".
    """
    from .errors import InputError

    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = _describe_holder(f.read())
        f.close()
        raise InputError(f"{folder}: {holder} is running on this output; wait for it or stop it") from None
    try:
        f.truncate(0)
        cmd = " ".join(sys.argv) or sys.executable
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "cmd": cmd}) + "\n")
        f.flush()
        yield path
    finally:
        with contextlib.suppress(OSError):
            f.truncate(0)  # the holder's line describes a live holder only
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text.strip().splitlines()[0])
        cmd = " ".join(str(h["cmd"]).split())  # one line, whatever the command held
        cmd = cmd if len(cmd) <= 200 else cmd[:197] + "..."
        return f"pid {int(h['pid'])} on {h['host']} ({cmd})"
    except (ValueError, KeyError, IndexError, TypeError):
        return "another process"  # it took the lock and has not written its line yet


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_csv(path, df, **kwargs) -> None:
    """Write a pandas DataFrame atomically (index off unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, **kwargs)


def torch_save(obj, path) -> None:
    import torch

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line. A line is written with one write() call and flushed, so a kill
    leaves either the whole line or none of it (readers skip a torn last line anyway)."""
    line = json.dumps(record, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list[dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn last line after a kill
    return out


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
