"""What produced a run folder or an output: the code (git commit, dirty tree), the packages, the
machine and the exact command line. One record, written as `provenance.json` in a run folder
(train.py at the start of a training, retrain_head.py in RUN/crt/) and as `<output>.provenance.json`
beside predict.py's prediction CSVs. Format: docs/formats.md "provenance.json".

    p = collect()                        # the record of this process, now
    write(folder / "provenance.json")    # collect() written there (an older record kept in "earlier")
    read(path) -> dict | None
    summary(p) -> "commit 1a2b3c4d (dirty), torch 2.4.1, cuda 12.1, 1 x NVIDIA H100, host h1"

A field that cannot be known (no git, not a repository, no GPU) is recorded as None ("unknown"),
never an error: provenance never costs a run.
"""

from __future__ import annotations

import json
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

CODE_ROOT = Path(__file__).resolve().parents[2]  # the project's root (where train.py lives)
KEEP_EARLIER = 20  # records of earlier starts kept in "earlier" (a run resumed again and again)


def git_state(root=CODE_ROOT) -> dict:
    """{"commit": 40 hex | None, "dirty": bool | None, "branch": str | None} of the repository
    holding root; None everywhere when git is missing or root is not in a work tree. dirty: a
    tracked file differs from the commit (untracked files do not count; `git status -uno`)."""
    def git(*args):
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        return res.stdout.strip() if res.returncode == 0 else None

    try:
        commit = git("rev-parse", "--verify", "HEAD")
        if not commit:
            return {"commit": None, "dirty": None, "branch": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        return {"commit": commit, "dirty": None if status is None else bool(status),
                "branch": None if branch in (None, "HEAD") else branch}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "branch": None}


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: unknown
        return None


def _cuda() -> dict:
    try:
        import torch
    except Exception:
        return {"cuda": None, "cudnn": None, "gpus": [], "gpu_count": 0}
    cudnn = None
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        pass
    gpus = []
    try:
        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return {"cuda": torch.version.cuda, "cudnn": cudnn, "gpus": gpus, "gpu_count": len(gpus)}


def collect(argv=None, root=CODE_ROOT) -> dict:
    """The provenance record of this process (docs/formats.md "provenance.json")."""
    argv = list(sys.argv if argv is None else argv)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_state(root),
        "command": shlex.join(argv),
        "python_executable": sys.executable,
        "cwd": str(Path.cwd()),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "torch": _version("torch"),
                     "timm": _version("timm"), "numpy": _version("numpy")},
        **_cuda(),
    }


def read(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write(path, argv=None, root=CODE_ROOT) -> dict:
    """Write collect() to path; a record already there (an earlier start of the same run) moves,
    without its own "earlier", to the front of "earlier". Returns the record written."""
    from cxrlt.core.fileio import write_json

    rec = collect(argv, root)
    old = read(path)
    if old:
        earlier = old.pop("earlier", [])
        rec["earlier"] = ([old] + earlier)[:KEEP_EARLIER]
    write_json(path, rec)
    return rec


def beside(output) -> Path:
    """The provenance file of an output file: `<output>.provenance.json`."""
    return Path(f"{output}.provenance.json")


def summary(p: dict | None) -> str:
    """One line: 'commit 1a2b3c4d (dirty), python 3.11.9, torch 2.4.1, timm 1.0.9, cuda 12.1,
    1 x NVIDIA H100, host h1'; 'unknown' for a missing record."""
    if not p:
        return "unknown (no provenance record)"
    g = p.get("git") or {}
    commit = g.get("commit")
    code = "commit unknown" if not commit else (
        f"commit {commit[:8]}" + {True: " (dirty)", False: "", None: " (dirty: unknown)"}[g.get("dirty")])
    v = p.get("versions") or {}
    gpus = p.get("gpus") or []
    hw = f"{len(gpus)} x {gpus[0]}" if gpus and len(set(gpus)) == 1 else (", ".join(gpus) if gpus else "no GPU")
    return (f"{code}, python {v.get('python')}, torch {v.get('torch')}, timm {v.get('timm')}, "
            f"cuda {p.get('cuda') or 'none'}, {hw}, host {p.get('hostname')}")
