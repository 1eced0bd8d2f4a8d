"""The one way the project fingerprints things: values, texts and file contents.

Every key the pipeline compares (a run's train key, a cache's key, a stage's recorded inputs,
Make's stamps, a test list's cache name) is made here, so two parts can never disagree on how
the same thing is hashed:

    json_key(obj)   16 hex digits of a JSON-serialisable value (dict order does not matter)
    text_key(text)  16 hex digits of a string
    bytes_key(data) / file_digest(path)   16 hex digits of bytes in memory / of a file read now
    file_key(path)  16 hex digits of a file's CONTENT (never its path or time), cached in a
                    sidecar `.<name>.sha256` beside the file and trusted while the file's size and
                    mtime_ns are unchanged: a multi-GB checkpoint or a 50 MB CSV is read once, and
                    once more after a touch or a copy that changes its time.

No torch, no pandas: Make's plan imports this on every make.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cxrlt.core.errors import InputError
from cxrlt.core.fileio import write_text

KEY_HEX = 16  # hex digits kept: collisions are not a concern at this scale
_CHUNK = 1 << 22


def text_key(text: str, n: int = KEY_HEX) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def json_key(obj, n: int = KEY_HEX) -> str:
    """Fingerprint of a JSON-serialisable value (dict key order does not matter)."""
    return text_key(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str), n)


def bytes_key(data) -> str:
    """Fingerprint of bytes already in memory (an image file read for decoding)."""
    return hashlib.sha256(data).hexdigest()[:KEY_HEX]


def file_digest(path) -> str:
    """A file's content key read now, streamed, with no sidecar (equals bytes_key of its bytes):
    for files in folders that are the user's (image folders, often read-only)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()[:KEY_HEX]


def file_key(path) -> str:
    """Content fingerprint of a file, cached beside it while its size and mtime stay the same."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    side = path.with_name(f".{path.name}.sha256")
    stamp = f"{st.st_size} {st.st_mtime_ns}"
    try:
        cached_stamp, digest = side.read_text(encoding="utf-8").rsplit(" ", 1)
        if cached_stamp == stamp and len(digest) == KEY_HEX:
            return digest
    except (OSError, ValueError):
        pass
    digest = file_digest(path)
    try:  # a cache, not a result: a read-only folder just means hashing again next time
        write_text(side, f"{stamp} {digest}")
    except OSError:
        pass
    return digest
