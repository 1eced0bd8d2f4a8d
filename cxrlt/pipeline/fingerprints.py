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

`file_key(path)` is a hash of a file's CONTENT (not its time: Make touches outputs); it and every
other hash of the project come from cxrlt/core/hashing.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cxrlt.core.fileio import write_json
from cxrlt.core.hashing import file_key, json_key  # noqa: F401 - the stages' fingerprints are these


def _sidecar(output) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.inputs.json")


def record_inputs(output, inputs: dict) -> None:
    """Remember what `output` (already written) was built from."""
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
