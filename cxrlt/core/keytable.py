"""The "Every key" table of docs/configuration.md, generated from cxrlt/core/config.py (SCHEMA, its
section comments, CHOICES, LIST_CHOICES, RANGES and group()), so the page cannot drift from the code.

    python -m cxrlt.core.keytable            # rewrite the table in docs/configuration.md
    python -m cxrlt.core.keytable --check    # exit 1 when the page is not current (a test checks it too)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from cxrlt.core import config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
START = "## Every key\n"
END = "\n## Validation that looks like the leaderboard\n"
INTRO = """
Group: *train* keys change the trained weights (a new run), *post* keys are read after training
(cRT, predict) from the current config, *run* keys change how a stage runs, not its results.
This table is generated from `cxrlt/core/config.py` (`python -m cxrlt.core.keytable`); a test
checks that it is current.
"""
_SECTION = re.compile(r"^\s*# --- (.+?) -{3,}\s*$")
_KEY = re.compile(r'^\s*"([a-z0-9_]+)": \(')


def sections() -> list[tuple[str, list[str]]]:
    """(section title, its keys in SCHEMA order), read from the `# --- title ---` comments."""
    out: list[tuple[str, list[str]]] = []
    in_schema = False
    for line in Path(config.__file__).read_text(encoding="utf-8").splitlines():
        if line.startswith("SCHEMA"):
            in_schema = True
            continue
        if in_schema and line.startswith("}"):
            break
        if not in_schema:
            continue
        m = _SECTION.match(line)
        if m:
            out.append((m.group(1).strip(), []))
            continue
        m = _KEY.match(line)
        if m and m.group(1) in config.SCHEMA:
            out[-1][1].append(m.group(1))
    listed = [k for _, keys in out for k in keys]
    if sorted(listed) != sorted(config.SCHEMA):
        raise RuntimeError(f"keys outside a section comment: {sorted(set(config.SCHEMA) - set(listed))}")
    return out


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    return str(v)


def row(key: str) -> str:
    default, _, help_text = config.SCHEMA[key]
    text = help_text.replace("|", "\\|")
    if key in config.CHOICES:
        text += " (one of: " + ", ".join(f"`{_value(c) if not isinstance(c, str) else c}`"
                                         for c in config.CHOICES[key]) + ")"
    if key in config.LIST_CHOICES:
        text += " (comma-separated, of: " + ", ".join(f"`{c}`" for c in config.LIST_CHOICES[key]) + ")"
    if key in config.RANGES:
        text += f" (range: `{config.RANGES[key]}`)"
    return f"| `{key}` | `{_value(default)}` | {config.group(key)} | {text} |"


def markdown() -> str:
    parts = [START + INTRO]
    for title, keys in sections():
        parts.append(f"\n### {title}\n\n| key | default | group | meaning |\n|---|---|---|---|\n")
        parts.append("".join(row(k) + "\n" for k in keys))
    return "".join(parts)


def updated(doc_text: str) -> str:
    start, end = doc_text.index(START), doc_text.index(END)
    return doc_text[:start] + markdown() + doc_text[end:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that docs/configuration.md is current")
    args = ap.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    new = updated(text)
    if args.check:
        if new != text:
            print(f"{DOC}: the key table is not current: run python -m cxrlt.core.keytable", file=sys.stderr)
            return 1
        return 0
    if new != text:
        DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
