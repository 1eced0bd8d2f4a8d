"""Labels drawn per study: the long-tail profile, co-occurrences, the exclusive Normal label,
the minimum positives per label and split, and distractor findings."""

from __future__ import annotations

import graphlib
import re

import numpy as np

from ..errors import InputError
from ..labels import CXRLT2026_APPROX_COUNTS, CXRLT2026_TOTAL_IMAGES
from .cohort import Study

MIN_POS_TRAIN = 5  # positives per label among the kept training images
MIN_POS_TEST = 2  # positives per label among the test images
NORMAL_NAMES = {"normal", "nofinding"}  # label names treated as "no finding" (exclusive)
P_DISTRACTOR_UNLABELLED = 0.7
P_DISTRACTOR_ABNORMAL = 0.25

# Co-occurrence: child -> [(parent, weight)]. P(child) = 1 - (1 - base) * prod(1 - weight of
# each positive parent) (noisy OR); `base` is solved so the child's overall rate stays on target.


CORRELATIONS = {
    "aortic elongation": [("aortic atheromatosis", 0.7), ("Kyphosis", 0.25),
                          ("vertebral degenerative changes", 0.2)],
    "vertebral degenerative changes": [("Kyphosis", 0.35)],
    "cardiomegaly": [("pleural effusion", 0.35), ("vascular hilar enlargement", 0.3),
                     ("sternotomy", 0.3)],
    "pleural effusion": [("Hydropneumothorax", 0.6)],
    "atelectasis": [("pleural effusion", 0.25)],
    "alveolar pattern": [("pleural effusion", 0.15)],
    "Support Devices": [("sternotomy", 0.85), ("central venous catheter", 0.6)],
    "central venous catheter": [("sternotomy", 0.3)],
    "hyperinflated lung": [("Emphysema", 0.35)],
    "Pneumothorax": [("Hydropneumothorax", 0.3)],
    "Subcutaneous Emphysema": [("Pneumothorax", 0.2)],
    "interstitial pattern": [("bronchiectasis", 0.2)],
}


def norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def is_normal_label(name: str) -> bool:
    """True for the exclusive 'no finding' label (`Normal`, `No Finding`)."""
    return norm_name(name) in NORMAL_NAMES


def label_fractions(labels: list[str]) -> dict[str, float]:
    """Target positive rate per label: CXR-LT 2026 profile for its labels, else a generic
    geometric long tail (15% down to 0.4%, in file order) with 30% for a Normal label."""
    if all(lab in CXRLT2026_APPROX_COUNTS for lab in labels):
        return {lab: CXRLT2026_APPROX_COUNTS[lab] / CXRLT2026_TOTAL_IMAGES for lab in labels}
    findings = [lab for lab in labels if not is_normal_label(lab)]
    k = max(1, len(findings) - 1)
    out = {lab: 0.15 * (0.004 / 0.15) ** (i / k) for i, lab in enumerate(findings)}
    out.update({lab: 0.30 for lab in labels if is_normal_label(lab)})
    return out


def sample_labels(rng, studies: list[Study], labels: list[str]) -> None:
    """Noisy-OR network over studies: parents first, each child's base rate solved so its
    overall rate stays on target; Normal then goes to part of the finding-free studies."""
    frac = label_fractions(labels)
    findings = [lab for lab in labels if not is_normal_label(lab)]
    rules = {c: [(p, w) for p, w in ps if p in findings] for c, ps in CORRELATIONS.items()
             if c in findings}
    order = list(graphlib.TopologicalSorter(
        {lab: [p for p, _ in rules.get(lab, [])] for lab in findings}).static_order())
    n = len(studies)
    pos = {lab: np.zeros(n, bool) for lab in findings}
    for lab in order:
        keep = np.ones(n)  # prod(1 - w) over positive parents
        for parent, w in rules.get(lab, []):
            keep *= np.where(pos[parent], 1.0 - w, 1.0)
        base = float(np.clip(1.0 - (n - frac[lab] * n) / keep.sum(), 0.0, 1.0))
        pos[lab] = rng.random(n) < 1.0 - (1.0 - base) * keep
    for i, st in enumerate(studies):
        st.labels = {lab for lab in findings if pos[lab][i]}
    normals = [lab for lab in labels if is_normal_label(lab)]
    empty = [st for st in studies if not st.labels]
    if normals and empty:
        p_norm = min(1.0, frac[normals[0]] * n / len(empty))
        for st in empty:
            if rng.random() < p_norm:
                st.labels = {normals[0]}


def _counted_images(st: Study) -> int:
    """Images of a study that count towards the minimums (kept train images / test images)."""
    return 0 if st.removed else len(st.image_ids)


def enforce_minimums(rng, studies: list[Study], labels: list[str]) -> None:
    """Give each label MIN_POS_TRAIN / MIN_POS_TEST positive images per split by adding it to
    random studies: studies with findings first, then unlabelled ones, Normal ones last."""
    for split, need in (("train", MIN_POS_TRAIN), ("test", MIN_POS_TEST)):
        pool = [st for st in studies if st.split == split and _counted_images(st) > 0]
        for lab in labels:
            have = sum(_counted_images(st) for st in pool if lab in st.labels)
            normal = is_normal_label(lab)
            cands = [st for st in pool if lab not in st.labels]
            if normal:  # Normal can only go to finding-free studies
                cands = [st for st in cands if not st.labels]
            tier = [0 if (st.labels and not _is_normal_study(st)) else 1 if not st.labels else 2
                    for st in cands]
            perm = rng.permutation(len(cands))
            for j in sorted(perm, key=lambda j: tier[j]):
                if have >= need:
                    break
                st = cands[j]
                if not normal and _is_normal_study(st):
                    if sum(_counted_images(s) for s in pool if _is_normal_study(s)) \
                            - _counted_images(st) < need:
                        continue  # would take Normal below its own minimum
                    st.labels = set()
                st.labels.add(lab)
                have += _counted_images(st)
            if have < need:
                raise InputError(f"--n-{split} is too small to give label '{lab}' {need} "
                                 f"positive images in {split}; use a larger --n-{split}")


def add_distractors(rng, studies: list[Study], n_kinds: int) -> None:
    """Give some studies one of `n_kinds` distractor findings (index into patterns.DISTRACTORS)."""
    for st in studies:
        p = P_DISTRACTOR_UNLABELLED if not st.labels else \
            0.0 if _is_normal_study(st) else P_DISTRACTOR_ABNORMAL
        if rng.random() < p:
            st.distractor = int(rng.integers(n_kinds))


def _is_normal_study(st: Study) -> bool:
    return any(is_normal_label(lab) for lab in st.labels)
