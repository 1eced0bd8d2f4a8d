"""The decode pool of the cache builder: this process plus `workers - 1` decode worker processes.

The builder (cxrlt/data/cache_build.py) gives it the rows to decode and the path of the (already
allocated) images.npy; results() yields (row, None | reason, content key) as images finish, in any order.
The workers are plain interpreters running cxrlt/data/decode_worker.py (which imports only numpy, OpenCV
and cxrlt.data.imaging, so one is up in a fraction of a second); the protocol, one JSON line per
message, is documented there. Tasks are handed out one image at a time, AHEAD per worker, and
this process decodes the next task itself between looking after the workers, so every process
stays busy until the last image whatever the images' sizes.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import numpy as np

from cxrlt.data import decode_worker
from cxrlt.core.errors import InputError

AHEAD = 3  # tasks queued per worker process: it never waits for the next one, a stop waits for few


class DecodePool:
    """This process plus `workers - 1` worker processes (cxrlt/data/decode_worker.py) decoding `tasks`.

    results() yields (row, None | reason, content key) as images finish, in any order. This process takes
    the next task itself between looking after the workers, whose pipes always hold AHEAD
    tasks, so all `workers` processes decode until the tasks run out. A worker that dies
    (killed by the OS when out of memory) stops the build with the file it was decoding.
    """

    def __init__(self, images_path: Path, pixels: dict, tasks, workers: int):
        self.params = {"images": os.fspath(images_path), "size": pixels["size"], "low": pixels["low_pct"],
                       "high": pixels["high_pct"]}
        self.tasks = tasks
        self.next = 0
        self.procs: list[subprocess.Popen] = []
        self.in_flight: dict[int, list[int]] = {}  # pid -> rows sent, not yet answered
        self.partial_line: dict[int, bytes] = {}
        n_workers = max(1, min(int(workers), len(tasks)))
        for _ in range(n_workers - 1):
            self._start_worker()

    def _start_worker(self) -> None:
        root = os.fspath(Path(__file__).resolve().parents[1])
        code = f"import sys; sys.path.insert(0, {root!r}); from cxrlt.data.decode_worker import serve; serve()"
        # its own session: a Ctrl-C in the terminal reaches only this process, which stops the workers
        p = subprocess.Popen([sys.executable, "-c", code, json.dumps(self.params)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        self.procs.append(p)
        self.in_flight[p.pid] = []
        self.partial_line[p.pid] = b""
        self._feed(p)

    def _feed(self, p: subprocess.Popen) -> None:
        queue = self.in_flight[p.pid]
        lines = []
        while len(queue) < AHEAD and self.next < len(self.tasks):
            row, path = self.tasks[self.next]
            self.next += 1
            queue.append(row)
            lines.append(json.dumps([row, path]) + "\n")
        if lines:
            try:
                p.stdin.write("".join(lines).encode())
            except BrokenPipeError:
                pass  # it died: its pipe's end of file says so in _collect

    def results(self):
        images = None
        threads = decode_worker.cv2.getNumThreads()
        try:
            while self.next < len(self.tasks) or any(self.in_flight.values()):
                yield from self._collect(timeout=0)
                if self.next < len(self.tasks):
                    if images is None:
                        decode_worker.quiet_opencv()
                        images = np.load(self.params["images"], mmap_mode="r+")
                    row, path = self.tasks[self.next]
                    self.next += 1
                    yield (row, *decode_worker.decode_into(images, row, path, self.params["size"],
                                                          self.params["low"], self.params["high"]))
                elif any(self.in_flight.values()):
                    yield from self._collect(timeout=None)
        finally:
            del images
            decode_worker.cv2.setNumThreads(threads)

    def _collect(self, timeout):
        """Answers that the workers have sent (waiting up to `timeout` s for one; None: forever)."""
        busy = {p.stdout.fileno(): p for p in self.procs if self.in_flight[p.pid]}
        if not busy:
            return
        ready, _, _ = select.select(list(busy), [], [], timeout)
        for fd in ready:
            p = busy[fd]
            data = os.read(fd, 1 << 16)
            if not data:
                self._died(p)
            *lines, self.partial_line[p.pid] = (self.partial_line[p.pid] + data).split(b"\n")
            for line in lines:
                row, reason, key = json.loads(line)
                self.in_flight[p.pid].remove(row)
                yield row, reason, key
            self._feed(p)

    def _died(self, p: subprocess.Popen) -> None:
        code = p.wait()
        row = self.in_flight[p.pid][0]
        path = next(t for r, t in self.tasks if r == row)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise InputError(f"a decode worker process {how} while decoding {path}; re-run to continue (finished "
                         f"images are kept), with fewer --workers if it ran out of memory")

    def stop(self) -> None:
        """End the workers: at once when tasks are left (their unreported rows are simply not
        marked done), else after they answered everything."""
        for p in self.procs:
            if self.next < len(self.tasks) or self.in_flight[p.pid]:
                p.kill()
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            p.wait()
            p.stdout.close()
        self.procs = []
