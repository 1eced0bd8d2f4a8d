"""Writing the dataset's files (layouts: see the package docstring) and swapping the finished
folder into place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..labels import ID_COLUMNS
from .cohort import Study

TEST_LIST_NAME = "CXRLT_2026_TEST_ALL_TASK1.csv"
MARKER_NAME = "dataset.json"
FORMAT_VERSION = 1


def _rows(studies, with_labels: list[str] | None, empty_cols: int = 0) -> list[tuple]:
    """(ImageID, line) for every image of `studies`, sorted by ImageID."""
    out = []
    for st in studies:
        tail = ""
        if with_labels is not None:
            tail = "," + ",".join("1" if lab in st.labels else "0" for lab in with_labels)
        tail += "," * empty_cols
        for iid in st.image_ids:
            out.append((iid, f"{iid},{st.date},{st.patient_id}{tail}"))
    return sorted(out)


def write_csvs(root: Path, studies: list[Study], labels: list[str]) -> None:
    train = [st for st in studies if st.split == "train"]
    test = [st for st in studies if st.split == "test"]
    removal = test + [st for st in train if st.removed]
    ids = ",".join(ID_COLUMNS)
    lab_header = ids + "," + ",".join(labels)

    def write(name, header, rows, final_newline=True):
        text = "\n".join([header] + [line for _, line in rows]) + ("\n" if final_newline else "")
        (root / name).write_bytes(text.encode("utf-8"))

    write("train.csv", lab_header, _rows(train, labels))
    write(TEST_LIST_NAME, ids + "," * len(labels), _rows(test, None, len(labels)), False)
    write("Removal.csv", ids, _rows(removal, None), False)
    write("test_labels.csv", lab_header, _rows(test, labels))


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


def summary_of(studies, labels, jobs, seed, min_side, max_side) -> dict:
    def counts(sel):
        return {lab: sum(len(st.image_ids) for st in sel if lab in st.labels) for lab in labels}

    train = [st for st in studies if st.split == "train"]
    test = [st for st in studies if st.split == "test"]
    kept = [st for st in train if not st.removed]
    return dict(
        generator="cxrlt.synth", format_version=FORMAT_VERSION, seed=seed,
        min_side=min_side, max_side=max_side, labels=labels,
        n_train=sum(len(s.image_ids) for s in train), n_test=sum(len(s.image_ids) for s in test),
        n_removal_extra=sum(len(s.image_ids) for s in train if s.removed),
        n_studies=len(studies), n_patients=len({s.patient for s in studies}),
        n_patient_ids=len({s.patient_id for s in studies}),
        n_unlabelled_images=sum(len(s.image_ids) for s in studies if not s.labels),
        positives_train_kept=counts(kept), positives_test=counts(test),
        positives_train_all=counts(train),
        inverted=sorted(j["image_id"] for j in jobs if j["inverted"]),
    )
