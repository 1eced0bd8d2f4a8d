"""Labels drawn per study (every image of a study shares them): the long-tail profile,
co-occurrences, findings that persist across a patient's studies, the exclusive Normal label,
the minimum positives per label and split, and distractor findings."""

from __future__ import annotations

import graphlib
import re

import numpy as np

from cxrlt.core.errors import InputError
from cxrlt.core.labels import CXRLT2026_APPROX_COUNTS, CXRLT2026_TOTAL_IMAGES
from cxrlt.synth.cohort import Study

MIN_POS_TRAIN = 5  # positive FRONTAL images per label among the kept training images
MIN_POS_TEST = 2  # positive images per label in the test list
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

# Persistence: a finding of a patient's previous study is a parent of the same finding in the
# next one, with this weight (chronic findings and anatomical variants persist; acute ones
# less). This is what makes the labels of a test patient's training studies informative.
PERSISTENCE = {
    "azygos lobe": 0.95, "sternotomy": 0.9, "Kyphosis": 0.8, "aortic elongation": 0.75,
    "aortic atheromatosis": 0.75, "vertebral degenerative changes": 0.75,
    "calcified densities": 0.7, "Emphysema": 0.7, "hyperinflated lung": 0.6,
    "cardiomegaly": 0.6, "pleural thickening": 0.6, "bronchiectasis": 0.6,
    "interstitial pattern": 0.55, "Hernia": 0.55, "hemidiaphragm elevation": 0.55,
    "Nodule": 0.5, "Mass": 0.5, "Support Devices": 0.45, "central venous catheter": 0.35,
    "fracture": 0.35,
}
P_PERSIST_OTHER = 0.25  # findings not listed above (and those of other label sets)


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
    """Noisy-OR network over studies, in rounds of study rank (a patient's first studies, then
    their second ones, ...): within a study parents come first, and each finding of the
    patient's previous study is a parent of itself (PERSISTENCE). Each child's base rate is
    solved per round so its overall rate stays on target; Normal then goes to part of the
    finding-free studies."""
    frac = label_fractions(labels)
    findings = [lab for lab in labels if not is_normal_label(lab)]
    rules = {c: [(p, w) for p, w in ps if p in findings] for c, ps in CORRELATIONS.items()
             if c in findings}
    order = list(graphlib.TopologicalSorter(
        {lab: [p for p, _ in rules.get(lab, [])] for lab in findings}).static_order())
    prev: dict[int, Study] = {}  # patient index -> its latest study labelled so far
    for rank in range(max((s.rank for s in studies), default=-1) + 1):
        group = [s for s in studies if s.rank == rank]
        before = [prev.get(s.patient.index) for s in group]
        n = len(group)
        pos = {}
        for lab in order:
            keep = np.ones(n)  # prod(1 - w) over positive parents
            for parent, w in rules.get(lab, []):
                keep *= np.where(pos[parent], 1.0 - w, 1.0)
            had = np.array([b is not None and lab in b.labels for b in before], bool)
            keep *= np.where(had, 1.0 - PERSISTENCE.get(lab, P_PERSIST_OTHER), 1.0)
            base = float(np.clip(1.0 - (n - frac[lab] * n) / keep.sum(), 0.0, 1.0))
            pos[lab] = rng.random(n) < 1.0 - (1.0 - base) * keep
        for i, st in enumerate(group):
            st.labels = {lab for lab in findings if pos[lab][i]}
            prev[st.patient.index] = st
        _add_normal(rng, group, labels, frac)


def _add_normal(rng, group: list[Study], labels: list[str], frac: dict) -> None:
    normals = [lab for lab in labels if is_normal_label(lab)]
    empty = [st for st in group if not st.labels]
    if normals and empty:
        p_norm = min(1.0, frac[normals[0]] * len(group) / len(empty))
        for st in empty:
            if rng.random() < p_norm:
                st.labels = {normals[0]}


def _counted_images(st: Study) -> int:
    """Images of a study that count towards the minimums: kept frontal training images (the
    test-like validation subset is frontal) / test images (one frontal per test study)."""
    return 0 if st.removed else sum(im.frontal for im in st.images)


def enforce_minimums(rng, studies: list[Study], labels: list[str]) -> None:
    """Give each label MIN_POS_TRAIN / MIN_POS_TEST counted positive images per split by adding
    it to random studies: studies with findings first, then unlabelled ones, Normal ones last."""
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
