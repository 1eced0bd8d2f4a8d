"""Entry-point wrapper and argument checks shared by the top-level scripts.

Turns InputError into a one-line `error: ...` on stderr with exit status 2, and Ctrl-C into
a one-line message saying how to continue (every long stage is resumable) with status 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrlt.core.errors import InputError


def main_wrapper(main, resume_hint: str | None = None) -> None:
    try:
        rc = main()
    except InputError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        hint = resume_hint or "re-run the same command to continue where it stopped"
        print(f"\ninterrupted: {hint}", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        from cxrlt.core.fileio import disk_full, free_space

        where = Path(e.filename).parent if e.filename else Path.cwd()
        if not disk_full(e, where):
            raise
        print(f"error: {e.filename or 'a file'}: the disk is full ({free_space(where)} free) while writing; "
              f"free some space and re-run the same command (finished work is kept)", file=sys.stderr)
        sys.exit(2)
    sys.exit(rc or 0)


def one_line(message: str) -> str:
    """The message with any line break written as \\n: a value holding a newline (an ImageID, a
    YAML scalar) must not split the one error line, and must still show where it was."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def check_output_file(path, flag: str) -> None:
    """InputError when `path` cannot become a file: it is a folder, or a parent is a file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a folder; give the path of a file (a new name or one to replace)")
    _check_parents(path, flag)


def check_output_dir(path, flag: str) -> None:
    """InputError when `path` cannot become a folder: it is a file, or a parent is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file; give a folder (it is created if missing)")
    _check_parents(path, flag)


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{flag} {path}: {parent} is a file, not a folder")
            return


def nonnegative_int(text: str) -> int:
    """argparse type of a count flag where 0 means "none" (data-loader workers: 0 = in-process)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type of a count flag (a batch size, resamples, images, workers): a whole number >= 1,
    so that 0 or -3 is a usage error naming the flag instead of a traceback from deep inside."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value
