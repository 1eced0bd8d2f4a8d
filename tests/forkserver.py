"""Running pipeline stages in tests: a fork server of pre-imported interpreters, fault injection,
and a watcher that every file at a final path is complete.

Importing torch + timm takes ~5-12 s on a small CI machine, more than a tiny stage run itself, so
stage processes are started by a fork server (`shim.py --serve`: one interpreter that imports the
libraries once, then forks one child per run; the child becomes its own session, runs the script
as __main__ and exits with its status). Make runs with $(PY) set to a tiny client of that server
(CLIENT): the stage runs in a forked child tied to the client, so killing make's process group
kills the stage too, as it would a stage started directly by make.

Used by test_faults.py (kill every stage, re-run, compare) and test_make_edits.py (what `make all`
re-runs after each kind of edit).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# per-record fields that measure time, not results
TIMING_KEYS = {"images_per_s", "data_wait_frac", "train_time_s", "time_s", "feature_seconds",
               "head_train_seconds"}

# The shim: `python shim.py SCRIPT ARGS...` runs SCRIPT as __main__ with ARGS; the environment
# variable FAULT_SPEC (JSON) describes the one fault to inject. `python shim.py --serve` is the
# fork server: each stdin line {"argv", "cwd", "env", "spec", "stdout", "stderr", "rc"} forks a
# child that runs argv like that (the spec given directly); the server answers the child's pid.
# A fault spec:
#   mode    "pause": pause before calling `target` ("module:Attr.path");
#           "midwrite": `target` is a writer (torch.save, numpy.save, DataFrame.to_csv,
#           Path.write_text); write half of its bytes to the destination, then pause
#   match   only calls whose first path-like argument's file name contains this string count
#   nth     pause at the nth counted call (default 1)
#   marker  file created (atomically) when the pause starts
#   script  only install the fault in this script (file name; default: any)
SHIM = r'''
import importlib, io, json, os, runpy, signal, socket, sys, threading, time, traceback


def pause(marker):
    with open(marker + ".part", "w") as f:
        f.write(str(os.getpid()))
    os.replace(marker + ".part", marker)
    while True:
        time.sleep(3600)


def resolve(target):
    mod, attr = target.split(":")
    owner = importlib.import_module(mod)
    parts = attr.split(".")
    for p in parts[:-1]:
        owner = getattr(owner, p)
    return owner, parts[-1]


def install(spec):
    count = [0]

    def hit(path):
        if spec.get("match") and spec["match"] not in os.path.basename(str(path)):
            return False
        count[0] += 1
        return count[0] == spec.get("nth", 1)

    owner, name = resolve(spec["target"])
    orig = getattr(owner, name)
    target = spec["target"]

    if spec["mode"] == "pause":
        def wrapper(*a, **k):
            if hit(a[0] if a else ""):
                pause(spec["marker"])
            return orig(*a, **k)
    else:
        def wrapper(*a, **k):
            if target == "torch:save":
                dest, render = a[1], lambda: _bytes(lambda b: orig(a[0], b, *a[2:], **k))
            elif target == "numpy:save":
                dest, render = a[0], lambda: _bytes(lambda b: orig(b, *a[1:], **k))
            elif target == "pandas:DataFrame.to_csv":
                dest, render = a[1], lambda: orig(a[0], None, *a[2:], **k).encode()
            elif target == "pathlib:Path.write_text":
                dest, render = a[0], lambda: a[1].encode(k.get("encoding") or "utf-8")
            else:
                raise SystemExit(f"shim: no midwrite support for {target}")
            if not hit(dest):
                return orig(*a, **k)
            data = render()
            with open(dest, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            pause(spec["marker"])
    setattr(owner, name, wrapper)


def _bytes(write):
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()


def run_script(argv, spec):
    """Run argv[0] (a script path, or -c CODE) as __main__ with one fault installed."""
    script = argv[0]
    sys.argv = list(argv)
    # as `python SCRIPT` would: the script's folder first on the path (the current one for -c)
    sys.path[0] = os.getcwd() if script == "-c" else os.path.dirname(os.path.abspath(script))
    if spec and spec.get("script", os.path.basename(script)) == os.path.basename(script):
        install(spec)
    if script == "-c":
        code = sys.argv.pop(1)
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    else:
        runpy.run_path(script, run_name="__main__")


def child(conn, fds, req):
    """A forked stage process: own session, the client's stdout/stderr, exit status to the client.

    With req["tie"] it dies (SIGKILL) as soon as the client does, as a process of the client's
    process group would when that group is killed."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    conn.sendall(f"pid {os.getpid()}\n".encode())
    if req.get("tie"):
        threading.Thread(target=die_with_client, args=(conn,), daemon=True).start()
    spec = req.get("spec") or (json.loads(req["env"]["FAULT_SPEC"]) if "FAULT_SPEC" in req["env"] else None)
    rc = 1
    try:
        run_script(req["argv"], spec)
        rc = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            rc = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if req.get("rc"):
            with open(req["rc"] + ".part", "w") as f:
                f.write(str(rc))
            os.replace(req["rc"] + ".part", req["rc"])
        try:
            conn.sendall(f"rc {rc}\n".encode())
        except OSError:
            pass
        os._exit(rc)


