"""Atomic file writing and output locks.

Atomic writes: nothing half-written ever sits at a final path. Every stage writes to a
temporary name in the same directory, fsyncs it, and renames it into place when complete
(rename is atomic on POSIX within one filesystem; the fsync first means a power cut cannot
leave a renamed but empty checkpoint). A crash leaves at most a `.<name>.*.tmp*` file, which
the next write of the same name deletes.

`output_lock(folder)`: one writer per output folder. The lock is an flock on `<folder>.lock`
beside the folder (the folder itself may be replaced by a rename); while held, the file holds
the holder's "pid P on HOST (command line)", for the message the second writer gets: "<folder>:
pid P on HOST (...) is running on this output; wait for it or stop it". The OS drops the lock
when the holder exits, however it exits (kill -9 included); the file stays (removing it would
race with a new holder).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import socket
import sys
import tempfile
import time
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
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if disk_full(e, final.parent):
            from cxrlt.core.errors import InputError

            raise InputError(f"{final}: the disk is full ({free_space(final.parent)} free on that filesystem) "
                             f"while writing it; free some space and re-run the same command (finished work "
                             f"is kept)") from None
        raise


def disk_full(e: BaseException, where) -> bool:
    """Whether a write failed for want of space: ENOSPC/EDQUOT, or a library's own write error (torch
    says "file write failed") while the filesystem has (nearly) nothing left."""
    import errno
    import shutil

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, (OSError, RuntimeError)) and "write" in str(e).lower():
        with contextlib.suppress(OSError):
            return shutil.disk_usage(where).free < (64 << 20)
    return False


def free_space(where) -> str:
    """Free bytes on the filesystem of `where`, written for a person (exact below 10 MB)."""
    import shutil

    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return "unknown"
    return f"{free} bytes" if free < 10_000_000 else f"{free / 1e9:.2f} GB"


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


STALE_TEMP_S = 60  # a temp file untouched this long has no live writer (one that writes moves its mtime)


def _remove_stale_temps(final: Path) -> None:
    """Delete temp files a killed writer of `final` left behind (a big last.pt each time); a fresh
    one may belong to a live writer on another node of a shared folder, and stays."""
    now = time.time()
    for p in final.parent.glob(f".{glob.escape(final.name)}.*.tmp*"):
        with contextlib.suppress(OSError):
            if p.is_file() and now - p.stat().st_mtime > STALE_TEMP_S:
                p.unlink()


def lock_path(folder) -> Path:
    """The lock file of an output folder: `<folder>.lock`, beside it."""
    return Path(f"{os.fspath(folder).rstrip(os.sep)}.lock")


@contextlib.contextmanager
def output_lock(folder):
    """Hold the lock of output folder `folder` for the block (yields the lock file's path);
    InputError (one line naming the holder's pid, host and command) if another process holds it."""
    from cxrlt.core.errors import InputError

    lock = lock_path(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise InputError(f"{folder}: {holder} is running on this output; wait for it or stop it") from None
        command = " ".join(sys.argv).replace("\n", " ")[:300]
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, only unnamed
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command})\n".encode(), 0)
        try:
            yield lock
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_if_changed(path, text: str) -> bool:
    """write_text unless `path` already holds exactly `text` (its mtime then stays) -> written?"""
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)
    return True


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
