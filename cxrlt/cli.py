"""Entry-point wrapper shared by the top-level scripts.

Turns InputError into a one-line `error: ...` on stderr with exit status 2, and Ctrl-C into
a one-line message saying how to continue (every long stage is resumable) with status 130.
"""

from __future__ import annotations

import sys

from .errors import InputError


def main_wrapper(main, resume_hint: str | None = None) -> None:
    try:
        rc = main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        hint = resume_hint or "re-run the same command to continue where it stopped"
        print(f"\ninterrupted: {hint}", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)
