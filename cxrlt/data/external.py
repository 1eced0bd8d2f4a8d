"""Readers for the public chest X-ray datasets in the layout they are downloaded in.

Each reader turns a dataset folder into the rows of a train cache (cxrlt/data/cache_build.py builds
it exactly as the PadChest one: same decoding, windowing, reuse and resumability), with the
dataset's own label set and its patient, study and projection keys:

* ``nih`` (ChestX-ray14): ``Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``): ``Image Index``,
  pipe-separated ``Finding Labels`` (``No Finding`` for none), ``Follow-up #``, ``Patient ID``,
  ``View Position``; images anywhere below the folder (``images_*/images/``, 8-bit PNG). Labels: the
  14 findings then ``No Finding`` (1 only when no finding is listed). Official test split:
  ``test_list.txt``. Study: ``<patient>|<follow-up>``. ImageIDs are the images' paths below the
  folder (``images_001/images/00000001_000.png``; found by one walk).
* ``chexpert`` (full or ``-small``): ``train.csv`` and ``valid.csv`` (``Path``, ``Frontal/Lateral``,
  ``AP/PA``, 14 labels valued 1, 0, -1 = uncertain, blank = not mentioned). ``Path`` starts with the
  dataset's folder name (``CheXpert-v1.0-small/train/...``); ImageIDs are the rest of it, relative to
  the folder. Official test split: ``valid.csv``. Patient: ``patientNNNNN``; study: its ``studyN``.
* ``mimic`` (MIMIC-CXR-JPG): ``mimic-cxr-2.0.0-chexpert.csv.gz`` (labels per study: ``subject_id``,
  ``study_id``, 14 labels 1/0/-1/blank), ``mimic-cxr-2.0.0-metadata.csv.gz`` (``dicom_id``,
  ``subject_id``, ``study_id``, ``ViewPosition``), optionally ``mimic-cxr-2.0.0-split.csv.gz``
  (``dicom_id``, ``split``: train / validate / test); images at
  ``files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg`` (the ImageID). An image whose study has no label
  row is left out (counted). Official test split: ``split == test``.

Label policies (per dataset, chosen by the user): an uncertain (-1) cell becomes 1 (``ones``, the
CheXpert paper's U-Ones), 0 (``zeros``) or unannotated (``ignore``); a blank cell becomes 0 (``zeros``,
as CheXpert's labeller means it: not mentioned) or unannotated (``ignore``). An unannotated entry is
a blank cell of the cache's index.csv (NaN in Cache.targets): training masks it out. The policies
are recorded in the cache's manifest and key.

CSVs are read in chunks of CHUNK_ROWS with only the needed columns (plain or .gz), so reading
holds one chunk plus the compact per-image result (the cache index), not the raw table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxrlt.core.errors import InputError
from cxrlt.data import identity

DATASETS = ("nih", "chexpert", "mimic")
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
BLANK_POLICIES = ("zeros", "ignore")
CHUNK_ROWS = 50_000

NIH_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
              "No Finding"]
CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices"]
MIMIC_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                "Pneumothorax", "Support Devices"]
NIH_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
MIMIC_PREFIX = "mimic-cxr-2.0.0-"


@dataclass
class ExternalRows:
    """What a reader returns: one row per image, in file order.

    frame: ImageID, StudyDate_DICOM, PatientID, study, patient, projection (str), official ("train" |
    "test": the dataset's own split), then the labels (pandas Int8, <NA> = unannotated).
    csv_file / csv_row: where each row comes from (for messages).
    """

    frame: pd.DataFrame
    labels: list[str]
    csv_file: np.ndarray
    csv_row: np.ndarray
    sources: dict
    info: dict = field(default_factory=dict)


def check_policies(uncertain: str, blank: str) -> None:
    if uncertain not in UNCERTAIN_POLICIES:
        raise InputError(f"--uncertain {uncertain!r}: expected one of {', '.join(UNCERTAIN_POLICIES)}")
    if blank not in BLANK_POLICIES:
        raise InputError(f"--blank {blank!r}: expected one of {', '.join(BLANK_POLICIES)}")


def read_dataset(dataset: str, data_dir, uncertain: str = "zeros", blank: str = "zeros") -> ExternalRows:
    """The rows of `dataset` (one of DATASETS) in its native layout under `data_dir`."""
    check_policies(uncertain, blank)
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise InputError(f"{data_dir}: dataset folder not found (--data-dir)")
    if dataset == "nih":
        out = read_nih(data_dir)
    elif dataset == "chexpert":
        out = read_chexpert(data_dir, uncertain, blank)
    elif dataset == "mimic":
        out = read_mimic(data_dir, uncertain, blank)
    else:
        raise InputError(f"--dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    out.info.update(dataset=dataset, uncertain=uncertain, blank=blank)
    return out


# ---- label cells ---------------------------------------------------------------------------------------


def parse_policy_cells(cells: np.ndarray, uncertain: str, blank: str, where) -> np.ndarray:
    """String cells (1, 0, -1, blank; also 1.0 / 0.0 / -1.0) -> float32 1 / 0 / NaN (unannotated).

    where(r, c) -> "file: row R, column 'X'" for the first bad cell."""
    s = np.char.strip(cells.astype(str))
    one = (s == "1") | (s == "1.0")
    zero = (s == "0") | (s == "0.0")
    unc = (s == "-1") | (s == "-1.0")
    empty = (s == "") | (s == "nan")
    bad = ~(one | zero | unc | empty)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(f"{where(r, c)}: label value {str(s[r, c])!r} (expected 1, 0, -1 or blank)")
    y = np.zeros(s.shape, dtype=np.float32)
    y[one] = 1
    y[unc] = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[uncertain]
    y[empty] = {"zeros": 0.0, "ignore": np.nan}[blank]
    return y


def _int8_frame(y: np.ndarray, labels: list[str], index) -> pd.DataFrame:
    """float (NaN = unannotated) -> nullable Int8 columns (written as blank cells in index.csv)."""
    return pd.DataFrame({lab: pd.array(np.where(np.isnan(y[:, j]), pd.NA, y[:, j]).tolist(), dtype="Int8")
                         for j, lab in enumerate(labels)}, index=index)


def _chunks(path, usecols, what: str):
    """pandas chunks of a plain or .gz CSV, every cell a str ("" when blank); InputError when unreadable
    or a column is missing. Yields (chunk, first spreadsheet row of the chunk)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found ({what})")
    try:
        header = list(pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, EOFError, OSError) as e:
        raise InputError(f"{path}: not a readable CSV ({str(e).strip().splitlines()[-1] if str(e).strip() else e})") \
            from None
    for col in usecols:
        if col not in header:
            raise InputError(f"{path}: row 1 (header): missing column {col!r} ({what})")
    row = 2
    try:
        for chunk in pd.read_csv(path, usecols=list(usecols), dtype=str, keep_default_na=False,
                                 encoding="utf-8-sig", chunksize=CHUNK_ROWS):
            yield chunk[list(usecols)], row
            row += len(chunk)
    except (pd.errors.ParserError, ValueError, EOFError, OSError) as e:
        raise InputError(f"{path}: not a readable CSV near row {row} "
                         f"({str(e).strip().splitlines()[-1] if str(e).strip() else e})") from None


def _finish(parts: list[pd.DataFrame], labels, files, rows, sources, info) -> ExternalRows:
    if not parts or sum(len(p) for p in parts) == 0:
        raise InputError(f"{next(iter(sources.values()))}: no images listed")
    frame = pd.concat(parts, ignore_index=True)
    dup = frame["ImageID"].duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise InputError(f"{files[i]}: row {rows[i]}: image {frame['ImageID'].iloc[i]!r} is listed twice")
    return ExternalRows(frame, labels, np.asarray(files, dtype=object), np.asarray(rows, dtype=np.int64),
                        sources, info)


def _keys_frame(ids, patient, study, projection, official, date=None) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({"ImageID": ids, "StudyDate_DICOM": date if date is not None else [""] * n,
                         "PatientID": patient, "study": study, "patient": patient, "projection": projection,
                         "centre": [identity.centre(i) for i in ids], "official": official})


# ---- NIH ChestX-ray14 ------------------------------------------------------------------------------------


def read_nih(data_dir) -> ExternalRows:
    entry = next((os.path.join(data_dir, f) for f in NIH_ENTRY_FILES if os.path.isfile(os.path.join(data_dir, f))),
                 None)
    if entry is None:
        raise InputError(f"{data_dir}: no {' or '.join(NIH_ENTRY_FILES)} (the NIH ChestX-ray14 label file)")
    test_list = os.path.join(data_dir, "test_list.txt")
    test_ids = set()
    if os.path.isfile(test_list):
        with open(test_list, encoding="utf-8") as f:
            test_ids = {line.strip() for line in f if line.strip()}
    where = _image_paths(data_dir, (".png",))
    findings = {lab: j for j, lab in enumerate(NIH_LABELS)}
    nf = findings["No Finding"]
    cols = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"]
    parts, files, rows = [], [], []
    for chunk, first in _chunks(entry, cols, "NIH label file"):
        y = np.zeros((len(chunk), len(NIH_LABELS)), dtype=np.float32)
        for i, text in enumerate(chunk["Finding Labels"].tolist()):
            names = [t.strip() for t in text.split("|") if t.strip()]
            if not names:
                raise InputError(f"{entry}: row {first + i}, column 'Finding Labels': blank (expected "
                                 f"'No Finding' or findings separated by '|')")
            for name in names:
                j = findings.get(name)
                if j is None:
                    raise InputError(f"{entry}: row {first + i}, column 'Finding Labels': unknown finding {name!r} "
                                     f"(known: {', '.join(NIH_LABELS)})")
                y[i, j] = 1
            if y[i, :nf].any():
                y[i, nf] = 0  # 'No Finding' listed with a finding: the finding wins
        ids = chunk["Image Index"].str.strip().tolist()
        blank_id = [k for k, v in enumerate(ids) if not v]
        if blank_id:
            raise InputError(f"{entry}: row {first + blank_id[0]}, column 'Image Index': blank")
        official = ["test" if i in test_ids else "train" for i in ids]
        ids = [where.get(i, i) for i in ids]  # the file's path below the folder (a missing one: its name)
        patient = chunk["Patient ID"].str.strip()
        patient = patient.where(patient != "", pd.Series(ids, index=chunk.index)).tolist()
        study = [f"{p}|{f.strip()}" if f.strip() else i for p, f, i in zip(patient, chunk["Follow-up #"], ids)]
        keys = _keys_frame(ids, patient, study, [_view(v) for v in chunk["View Position"]], official)
        keys.index = chunk.index
        parts.append(pd.concat([keys, _int8_frame(y, NIH_LABELS, chunk.index)], axis=1))
        files += [entry] * len(chunk)
        rows += list(range(first, first + len(chunk)))
    return _finish(parts, list(NIH_LABELS), files, rows,
                   {"entry_csv": entry, "test_list": test_list if test_ids else None}, {})


def _image_paths(data_dir, suffixes) -> dict[str, str]:
    """File name -> its path relative to data_dir (one walk; the first in walk order if repeated)."""
    out: dict[str, str] = {}
    for root, dirs, names in os.walk(data_dir):
        dirs.sort()
        rel = os.path.relpath(root, data_dir)
        for name in sorted(names):
            if name.lower().endswith(suffixes) and name not in out:
                out[name] = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
    return out


def _view(v: str) -> str:
    """A DICOM-style view position -> the cache's projection ('' unknown; lateral views: 'L')."""
    v = str(v).strip().upper()
    if v in ("", "UNK", "UNKNOWN", "NAN"):
        return ""
    if v in ("LL", "RL", "LATERAL", "LAT", "L"):
        return "L"
    return v


# ---- CheXpert --------------------------------------------------------------------------------------------


def read_chexpert(data_dir, uncertain: str, blank: str) -> ExternalRows:
    tables = [(os.path.join(data_dir, "train.csv"), "train"), (os.path.join(data_dir, "valid.csv"), "test")]
    if not any(os.path.isfile(p) for p, _ in tables):
        raise InputError(f"{data_dir}: no train.csv or valid.csv (the CheXpert label files)")
    cols = ["Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    parts, files, rows = [], [], []
    for path, official in tables:
        if not os.path.isfile(path):
            continue
        for chunk, first in _chunks(path, cols, "CheXpert label file"):
            y = parse_policy_cells(chunk[CHEXPERT_LABELS].to_numpy(dtype=object), uncertain, blank,
                                   lambda r, c: f"{path}: row {first + r}, column {CHEXPERT_LABELS[c]!r}")
            ids, patient, study = [], [], []
            for i, p in enumerate(chunk["Path"].tolist()):
                parts_ = p.strip().replace("\\", "/").split("/")
                if parts_ and parts_[0].lower().startswith("chexpert"):
                    parts_ = parts_[1:]  # the dataset's own folder name (CheXpert-v1.0[-small]): data_dir itself
                if len(parts_) < 3:
                    raise InputError(f"{path}: row {first + i}, column 'Path': {p!r} is not "
                                     f"[CheXpert-v1.0-small/]<split>/patientNNNNN/studyN/viewN_<view>.jpg")
                rel = parts_
                ids.append("/".join(rel))
                patient.append(rel[-3])
                study.append(f"{rel[-3]}/{rel[-2]}")
            proj = ["L" if fl.strip().lower() == "lateral" else _view(ap)
                    for fl, ap in zip(chunk["Frontal/Lateral"], chunk["AP/PA"])]
            keys = _keys_frame(ids, patient, study, proj, [official] * len(ids))
            keys.index = chunk.index
            parts.append(pd.concat([keys, _int8_frame(y, CHEXPERT_LABELS, chunk.index)], axis=1))
            files += [path] * len(chunk)
            rows += list(range(first, first + len(chunk)))
    return _finish(parts, list(CHEXPERT_LABELS), files, rows,
                   {p.rsplit("/", 1)[-1]: (p if os.path.isfile(p) else None) for p, _ in tables}, {})


# ---- MIMIC-CXR-JPG ---------------------------------------------------------------------------------------


def _mimic_file(data_dir, name: str, required: bool = True):
    for cand in (f"{MIMIC_PREFIX}{name}.csv.gz", f"{MIMIC_PREFIX}{name}.csv"):
        p = os.path.join(data_dir, cand)
        if os.path.isfile(p):
            return p
    if required:
        raise InputError(f"{data_dir}: no {MIMIC_PREFIX}{name}.csv.gz (MIMIC-CXR-JPG)")
    return None


def read_mimic(data_dir, uncertain: str, blank: str) -> ExternalRows:
    labels_csv = _mimic_file(data_dir, "chexpert")
    meta_csv = _mimic_file(data_dir, "metadata")
    split_csv = _mimic_file(data_dir, "split", required=False)
    # Labels per study: (S, C) float32 plus a study -> position map (one row per study, not per image).
    study_pos: dict[str, int] = {}
    ys = []
    for chunk, first in _chunks(labels_csv, ["subject_id", "study_id", *MIMIC_LABELS], "MIMIC labels"):
        ys.append(parse_policy_cells(chunk[MIMIC_LABELS].to_numpy(dtype=object), uncertain, blank,
                                     lambda r, c: f"{labels_csv}: row {first + r}, column {MIMIC_LABELS[c]!r}"))
        for i, s in enumerate(chunk["study_id"].str.strip().tolist()):
            if s in study_pos:
                raise InputError(f"{labels_csv}: row {first + i}: study {s!r} has two label rows")
            study_pos[s] = len(study_pos)
    y_study = np.concatenate(ys) if ys else np.zeros((0, len(MIMIC_LABELS)), np.float32)
    test_ids = set()
    if split_csv is not None:
        for chunk, _ in _chunks(split_csv, ["dicom_id", "split"], "MIMIC split"):
            test_ids.update(chunk["dicom_id"][chunk["split"].str.strip() == "test"].str.strip())
    parts, files, rows, unlabelled = [], [], [], 0
    for chunk, first in _chunks(meta_csv, ["dicom_id", "subject_id", "study_id", "ViewPosition"], "MIMIC metadata"):
        dicom = chunk["dicom_id"].str.strip().to_numpy(dtype=object)
        subj = chunk["subject_id"].str.strip().to_numpy(dtype=object)
        stud = chunk["study_id"].str.strip().to_numpy(dtype=object)
        pos = np.array([study_pos.get(s, -1) for s in stud], dtype=np.int64)
        keep = pos >= 0
        unlabelled += int((~keep).sum())
        if not keep.any():
            continue
        dicom, subj, stud, pos = dicom[keep], subj[keep], stud[keep], pos[keep]
        views = chunk["ViewPosition"].to_numpy(dtype=object)[keep]
        ids = [f"files/p{s[:2]}/p{s}/s{t}/{d}.jpg" for s, t, d in zip(subj, stud, dicom)]
        idx = chunk.index[keep]
        keys = _keys_frame(ids, [f"p{s}" for s in subj], [f"s{t}" for t in stud], [_view(v) for v in views],
                           ["test" if d in test_ids else "train" for d in dicom])
        keys.index = idx
        parts.append(pd.concat([keys, _int8_frame(y_study[pos], MIMIC_LABELS, idx)], axis=1))
        files += [meta_csv] * len(ids)
        rows += (np.flatnonzero(keep) + first).tolist()
    return _finish(parts, list(MIMIC_LABELS), files, rows,
                   {"labels_csv": labels_csv, "metadata_csv": meta_csv, "split_csv": split_csv},
                   {"unlabelled_images": unlabelled})


def dataset_of_rows(cache, rows) -> np.ndarray | None:
    """The dataset of each row of a cache built from several datasets (its patient keys start with
    `<dataset>:`); None for a cache of one dataset (or PadChest's)."""
    parts = (cache.manifest or {}).get("datasets") or []
    if len(parts) < 2:
        return None
    return np.array([p.split(":", 1)[0] for p in cache.patient_keys(rows)], dtype=object)