def die_with_client(conn):
    try:
        while conn.recv(64):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def serve(sock_path):
    """Import the heavy libraries once; then fork one child per connection on the Unix socket
    sock_path. A connection sends one JSON request line {"argv", "cwd", "env", optional "spec",
    "rc" (status file), "tie"} with two file descriptors (stdout, stderr); the child answers
    "pid N" at its start and "rc N" at its end."""
    import numpy, pandas, torch, timm  # noqa: F401
    import cxrlt.data.cache, cxrlt.post.retrain_head, cxrlt.evaluation.report, cxrlt.post.inference, cxrlt.models.model  # noqa: F401
    import cxrlt.evaluation.submission, cxrlt.training.trainer  # noqa: F401
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
        if os.fork() == 0:
            server.close()
            child(conn, fds, json.loads(msg))
        conn.close()
        for fd in fds:
            os.close(fd)


if sys.argv[1] == "--serve":
    sys.path[0] = os.getcwd()
    serve(sys.argv[2])
else:
    spec = os.environ.get("FAULT_SPEC")
    run_script(sys.argv[1:], json.loads(spec) if spec else None)
'''

# The fork server's client, used as make's $(PY): `python client.py SOCKET SCRIPT ARGS...` runs
# SCRIPT in a forked child that writes to this process's stdout/stderr, forwards Ctrl-C/SIGTERM
# to it, exits with its status, and takes it along when killed (the child is "tied").
CLIENT = r'''
import json, os, signal, socket, sys

conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(sys.argv[1])
req = {"argv": sys.argv[2:], "cwd": os.getcwd(), "env": dict(os.environ), "tie": True}
socket.send_fds(conn, [json.dumps(req).encode()], [1, 2])
answers = conn.makefile("r")
pid = int(answers.readline().split()[1])
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda n, _: os.kill(pid, n))
last = answers.readline()
sys.exit(int(last.split()[1]) if last.startswith("rc ") else 137)
'''

# ---- file checks -----------------------------------------------------------------------------------


def is_temp(name: str) -> bool:
    """Temporary names used by cxrlt.core.fileio.atomic_path and the cache's done mask."""
    return name.startswith(".") and ".tmp" in name


def in_temp(rel: Path) -> bool:
    """A file with a temp name, or inside a temp-named or *.partial folder (not a final path)."""
    return any(is_temp(x) or x.endswith(".partial") for x in rel.parts)


def check_complete(path: Path, rows: dict) -> None:
    """Raise if the file at a final path is not complete. rows: file name -> expected data rows."""
    ext = path.suffix
    if ext == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        if path.name in rows:
            assert len(df) == rows[path.name], f"{len(df)} rows, expected {rows[path.name]}"
    elif ext == ".npy":
        np.load(path, mmap_mode="r")
    elif ext == ".pt":
        torch.load(path, map_location="cpu", weights_only=True)
    elif ext == ".json":
        json.loads(path.read_text())
    elif ext == ".jsonl":
        text = path.read_text()
        for line in text.splitlines(keepends=True):
            if line.endswith("\n"):  # a line being appended may be caught half-way
                json.loads(line)
    elif ext == ".yaml":
        assert isinstance(yaml.safe_load(path.read_text()), dict)
    elif ext == ".zip":
        with zipfile.ZipFile(path) as z:
            assert z.testzip() is None
    elif ext == ".txt":
        text = path.read_text()
        assert text.endswith("\n") or (path.name == "labels.txt" and text == "")  # a test cache has no labels


def scan(dirs, rows: dict, problems: list) -> None:
    """Check every final-path file under `dirs` once; append (path, error) to `problems`."""
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for p in d.rglob("*"):
            if not p.is_file() or in_temp(p.relative_to(d)):
                continue
            try:
                check_complete(p, rows)
            except FileNotFoundError:
                pass  # replaced or removed between listing and reading
            except Exception as e:  # noqa: BLE001 - any failure to read is the finding
                problems.append((str(p), f"{type(e).__name__}: {e}"))


class Watcher:
    """Scans `dirs` in a loop on a thread while a stage runs (see the module docstring)."""

    def __init__(self, dirs, rows=None):
        self.dirs, self.rows, self.problems = list(dirs), dict(rows or {}), []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            scan(self.dirs, self.rows, self.problems)
            time.sleep(0.05)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        scan(self.dirs, self.rows, self.problems)  # and once more, in the final state
        return self.problems


# ---- running stages ---------------------------------------------------------------------------------


class ForkedProc:
    """A stage process forked by the fork server, with the parts of Popen the tests use."""

    def __init__(self, pid: int, paths: dict):
        self.pid, self.paths, self.returncode = pid, paths, None

    def poll(self):
        if self.returncode is None and Path(self.paths["rc"]).exists() and not _alive(self.pid):
            self.returncode = int(Path(self.paths["rc"]).read_text())
        return self.returncode

    def communicate(self, timeout=300):
        """Wait for the end (a killed process ends without a status file: returncode -1)."""
        deadline = time.time() + timeout
        while self.poll() is None:
            if not _alive(self.pid) and not Path(self.paths["rc"]).exists():
                self.returncode = -1
                break
            if time.time() > deadline:
                os.killpg(self.pid, signal.SIGKILL)
                raise AssertionError(f"pid {self.pid} did not finish in {timeout} s")
            time.sleep(0.02)
        return Path(self.paths["stdout"]).read_text(), Path(self.paths["stderr"]).read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ForkServer:
    """`shim.py --serve SOCKET` (see SHIM): forks pre-imported stage processes on request."""

    def __init__(self, shim: Path, tmp: Path):
        self.tmp, self.n, self.pids = tmp, 0, []
        self.sock_dir = tempfile.mkdtemp(prefix="fork")  # short: a socket path has ~100 bytes at most
        self.sock = os.path.join(self.sock_dir, "s")
        self.p = subprocess.Popen([sys.executable, str(shim), "--serve", self.sock], cwd=ROOT,
                                  env=dict(os.environ, **ENV), stdout=subprocess.PIPE, text=True,
                                  start_new_session=True)
        assert self.p.stdout.readline().strip() == "ready", "fork server did not start"

    def spawn(self, argv: list, spec: dict | None) -> ForkedProc:
        self.n += 1
        paths = {k: str(self.tmp / f"proc{self.n}.{k}") for k in ("stdout", "stderr", "rc")}
        req = {"argv": argv, "cwd": str(ROOT), "env": dict(os.environ, **ENV), "spec": spec, "rc": paths["rc"]}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn, \
                open(paths["stdout"], "w") as out, open(paths["stderr"], "w") as err:
            conn.connect(self.sock)
            socket.send_fds(conn, [json.dumps(req).encode()], [out.fileno(), err.fileno()])
            pid = int(conn.makefile("r").readline().split()[1])
        self.pids.append(pid)
        return ForkedProc(pid, paths)

    def client_command(self, client: Path) -> str:
        """make's $(PY): every stage through the client (see CLIENT)."""
        return f"{sys.executable} {client} {self.sock}"

    def close(self):
        for pid in self.pids:  # a child left paused by a failed test (each is its own session)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        self.p.terminate()
        self.p.wait(timeout=30)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


class Stage:
    """One stage command, run plainly or with one injected fault, its outputs watched.

    `args` is the script and its arguments, run by the fork server `server`; with server None it
    is a whole command line (make), run as a new process group with the fault in FAULT_SPEC."""

    def __init__(self, server, tmp: Path, args: list, watch: list, rows: dict | None = None):
        self.server, self.tmp, self.args, self.watch, self.rows = server, tmp, [str(a) for a in args], watch, rows

    def start(self, spec: dict | None = None, extra=()):
        marker = self.tmp / f"marker-{time.monotonic_ns()}" if spec else None
        spec = {**spec, "marker": str(marker)} if spec else None
        if self.server is not None:
            return self.server.spawn([*self.args, *map(str, extra)], spec), marker
        env = make_env()
        if spec:
            env["FAULT_SPEC"] = json.dumps(spec)
        p = subprocess.Popen([*self.args, *map(str, extra)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # own process group
        return p, marker

    def run(self, extra=(), timeout=300) -> subprocess.CompletedProcess:
        """Run to the end (no fault), watched; assert success and no half-written final file."""
        w = Watcher(self.watch, self.rows)
        p, _ = self.start(extra=extra)
        out, err = p.communicate(timeout=timeout)
        problems = w.stop()
        assert p.returncode == 0, f"{self.args[:2]} failed ({p.returncode}):\n{out[-2000:]}\n{err[-3000:]}"
        assert not problems, problems
        return subprocess.CompletedProcess(self.args, p.returncode, out, err)

    def interrupt(self, spec: dict, sig=signal.SIGKILL, extra=(), timeout=300) -> subprocess.CompletedProcess:
        """Run until the injected pause, check the outputs, send `sig` to the process group."""
        w = Watcher(self.watch, self.rows)
        p, marker = self.start(spec, extra)
        wait_for_marker(p, marker, timeout)
        time.sleep(0.1)  # let the watcher look at the paused state too
        os.killpg(p.pid, sig)
        out, err = p.communicate(timeout=60)
        wait_gone(int(marker.read_text()))  # the paused process itself (make's child for a make)
        problems = w.stop()
        assert not problems, problems
        return subprocess.CompletedProcess(self.args, p.returncode, out, err)


def wait_for_marker(p, marker: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        if p.poll() is not None:
            out, err = p.communicate()
            raise AssertionError(f"process ended ({p.returncode}) before reaching the fault point:\n"
                                 f"{out[-2000:]}\n{err[-3000:]}")
        if time.time() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError("fault point not reached in time")
        time.sleep(0.02)


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while _alive(pid):
        assert time.time() < deadline, f"pid {pid} still alive after the kill"
        time.sleep(0.02)


def make_env() -> dict:
    """This environment without an outer make's flags (when the tests run under `make test`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    return dict(env, **ENV)


def temp_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file() and in_temp(p.relative_to(d)))


def final_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file() and not in_temp(p.relative_to(d)))


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def same_weights(a: Path, b: Path) -> None:
    ca = torch.load(a, map_location="cpu", weights_only=True)
    cb = torch.load(b, map_location="cpu", weights_only=True)
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), f"{a} vs {b}: tensor {k} differs"
    assert ca["best_map"] == cb["best_map"] and ca["labels"] == cb["labels"]


class one_thread:
    """torch on one thread inside this process (the subprocesses get OMP_NUM_THREADS=1)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def run_script_inprocess(script: str, *args) -> None:
    """Run a top-level script in this process (no interpreter start-up), expecting status 0."""
    old = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        with one_thread(), pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = old
    assert e.value.code in (0, None)


