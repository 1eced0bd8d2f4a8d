"""Writing the dataset's files (layouts: see the package docstring) and swapping the finished
folder into place."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

from cxrlt.data.tables import ID_COLUMNS
from cxrlt.synth.cohort import Study

TEST_LIST_NAME = "CXRLT_2026_TEST_ALL_TASK1.csv"
META_NAME = "padchest_metadata.csv"
BOXES_NAME = "boxes.csv"
MARKER_NAME = "dataset.json"
FORMAT_VERSION = 3  # 3: NIH-shaped images (a second centre)
META_COLUMNS = ["ImageID", "StudyID", "PatientID", "StudyDate_DICOM", "Projection",
                "ViewPosition_DICOM", "Labels", "Report"]
BOXES_COLUMNS = ["ImageID", "label", "x0", "y0", "x1", "y1"]


def _rows(studies, with_labels: list[str] | None, empty_cols: int = 0) -> list[tuple]:
    """(ImageID, line) for every image of `studies`, sorted by ImageID."""
    out = []
    for st in studies:
        tail = ""
        if with_labels is not None:
            tail = "," + ",".join("1" if lab in st.labels else "0" for lab in with_labels)
        tail += "," * empty_cols
        for iid in st.image_ids:
            out.append((iid, f"{iid},{st.date},{st.patient.csv_id}{tail}"))
    return sorted(out)


def _write(path: Path, header: str, lines: list[str], final_newline: bool = True) -> None:
    text = "\n".join([header] + lines) + ("\n" if final_newline else "")
    path.write_bytes(text.encode("utf-8"))


def write_csvs(root: Path, studies: list[Study], labels: list[str], boxes: list[tuple]) -> None:
    """Every CSV of the dataset into `root` (layouts: see the cxrlt.synth docstring)."""
    train = [st for st in studies if st.split == "train"]
    test = [st for st in studies if st.split == "test"]
    removal = test + [st for st in train if st.removed]
    ids = ",".join(ID_COLUMNS)
    lab_header = ids + "," + ",".join(labels)

    def lines(rows):
        return [line for _, line in rows]

    _write(root / "train.csv", lab_header, lines(_rows(train, labels)))
    _write(root / TEST_LIST_NAME, ids + "," * len(labels), lines(_rows(test, None, len(labels))),
           False)
    _write(root / "Removal.csv", ids, lines(_rows(removal, None)), False)
    _write(root / "test_labels.csv", lab_header, lines(_rows(test, labels)))
    _write_metadata(root / META_NAME, studies, labels)
    order = {lab: i for i, lab in enumerate(labels)}
    rows = sorted(boxes, key=lambda b: (b[0], order[b[1]]))
    _write(root / BOXES_NAME, ",".join(BOXES_COLUMNS), [",".join(map(str, b)) for b in rows])


def _write_metadata(path: Path, studies: list[Study], labels: list[str]) -> None:
    """PadChest's metadata layout for every PadChest image (exact PatientID, StudyID, projection);
    the NIH-shaped images are not PadChest's, so not in it (their centre comes from their ImageID)."""
    rows = []
    for st in studies:
        if st.patient.centre != "padchest":
            continue
        found = [lab for lab in labels if lab in st.labels]
        report = ("hallazgos: " + "; ".join(found) + ".") if found else "sin hallazgos."
        for im in st.images:
            rows.append([im.image_id, st.study_id, str(st.patient.number), st.date,
                         im.projection, im.view_position, repr(found), report])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(META_COLUMNS)
    w.writerows(sorted(rows))
    path.write_bytes(buf.getvalue().encode("utf-8"))


def load_existing(out: Path) -> dict | None:
    marker = out / MARKER_NAME
    if not marker.is_file() or not (out / "train.csv").is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def summary_of(studies, labels, jobs, boxes, seed, min_side, max_side) -> dict:
    def n_images(sel):
        return sum(len(st.images) for st in sel)

    def counts(sel):
        return {lab: sum(len(st.images) for st in sel if lab in st.labels) for lab in labels}

    train = [st for st in studies if st.split == "train"]
    test = [st for st in studies if st.split == "test"]
    kept = [st for st in train if not st.removed]
    test_patients = {st.patient.index for st in test}
    with_train = {st.patient.index for st in kept} & test_patients
    projections: dict[str, int] = {}
    for st in train:
        for im in st.images:
            projections[im.projection] = projections.get(im.projection, 0) + 1
    return dict(
        generator="cxrlt.synth", format_version=FORMAT_VERSION, seed=seed,
        min_side=min_side, max_side=max_side, labels=labels,
        n_train=n_images(train), n_test=n_images(test),
        n_lateral_train=projections.get("L", 0),
        train_projections=dict(sorted(projections.items())),
        n_removal_extra=n_images([s for s in train if s.removed]),
        n_studies=len(studies), n_patients=len({s.patient.index for s in studies}),
        n_patient_ids=len({s.patient.csv_id for s in studies}),
        n_nih_train=n_images([s for s in train if s.patient.centre == "nih"]),
        n_nih_test=n_images([s for s in test if s.patient.centre == "nih"]),
        n_test_patients=len(test_patients), n_test_patients_with_train=len(with_train),
        n_unlabelled_images=n_images([s for s in studies if not s.labels]),
        n_boxes=len(boxes),
        positives_train_kept=counts(kept), positives_test=counts(test),
        positives_train_all=counts(train),
        inverted=sorted(j["image_id"] for j in jobs if j["inverted"]),
    )
