"""cxrlt.synth: the synthetic demo dataset, in the exact CXR-LT 2026 file layout.

    python -m cxrlt.synth --out data/demo [--n-train 1500] [--n-test 300] [--seed 0]
        [--min-side 256] [--max-side 640] [--labels-file F] [--workers N] [--force]

Files written under `<out>/` (all CSVs UTF-8, LF line endings, rows sorted by ImageID):

* `train.csv`: `ImageID,StudyDate_DICOM,PatientID,<labels...>`; one row per training image,
  label columns integer 0/1 in the official order (cxrlt.labels.CXRLT2026_LABELS unless
  `--labels-file`). Also holds the extra Removal images (see below). Ends with a newline.
* `CXRLT_2026_TEST_ALL_TASK1.csv`: the evaluation list, shaped like the real file: header
  `ImageID,StudyDate_DICOM,PatientID` followed by one EMPTY column name per label, and every
  row ends with the same number of empty fields (`...,1.90E+38,,,,`). Like the real file it
  has no newline after the last row.
* `Removal.csv`: `ImageID,StudyDate_DICOM,PatientID`: every test image plus ~3% of the
  training images (whole studies; those rows ARE in train.csv and must be dropped from
  training). No newline after the last row, like the real file.
* `test_labels.csv`: the hidden labels of the test images in train.csv's layout (same row
  order as the test list), so the demo can score itself.
* `images/<ImageID>`: 16-bit grayscale PNGs, sides in [min_side, max_side], never square.
* `dataset.json`: written last; marks the dataset complete and records the parameters and a
  summary (per-label counts, inverted ImageIDs, ...).

Column values: ImageID like the real ones, mostly `<39 digits>_<6 lowercase alnum>.png` where
the digits are a study id shared by the 1-3 images of a study, plus a few 38-digit studies,
`<45 digits>_<dd-ddd-ddd>.png` and `<39 digits>_2_<6 alnum>.png`. StudyDate_DICOM is
yyyymmdd (2009-2017), shared by the images of a study. PatientID is the Excel float form
("%.2E", e.g. `1.90E+38`) of a 128-bit number, so a few distinct patients share one string
(some collisions are made on purpose). Patients (PatientID strings) never span train/test.

Labels are drawn per study (all images of a study share them) with the long-tail profile
of CXRLT2026_APPROX_COUNTS, realistic co-occurrences (a noisy-OR network that keeps the
marginal rates), `Normal` exclusive of every finding, some studies with no label at all,
and at least MIN_POS_TRAIN / MIN_POS_TEST positive images per label in the training images
that are kept (not in Removal) / in the test list.

Images: a smooth chest-like attenuation map (body, lungs, mediastinum, heart, spine,
clavicles, ribs, diaphragm domes, gradients) rendered at low resolution, upsampled and given
full-resolution noise, then stored through a random export window (10-16 stored bits, random
offset, gamma) and 3% inverted (MONOCHROME1-like). Each finding adds its own pattern (see
PATTERNS): a shape with a label-specific place in the chest, its own form/orientation/texture
and random jitter of position, size and contrast (down to faint), large enough to survive
percentile windowing and a 64-pixel resize; in P_OCCULT of the images a labelled finding is
not drawn at all (label noise, as with report-derived labels). Most unlabelled studies and
some abnormal ones also show a finding outside the label set (DISTRACTORS); Normal studies
show no pattern at all.

Everything is seeded: the same arguments give byte-identical files whatever the number of
worker processes. The dataset is built in a temp folder beside `out` and renamed into place.

Modules: patterns (what each finding looks like), canvas (drawing primitives), anatomy (the
normal chest), render (one image from its job; the worker side), cohort (patients, studies,
IDs), labelling (labels per study), files (writing the CSVs), dataset (generate() and the CLI).
"""

from .dataset import generate, main
from .files import MARKER_NAME, TEST_LIST_NAME

__all__ = ["generate", "main", "MARKER_NAME", "TEST_LIST_NAME"]
