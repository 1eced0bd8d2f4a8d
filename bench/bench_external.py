#!/usr/bin/env python
"""Peak memory of reading the public datasets' label CSVs (cxrlt.data.external) at N rows.

    python bench/bench_external.py [--sizes 2000 20000] [--kind mimic|chexpert|nih]

Writes an N-image label table in the dataset's layout (MIMIC: the three .csv.gz, two images a study;
CheXpert: train.csv; NIH: the Data_Entry CSV; no image files: reading the tables is what is
measured) and reads it with external.read_dataset in a fresh process, reporting that process's
peak RSS (ru_maxrss) and the deep size of the rows it returns (the cache index, which must grow
with N: everything else must not). The CSVs are read in chunks of external.CHUNK_ROWS rows.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrlt.data import external  # noqa: E402


def write_tables(d: Path, kind: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vals = np.array(["1.0", "0.0", "-1.0", ""], dtype=object)
    if kind == "mimic":
        labs = external.MIMIC_LABELS
        studies = n // 2
        with gzip.open(d / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as f:
            f.write("subject_id,study_id," + ",".join(labs) + "\n")
            for s in range(studies):
                f.write(f"{10000000 + s // 3},{50000000 + s}," + ",".join(rng.choice(vals, len(labs))) + "\n")
        with gzip.open(d / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
            f.write("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns\n")
            for i in range(n):
                s = i // 2
                f.write(f"{i:08x}-dicom,{10000000 + s // 3},{50000000 + s},CHEST (PA AND LAT),"
                        f"{'PA' if i % 2 else 'LATERAL'},3056,2544\n")
    elif kind == "chexpert":
        labs = external.CHEXPERT_LABELS
        with open(d / "train.csv", "w") as f:
            f.write("Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(labs) + "\n")
            for i in range(n):
                f.write(f"CheXpert-v1.0-small/train/patient{i // 3:05d}/study{i % 3 + 1}/view1_frontal.jpg,Male,60,"
                        f"Frontal,AP," + ",".join(rng.choice(vals, len(labs))) + "\n")
    else:
        with open(d / "Data_Entry_2017_v2020.csv", "w") as f:
            f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
            for i in range(n):
                lab = "|".join(rng.choice(external.NIH_LABELS[:-1], 2, replace=False)) if i % 2 else "No Finding"
                f.write(f"{i // 4:08d}_{i % 4:03d}.png,{lab},{i % 4},{i // 4},50,M,PA,2500,2048,0.14,0.14\n")


CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
from cxrlt.data import external
ext = external.read_dataset({kind!r}, {d!r}, "ignore", "ignore")
print(json.dumps({{"rows": len(ext.frame), "frame_mb": ext.frame.memory_usage(deep=True).sum() / 2**20,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--kind", default="mimic", choices=list(external.DATASETS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    out = []
    for n in a.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            write_tables(Path(tmp), a.kind, n)
            r = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), kind=a.kind, d=tmp)],
                               capture_output=True, text=True, check=True, env=dict(os.environ))
            row = {"kind": a.kind, "n": n, **json.loads(r.stdout.strip().splitlines()[-1])}
            out.append(row)
            print(f"{a.kind:9s} N={n:>7d}  peak RSS {row['maxrss_mb']:7.1f} MB  rows held {row['frame_mb']:6.1f} MB")
    if len(out) >= 2:
        d_rss = out[-1]["maxrss_mb"] - out[0]["maxrss_mb"]
        d_rows = out[-1]["frame_mb"] - out[0]["frame_mb"]
        print(f"growth {out[0]['n']} -> {out[-1]['n']}: peak RSS +{d_rss:.1f} MB, of which the rows held +{d_rows:.1f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
