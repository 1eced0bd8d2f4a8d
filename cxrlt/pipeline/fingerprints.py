"""Fingerprints: what a stage output was built from, so that nothing stale is ever reused.

Make decides what to re-run from file times and from content stamps (cxrlt/pipeline/plan.py); a stage
that runs then checks, from fingerprints, whether its output already matches its inputs:

    inputs = {"model": file_key(ckpt), "cache": cache.key, "post": {...keys it reads...}}
    if inputs_match(out, inputs):       # output exists and was built from exactly these
        touch(out); return              # (Make settles: the output is now newer than its prerequisites)
    ... build out ...
    record_inputs(out, inputs)          # sidecar `.<name>.inputs.json` beside the output

Fingerprints never hold absolute paths or times, so a run folder copied to another machine (or
a shared filesystem) keeps its meaning.

`file_key(path)` is a hash of a file's CONTENT (not its time: Make touches outputs), cached in a
sidecar `.<name>.sha256` that is trusted while the file's size and mtime are unchanged, so a
multi-GB checkpoint is hashed once, and once more after a touch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cxrlt.core.errors import InputError

KEY_HEX = 16  # hex digits kept: collisions are not a concern at this scale
_CHUNK = 1 << 22


def json_key(obj) -> str:
    """Fingerprint of a JSON-serialisable value (dict key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_HEX]


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


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
    digest = file_sha256(path)[:KEY_HEX]
    try:  # a cache, not a result: a read-only folder just means hashing again next time
        from cxrlt.core.fileio import write_text

        write_text(side, f"{stamp} {digest}")
    except OSError:
        pass
    return digest


def _sidecar(output) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.inputs.json")


def record_inputs(output, inputs: dict) -> None:
    """Remember what `output` (already written) was built from."""
    from cxrlt.core.fileio import write_json

    write_json(_sidecar(output), inputs)


def recorded_inputs(output) -> dict | None:
    try:
        return json.loads(_sidecar(output).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def inputs_match(output, inputs: dict) -> bool:
    """True when `output` exists and was recorded as built from exactly `inputs`."""
    if not Path(output).exists():
        return False
    old = recorded_inputs(output)
    return old is not None and json_key(old) == json_key(json.loads(json.dumps(inputs, default=str)))


def differences(output, inputs: dict) -> list[str]:
    """The top-level input names that differ from what `output` was built from (for messages)."""
    old = recorded_inputs(output) or {}
    new = json.loads(json.dumps(inputs, default=str))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def touch(path) -> None:
    """Mark an up-to-date output as newer than its prerequisites (what Make looks at)."""
    os.utime(path, None)
