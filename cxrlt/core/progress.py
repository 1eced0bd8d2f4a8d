"""Progress bars that read well in a log file: every bar of the project comes from bar().

On a terminal it is a tqdm bar (cleared when done). When stderr is not a terminal (make's output
piped to a file, a SLURM log) no carriage returns are written: a plain line
`desc: 120/300 img (40%), 12.3 img/s, 10 s, loss=0.41` at most every PROGRESS_EVERY seconds
(env CXRLT_PROGRESS_EVERY, default 30) and a last one when the bar closes after having printed one, so
a short step writes nothing and a bar left unfinished (an early stop) never shows as stuck.

    for x in bar(loader, desc="predict", unit="batch"): ...
    b = bar(total=n, desc="epoch 1/3"); b.update(1); b.set_postfix(loss="0.41"); b.close()
"""

from __future__ import annotations

import os
import sys
import time

PROGRESS_EVERY = 30.0


def plain_output(stream=None) -> bool:
    """True when the bars should be plain lines: the stream (stderr) is not a terminal."""
    stream = stream or sys.stderr
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


class PlainBar:
    """The part of tqdm's interface the project uses, as periodic plain lines."""

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it", disable: bool = False,
                 every: float | None = None, stream=None, clock=time.monotonic):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix = total, 0, ""
        self.every = float(os.environ.get("CXRLT_PROGRESS_EVERY", PROGRESS_EVERY)) if every is None else every
        self.stream, self.clock = stream or sys.stderr, clock
        self.t0 = self.last = clock()
        self.printed, self.closed = False, False

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return self.total or 0

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def line(self) -> str:
        dt = max(self.clock() - self.t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return (f"{self.desc}: {self.n}{of} {self.unit}{pct}, {self.n / dt:.1f} {self.unit}/s, {dt:.0f} s"
                + (f", {self.postfix}" if self.postfix else ""))

    def _say(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.printed = True

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and self.clock() - self.last >= self.every:
            self.last = self.clock()
            self._say()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.printed:
            self._say()


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", disable: bool = False, **tqdm_kw):
    """A tqdm bar on a terminal, a PlainBar otherwise (module doc). tqdm_kw go to tqdm only."""
    if plain_output():
        return PlainBar(iterable, total=total, desc=desc, unit=unit, disable=disable)
    from tqdm import tqdm

    tqdm_kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, **tqdm_kw)
