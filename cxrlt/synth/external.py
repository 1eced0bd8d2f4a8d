"""Synthetic NIH-, CheXpert- and MIMIC-shaped datasets for the pretraining demo.

`python -m cxrlt.synth.external --kind nih|chexpert|mimic --out DIR [--n 600] [--seed 101]` renders a
fresh synthetic cohort with the PadChest demo generator (cxrlt.synth.dataset.generate, another seed:
other patients and images, the same finding patterns) and writes it in the dataset's native layout
(cxrlt/data/external.py reads it): its label names (a PadChest finding that means the same thing
becomes the dataset's label; the others are not annotated by that dataset), its label values, its
CSVs (CheXpert: 1.0 / 0.0 / -1.0 / blank; MIMIC: .csv.gz per study), folders and file types (NIH:
8-bit PNG; CheXpert and MIMIC: JPG). A few positives are written as uncertain (-1) and a few negatives
as blank, as the CheXpert labeller does, so the policies matter.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from cxrlt.core.errors import InputError
from cxrlt.data import external
from cxrlt.data.imaging import apply_window, read_image, window_limits
from cxrlt.data.tables import read_training_csv
from cxrlt.synth.dataset import generate

# PadChest demo label -> the dataset's label of the same finding (only labels that mean the same thing)
LABEL_MAPS = {
    "nih": {"cardiomegaly": "Cardiomegaly", "pleural effusion": "Effusion", "Nodule": "Nodule", "Mass": "Mass",
            "atelectasis": "Atelectasis", "Pneumothorax": "Pneumothorax", "Emphysema": "Emphysema",
            "Hernia": "Hernia", "pleural thickening": "Pleural_Thickening", "Normal": "No Finding"},
    "chexpert": {"cardiomegaly": "Cardiomegaly", "pleural effusion": "Pleural Effusion", "atelectasis": "Atelectasis",
                 "Pneumothorax": "Pneumothorax", "Support Devices": "Support Devices", "fracture": "Fracture",
                 "Nodule": "Lung Lesion", "Mass": "Lung Lesion", "alveolar pattern": "Consolidation",
                 "Normal": "No Finding"},
}
LABEL_MAPS["mimic"] = dict(LABEL_MAPS["chexpert"])
UNCERTAIN_FRACTION = 0.15  # positives written as -1 (CheXpert / MIMIC)
BLANK_FRACTION = 0.5  # negatives written blank (CheXpert / MIMIC)


def _to_8bit(path: Path) -> np.ndarray:
    img = read_image(path)
    if img.dtype != np.uint8:
        lo, hi = window_limits(img)
        img = apply_window(img, lo, hi)
    return img


def write_external(out_dir, kind: str, n: int = 600, seed: int = 101, min_side: int = 96, max_side: int = 160,
                   workers: int | None = None) -> dict:
    """Write a synthetic `kind` dataset (nih | chexpert | mimic) in its native layout to out_dir."""
    if kind not in LABEL_MAPS:
        raise InputError(f"--kind {kind!r}: expected one of {', '.join(LABEL_MAPS)}")
    out = Path(out_dir)
    marker = out / ".cxrlt_synth_external"
    if marker.is_file() and marker.read_text().strip() == f"{kind} {n} {seed}":
        return {"skipped": True, "out": str(out)}
    rng = np.random.default_rng([seed, 7])
    labels = {"nih": external.NIH_LABELS, "chexpert": external.CHEXPERT_LABELS, "mimic": external.MIMIC_LABELS}[kind]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.src-", dir=out.parent))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        generate(work / "src", n_train=n, n_test=10, seed=seed, min_side=min_side, max_side=max_side,
                 workers=workers, progress=False, nih=(0, 0))  # the images only: one flat folder
        df, src_labels = read_training_csv(work / "src" / "train.csv")
        mapping = LABEL_MAPS[kind]
        y = np.zeros((len(df), len(labels)), dtype=np.int8)
        for src, dst in mapping.items():
            if src in src_labels:
                y[:, labels.index(dst)] |= df[src].to_numpy(dtype=np.int8)
        nf = labels.index("No Finding")
        others = [j for j in range(len(labels)) if j != nf]
        y[:, nf] = (y[:, others].sum(1) == 0).astype(np.int8)  # No Finding: no mapped finding
        patients = {p: k for k, p in enumerate(dict.fromkeys(df["PatientID"]))}
        src_images = work / "src" / "images"
        writer = {"nih": _write_nih, "chexpert": _write_chexpert, "mimic": _write_mimic}[kind]
        writer(tmp, df, y, labels, patients, src_images, rng)
        marker_tmp = tmp / ".cxrlt_synth_external"
        marker_tmp.write_text(f"{kind} {n} {seed}\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"skipped": False, "out": str(out), "images": int(len(df)),
            "positives": {lab: int(y[:, j].sum()) for j, lab in enumerate(labels)}}


def _cells(rng, y: np.ndarray) -> np.ndarray:
    """0/1 -> CheXpert-style cells: 1.0, 0.0, -1.0 (some positives), blank (some negatives)."""
    cells = np.where(y > 0, "1.0", "0.0").astype(object)
    cells[(y > 0) & (rng.random(y.shape) < UNCERTAIN_FRACTION)] = "-1.0"
    cells[(y == 0) & (rng.random(y.shape) < BLANK_FRACTION)] = ""
    return cells


def _write_nih(root: Path, df, y, labels, patients, src_images: Path, rng) -> None:
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
             "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"]
    follow: dict[int, int] = {}
    test = []
    for i, (iid, pid) in enumerate(zip(df["ImageID"], df["PatientID"])):
        p = patients[pid] + 1
        f = follow.get(p, 0)
        follow[p] = f + 1
        name = f"{p:08d}_{f:03d}.png"
        img = _to_8bit(src_images / iid)
        folder = root / f"images_{i % 3 + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name), img)
        names = [labels[j] for j in np.flatnonzero(y[i])]
        view = "AP" if rng.random() < 0.3 else "PA"
        lines.append(f"{name},{'|'.join(names)},{f},{p},50,M,{view},{img.shape[1]},{img.shape[0]},0.143,0.143")
        if p % 5 == 0:
            test.append(name)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "test_list.txt").write_text("".join(f"{t}\n" for t in test), encoding="utf-8")
    kept = set(test)
    (root / "train_val_list.txt").write_text(
        "".join(f"{line.split(',')[0]}\n" for line in lines[1:] if line.split(",")[0] not in kept), encoding="utf-8")


def _write_chexpert(root: Path, df, y, labels, patients, src_images: Path, rng) -> None:
    base = root.name if root.name.startswith("CheXpert") else "CheXpert-v1.0-small"
    head = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(labels)
    rows = {"train": [head], "valid": [head]}
    study: dict[int, int] = {}
    cells = _cells(rng, y)
    for i, (iid, pid) in enumerate(zip(df["ImageID"], df["PatientID"])):
        p = patients[pid] + 1
        s = study.get(p, 0) + 1
        study[p] = s
        split = "valid" if p % 10 == 0 else "train"
        rel = f"{split}/patient{p:05d}/study{s}/view1_frontal.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), _to_8bit(src_images / iid))
        vals = cells[i] if split == "train" else np.where(y[i] > 0, "1.0", "0.0")  # valid.csv: 0/1 only
        ap = "AP" if rng.random() < 0.4 else "PA"
        rows[split].append(f"{base}/{rel},Female,60,Frontal,{ap}," + ",".join(vals))
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_mimic(root: Path, df, y, labels, patients, src_images: Path, rng) -> None:
    lab_lines = ["subject_id,study_id," + ",".join(labels)]
    meta = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns"]
    split = ["dicom_id,study_id,subject_id,split"]
    cells = _cells(rng, y)
    for i, (iid, pid) in enumerate(zip(df["ImageID"], df["PatientID"])):
        subject = 10_000_000 + patients[pid]
        study = 50_000_000 + i
        dicom = f"{rng.integers(0, 16 ** 8):08x}-{i:08d}"
        rel = Path("files") / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img = _to_8bit(src_images / iid)
        cv2.imwrite(str(root / rel), img)
        lab_lines.append(f"{subject},{study}," + ",".join(cells[i]))
        view = "AP" if rng.random() < 0.4 else "PA"
        meta.append(f"{dicom},{subject},{study},CHEST,{view},{img.shape[0]},{img.shape[1]}")
        split.append(f"{dicom},{study},{subject},{'test' if subject % 10 == 0 else 'train'}")
    for name, lines in (("chexpert", lab_lines), ("metadata", meta), ("split", split)):
        with gzip.open(root / f"{external.MIMIC_PREFIX}{name}.csv.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlt.synth.external", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", required=True, choices=sorted(LABEL_MAPS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=600, help="images")
    ap.add_argument("--seed", type=int, default=101, help="another seed than the PadChest demo's (0)")
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    s = write_external(a.out, a.kind, n=a.n, seed=a.seed, workers=a.workers)
    print(f"{a.out}: " + ("already written" if s["skipped"] else f"{s['images']} images, {a.kind} layout"))
    return 0


if __name__ == "__main__":
    from cxrlt.core.cli import main_wrapper

    main_wrapper(main)
