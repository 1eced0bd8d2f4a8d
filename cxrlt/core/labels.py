"""The CXR-LT 2026 label set, labels files, and the check against the official set.

The 30 Task-1 labels are only the default: every stage reads its label set from the data
(the columns after the ID columns of the training CSV, or an explicit labels file), so a
14-label NIH-style CSV goes through the pipeline the same way. A set that is NEARLY the
official one (an extra 0/1 column, one missing, a misspelt or padded name, another order) is
almost always a mistake that would give a submission the leaderboard cannot score: it stops
(check_label_set) unless a labels file makes it deliberate.

Labels file: UTF-8 text, one label a line, in the order wanted; blank lines ignored,
surrounding spaces stripped.
"""

from __future__ import annotations

import difflib
import os

from cxrlt.core.errors import InputError

CXRLT2026_LABELS = [
    "Normal",
    "aortic elongation",
    "cardiomegaly",
    "pleural effusion",
    "Nodule",
    "atelectasis",
    "pleural thickening",
    "aortic atheromatosis",
    "Support Devices",
    "alveolar pattern",
    "fracture",
    "Hernia",
    "Emphysema",
    "azygos lobe",
    "Hydropneumothorax",
    "Kyphosis",
    "Mass",
    "Pneumothorax",
    "Subcutaneous Emphysema",
    "pneumoperitoneo",
    "vascular hilar enlargement",
    "vertebral degenerative changes",
    "hyperinflated lung",
    "interstitial pattern",
    "central venous catheter",
    "hypoexpansion",
    "bronchiectasis",
    "hemidiaphragm elevation",
    "sternotomy",
    "calcified densities",
]

# Approximate positive counts over 160,861 PadChest images (grouping of raw PadChest terms
# into the 30 challenge labels). Used as the long-tail profile of the synthetic demo set.
CXRLT2026_APPROX_COUNTS = {
    "Normal": 50616,
    "aortic elongation": 11780,
    "cardiomegaly": 15022,
    "pleural effusion": 9931,
    "Nodule": 4072,
    "atelectasis": 8961,
    "pleural thickening": 5156,
    "aortic atheromatosis": 2546,
    "Support Devices": 14123,
    "alveolar pattern": 5738,
    "fracture": 4631,
    "Hernia": 2363,
    "Emphysema": 1538,
    "azygos lobe": 483,
    "Hydropneumothorax": 48,
    "Kyphosis": 5215,
    "Mass": 56,
    "Pneumothorax": 533,
    "Subcutaneous Emphysema": 213,
    "pneumoperitoneo": 70,
    "vascular hilar enlargement": 4517,
    "vertebral degenerative changes": 4878,
    "hyperinflated lung": 689,
    "interstitial pattern": 7799,
    "central venous catheter": 5882,
    "hypoexpansion": 1414,
    "bronchiectasis": 2698,
    "hemidiaphragm elevation": 2466,
    "sternotomy": 2849,
    "calcified densities": 1221,
}
CXRLT2026_TOTAL_IMAGES = 160861

NORMAL_LABEL = "Normal"


def read_labels_file(path) -> list[str]:
    """One label per line; blank lines ignored, order kept."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: labels file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:
            labels = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if not labels:
        raise InputError(f"{path}: labels file is empty")
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise InputError(f"{path}: duplicate label(s) {sorted(dup)}")
    return labels


def by_name(labels: list[str], official: list[str] = CXRLT2026_LABELS) -> list[str]:
    """The official order when `labels` are exactly the official labels in another order (columns
    are read by name: a table with the 30 labels in any order is read the same), else `labels`."""
    labels = list(labels)
    if len(labels) == len(official) and set(labels) == set(official):
        return list(official)
    return labels


def check_label_set(labels: list[str], where: str, official: list[str] = CXRLT2026_LABELS) -> None:
    """InputError naming the difference when `labels` is close to `official` but not equal to it.

    Close: at least half of the official names appear (compared ignoring case and surrounding
    spaces). A set far from it (NIH's 14 labels, a 3-label test set) is taken as deliberate.
    `where` starts the message (file and row). The message names every extra, missing and
    misspelt label, or for the same set in another order the first column that differs.
    """
    labels = list(labels)
    if labels == list(official):
        return
    fold = {_fold(x) for x in labels}
    if sum(_fold(x) in fold for x in official) * 2 < len(official):
        return
    fix = ("; if this label set is deliberate, pass it with --labels-file FILE (one label a line, "
           "in the order wanted)")
    if set(labels) == set(official):
        i = next(i for i, (a, b) in enumerate(zip(labels, official)) if a != b)
        raise InputError(f"{where}: the {len(official)} official CXR-LT labels in another order: label "
                         f"{i + 1} is {labels[i]!r}, the official order has {official[i]!r} there (a "
                         f"submission must use the official order){fix}")
    raise InputError(f"{where}: the labels are close to the {len(official)} official CXR-LT labels but "
                     f"differ: {_describe_difference(labels, official)}{fix}")


def _describe_difference(labels: list[str], official: list[str]) -> str:
    """'misspelt ...; extra ...; missing ...' (each part only when there is one)."""
    extra = [x for x in labels if x not in official]
    missing = [x for x in official if x not in labels]
    misspelt = []
    for x in list(extra):
        near = [m for m in missing if _fold(m) == _fold(x)] or difflib.get_close_matches(x, missing, n=1, cutoff=0.8)
        if near:
            misspelt.append(f"{x!r} (official {near[0]!r})")
            extra.remove(x)
            missing.remove(near[0])
    parts = [("misspelt", misspelt), ("extra", [repr(x) for x in extra]), ("missing", [repr(x) for x in missing])]
    return "; ".join(f"{name} {', '.join(items)}" for name, items in parts if items)


def _fold(name: str) -> str:
    return name.strip().lower()
