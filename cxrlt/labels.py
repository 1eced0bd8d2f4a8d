"""The CXR-LT 2026 label set and the ID columns shared by every CSV in the challenge.

The 30 Task-1 labels are only the default: every stage reads its label set from the data
(the columns after the ID columns of the training CSV, or an explicit labels file), so a
14-label NIH-style CSV goes through the pipeline the same way.
"""

from __future__ import annotations

# Column names are case- and space-sensitive, exactly as in the official training CSV.
ID_COLUMNS = ["ImageID", "StudyDate_DICOM", "PatientID"]

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


def read_labels_file(path: str) -> list[str]:
    """One label per line; blank lines ignored, order kept."""
    import os

    from .errors import InputError

    if not os.path.exists(path):
        raise InputError(f"{path}: labels file not found")
    with open(path, encoding="utf-8-sig") as f:
        labels = [line.strip() for line in f if line.strip()]
    if not labels:
        raise InputError(f"{path}: labels file is empty")
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise InputError(f"{path}: duplicate label(s) {sorted(dup)}")
    return labels
