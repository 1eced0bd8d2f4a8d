"""Make's stamps: small JSON files whose modification time tells Make that a stage's inputs changed.

A stamp is rewritten only when its content changes (cxrlt/core/fileio.write_if_changed), so its
time moves exactly when what the stage reads moves. One exception needs care: `make -n` still
runs the plan (Make remakes its included makefiles even in a dry run), so a dry run with one
variable changed rewrites stamps that no stage then runs on. The plan is told (`--dry-run`); a
dry run records each stamp's previous content key and time in `<state>/dry-run-undo.json`, and
the next plan (dry or real) that writes a stamp back to exactly that content gives it back its
old time; a real plan then forgets the record.
So `make -n all X=1` followed by `make all` runs nothing that a plain `make all` would not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cxrlt.core.fileio import write_if_changed, write_text
from cxrlt.core.hashing import text_key

UNDO = "dry-run-undo.json"


def stamp_text(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n"


class Stamps:
    """Writes the stamps of one plan (see the module docstring)."""

    def __init__(self, state: Path, dry_run: bool = False):
        self.undo_path = Path(state) / UNDO
        self.dry_run = dry_run
        try:
            self.undo = json.loads(self.undo_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            self.undo = {}

    def write(self, path, obj) -> bool:
        """Write the stamp `path` holding obj (a dict) -> whether its content changed."""
        path = Path(path)
        text = stamp_text(obj)
        key = os.fspath(path)
        if self.dry_run and key not in self.undo:
            try:
                old = path.read_text(encoding="utf-8")
                self.undo[key] = [text_key(old), path.stat().st_mtime_ns]
            except OSError:
                self.undo[key] = [None, None]
        changed = write_if_changed(path, text)
        if key in self.undo and self.undo[key][0] == text_key(text):
            # back to what it held before the dry run, and no stage ran on the dry run's content
            old_time = self.undo.pop(key)[1]
            os.utime(path, ns=(old_time, old_time))
        return changed

    def close(self) -> None:
        """A dry run keeps the stamps it changed in the undo file; a real run forgets them (what
        it wrote now is what its stages run on)."""
        if self.dry_run and self.undo:
            write_text(self.undo_path, json.dumps(self.undo, indent=0, sort_keys=True))
        else:
            self.undo_path.unlink(missing_ok=True)
