"""`make runs`: one table of every run folder and every submission, to compare them.

    python -m cxrlt.pipeline.runs [--runs-root runs] [--sub-dir submissions]

A run is a folder RUNS_ROOT/<dataset>_<size>/<name> holding run.json (moved-aside runs
`<name>@<tag>` included); its row shows the epochs done, the best epoch (1-based), its tag and
train key, and the val mAP of its chosen epoch on the full fold, the proxy subset and the honest
(cross-fitted) number; a cRT folder (RUN/crt/summary.json) adds a row `<name>/crt` with the head's
numbers. A submission is SUB_DIR/NAME.json (ensemble.py): the ensemble's val numbers, and its test
mAP from NAME.score.json when TEST_LABELS scored it. A number that does not exist is '-'.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _read(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _num(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def run_rows(runs_root) -> list[dict]:
    rows = []
    for rj in sorted(Path(runs_root).glob("*/*/run.json")):
        run, state = rj.parent, _read(rj) or {}
        sel = state.get("selection") or {}
        best = state.get("best_epoch")
        rows.append({"what": "run", "name": f"{run.parent.name}/{run.name}", "epochs": state.get("epochs_done"),
                     "best": None if best is None or best < 0 else best + 1, "tag": state.get("tag"),
                     "train_key": (state.get("train_key") or "")[:8] or None,
                     "full": sel.get("val_mAP"), "proxy": sel.get("val_proxy_mAP"),
                     "honest": sel.get("val_honest_mAP"), "test": None})
    for sj in sorted(Path(runs_root).glob("*/*/crt/summary.json")):
        s = _read(sj) or {}
        run = sj.parent.parent
        rows.append({"what": f"head ({s.get('method', '?')})", "name": f"{run.parent.name}/{run.name}/crt",
                     "epochs": None, "best": None, "tag": None, "train_key": None, "full": s.get("val_mAP"),
                     "proxy": s.get("val_proxy_mAP"), "honest": s.get("val_honest_mAP"), "test": None})
    rows.sort(key=lambda r: r["name"])
    return rows


def submission_rows(sub_dir) -> list[dict]:
    rows = []
    for rec_path in sorted(Path(sub_dir).glob("*.json")):
        if rec_path.name.endswith((".score.json", ".provenance.json")):
            continue
        rec = _read(rec_path)
        if not rec or "inputs_key" not in rec:
            continue
        v = rec.get("val") or {}
        score = _read(rec_path.with_suffix(".score.json")) or {}
        git = rec.get("git") or {}
        commit = (git.get("commit") or "")[:8] + ("+dirty" if git.get("dirty") else "") if git.get("commit") else None
        rows.append({"what": f"submission ({rec.get('method')}, {len(rec.get('runs', []))} run(s))",
                     "name": rec_path.stem, "epochs": None, "best": None, "tag": rec["inputs_key"][:8],
                     "train_key": commit, "full": v.get("full"), "proxy": v.get("proxy"),
                     "honest": v.get("honest"), "test": score.get("mAP")})
    return rows


def table(rows: list[dict]) -> str:
    head = ["name", "what", "epochs", "best", "tag", "train key / commit", "val full", "val proxy",
            "val honest", "test mAP"]
    cells = [[r["name"], r["what"], "-" if r["epochs"] is None else str(r["epochs"]),
              "-" if r["best"] is None else str(r["best"]), r["tag"] or "-", r["train_key"] or "-",
              _num(r["full"]), _num(r["proxy"]), _num(r["honest"]), _num(r["test"])] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--sub-dir", default="submissions")
    a = ap.parse_args(argv)
    rows = run_rows(a.runs_root) + submission_rows(a.sub_dir)
    if not rows:
        print(f"no runs under {a.runs_root}/ and no submissions in {a.sub_dir}/ yet")
        return 0
    print(table(rows))
    print("\nval: mAP of the chosen epoch / head / ensemble on the val fold (full), its test-like proxy subset and "
          "the honest (cross-fitted) number; test: the submission scored against TEST_LABELS; best epoch 1-based")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
