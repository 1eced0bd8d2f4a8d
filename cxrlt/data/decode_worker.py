"""The decode worker: one image file -> one row of a cache's images.npy.

This module is what a decode worker process imports, so it imports only numpy, OpenCV and
cxrlt.data.imaging: a worker is up in a fraction of a second (pandas alone takes longer).

A worker process is started by the builder (cxrlt.data.cache_build) as

    python -c "<put the package on sys.path>; from cxrlt.data.decode_worker import serve; serve()" PARAMS_JSON

with PARAMS_JSON = {"images": path of images.npy, "size": S, "low": pct, "high": pct}. It opens
images.npy as a shared writable memmap and then serves tasks over its stdin/stdout, one JSON
line each (paths may hold any character, JSON keeps each message on one line):

    stdin   [row, path]                 decode `path` into images[row]
    stdout  [row, null | reason, key]   after the row is written (null) or could not be (reason);
                                        key: the file's content key (cxrlt/core/hashing.py), 16 hex
                                        digits, from the bytes it decoded ("" when unreadable)

It exits at end of stdin. The builder starts it in a session of its own, so a Ctrl-C in the
terminal reaches only the builder, which then stops its workers (keeping the rows they reported).
"""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np

from cxrlt.core.hashing import bytes_key
from cxrlt.data.imaging import ImageReadError, load_for_cache, read_file

WINDOW_STRIDE = 4  # the 16-bit window's subsample stride (cxrlt.data.imaging.window_limits)


def quiet_opencv() -> None:
    """One image per process: OpenCV's own threads would only oversubscribe the cores."""
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # failures are reported per image


def decode_into(images: np.ndarray, row: int, path: str, size: int, low: float,
                high: float) -> tuple[str | None, str]:
    """Decode `path` into images[row] -> (None, or the reason the file cannot be used; the
    content key of the bytes read, "" when none could be)."""
    key = ""
    try:
        data = read_file(path)
        key = bytes_key(data)
        images[row] = load_for_cache(path, size, low, high, WINDOW_STRIDE, data=data)
        return None, key
    except ImageReadError as e:
        return e.reason, key
    except Exception as e:  # noqa: BLE001 - any decoder failure is reported per image
        return f"{type(e).__name__}: {e}".strip(), key


def serve() -> None:
    """The worker process's main loop (see the module docstring)."""
    params = json.loads(sys.argv[1])
    quiet_opencv()
    images = np.load(params["images"], mmap_mode="r+")
    out = sys.stdout
    for line in sys.stdin:
        row, path = json.loads(line)
        reason, key = decode_into(images, row, path, params["size"], params["low"], params["high"])
        out.write(json.dumps([row, reason, key]) + "\n")
        out.flush()
