"""The decode worker: one image file -> one row of a cache's images.npy.

This module is what a decode worker process imports, so it imports only numpy, OpenCV and
cxrlt.imaging: a worker is up in a fraction of a second (pandas alone takes longer).

A worker process is started by the builder (cxrlt.cache_build) as

    python -c "<put the package on sys.path>; from cxrlt._decode import serve; serve()" PARAMS_JSON

with PARAMS_JSON = {"images": path of images.npy, "size": S, "low": pct, "high": pct}. It opens
images.npy as a shared writable memmap and then serves tasks over its stdin/stdout, one JSON
line each (paths may hold any character, JSON keeps each message on one line):

    stdin   [row, path]            decode `path` into images[row]
    stdout  [row, null | reason]   after the row is written (null) or could not be (reason)

It exits at end of stdin. The builder starts it in a session of its own, so a Ctrl-C in the
terminal reaches only the builder, which then stops its workers (keeping the rows they reported).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import cv2
import numpy as np

from .imaging import ImageReadError, load_for_cache

WINDOW_STRIDE = 4  # the 16-bit window's subsample stride (cxrlt.imaging.window_limits)

# libjpeg reports a damaged entropy-coded segment (e.g. a file cut short with an end marker
# appended) only as a warning on stderr ("Corrupt JPEG data: premature end of data segment",
# "... bad Huffman code", "Premature end of JPEG file"), and OpenCV then returns an image whose
# missing part is flat grey. Such an image is refused. Two "Corrupt JPEG data" warnings leave
# the pixels intact and are tolerated: junk bytes between segments and a bad ICC profile.
_JPEG_HARMLESS = ("extraneous bytes", "icc")


def quiet_opencv() -> None:
    """One image per process: OpenCV's own threads would only oversubscribe the cores."""
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # failures are reported per image


def decode_into(images: np.ndarray, row: int, path: str, size: int, low: float, high: float) -> str | None:
    """Decode `path` into images[row] -> None, or the reason the file cannot be used."""
    try:
        with _jpeg_warnings(path) as warnings:
            img = load_for_cache(path, size, low, high, WINDOW_STRIDE)
        damage = _jpeg_damage(warnings())
        if damage:
            return f"damaged JPEG data ({damage})"
        images[row] = img
        return None
    except ImageReadError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001 - any decoder failure is reported per image
        return f"{type(e).__name__}: {e}".strip()


class _jpeg_warnings:
    """Capture what the C libraries write to file descriptor 2 while a JPEG decodes.

    Only JPEG files are watched (by their magic bytes): a PNG cut short already fails to decode.
    The capture is a file, not a pipe, so a long message can never block the decoder.
    """

    _sink = None

    def __init__(self, path: str):
        self.active = _is_jpeg(path)
        self.text = ""

    def __enter__(self):
        if self.active:
            if _jpeg_warnings._sink is None:
                _jpeg_warnings._sink = tempfile.TemporaryFile()
            sink = _jpeg_warnings._sink
            sink.seek(0)
            sink.truncate()
            sys.stderr.flush()
            self.saved = os.dup(2)
            os.dup2(sink.fileno(), 2)
        return lambda: self.text

    def __exit__(self, *exc):
        if self.active:
            os.dup2(self.saved, 2)
            os.close(self.saved)
            sink = _jpeg_warnings._sink
            sink.seek(0)
            self.text = sink.read(4096).decode("utf-8", "replace")
        return False


def _is_jpeg(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(3) == b"\xff\xd8\xff"
    except OSError:
        return False  # the decoder reports it


def _jpeg_damage(text: str) -> str:
    for line in text.splitlines():
        low = line.lower()
        if ("corrupt jpeg data" in low and not any(k in low for k in _JPEG_HARMLESS)) \
                or "premature end of jpeg file" in low:
            return line.strip()
    return ""


def serve() -> None:
    """The worker process's main loop (see the module docstring)."""
    params = json.loads(sys.argv[1])
    quiet_opencv()
    images = np.load(params["images"], mmap_mode="r+")
    out = sys.stdout
    for line in sys.stdin:
        row, path = json.loads(line)
        reason = decode_into(images, row, path, params["size"], params["low"], params["high"])
        out.write(json.dumps([row, reason]) + "\n")
        out.flush()
