"""Atomic file writing: nothing half-written ever sits at a final path.

Every stage writes to a temporary name in the same directory and renames it into place
when complete (rename is atomic on POSIX within one filesystem). A crash leaves at most a
`*.tmp*` file that the next run overwrites.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
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
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove_stale_temps(final: Path) -> None:
    """Delete temp files a killed writer of `final` left behind (a big last.pt each time)."""
    for p in final.parent.glob(f".{glob.escape(final.name)}.*.tmp*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                p.unlink()


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
