"""cxrlt.synth: the synthetic demo dataset, in the exact CXR-LT 2026 file layout.

    python -m cxrlt.synth --out data/demo [--n-train 1500] [--n-test 300] [--seed 0]
        [--min-side 256] [--max-side 640] [--n-nih-train N] [--n-nih-test N] [--labels-file F]
        [--workers N] [--force]

Files written under `<out>/` (all CSVs UTF-8, LF line endings, rows sorted by ImageID):

* `train.csv`: `ImageID,StudyDate_DICOM,PatientID,<labels...>`; one row per training image
  (frontal and lateral), label columns integer 0/1 in the official order
  (cxrlt.core.labels.CXRLT2026_LABELS unless `--labels-file`). Also holds the extra Removal
  images (see below). Ends with a newline.
* `CXRLT_2026_TEST_ALL_TASK1.csv`: the evaluation list, shaped like the real file: header
  `ImageID,StudyDate_DICOM,PatientID` followed by one EMPTY column name per label, and every
  row ends with the same number of empty fields (`...,1.90E+38,,,,`). Like the real file it
  has no newline after the last row.
* `Removal.csv`: `ImageID,StudyDate_DICOM,PatientID`: every test image plus ~3% of the
  training images (whole studies; those rows ARE in train.csv and must be dropped from
  training). No newline after the last row, like the real file.
* `test_labels.csv`: the hidden labels of the test images in train.csv's layout (same row
  order as the test list), so the demo can score itself.
* `padchest_metadata.csv`: PadChest's metadata layout (the `META_CSV` of the pipeline), one
  row per image (train and test): `ImageID,StudyID,PatientID,StudyDate_DICOM,Projection,
  ViewPosition_DICOM,Labels,Report`. PatientID is the EXACT patient number (35-39 digits);
  Projection is PA, AP, AP_horizontal or L; ViewPosition_DICOM as PadChest writes it
  (POSTEROANTERIOR, PA, LATERAL, LL, AP, ANTEROPOSTERIOR, or `nan` when absent). `Labels`
  (a Python-list string of the image's labels) and `Report` (a sentence naming them) hold
  the true labels, as PadChest's do: the pipeline must NEVER read them for evaluation images
  (the challenge rules forbid it), and a leak would show as a perfect demo score.
* `boxes.csv`: `ImageID,label,x0,y0,x1,y1`: where each positive finding was drawn on each
  image, in pixels of the written PNG (x0, y0 inclusive, x1, y1 exclusive: the box is
  `img[y0:y1, x0:x1]`), one row per (image, labelled finding drawn); none for Normal, for
  occult findings (see below) or for findings that do not show in a lateral view. Rows
  sorted by ImageID then label order. Like PadChest's localisations, for explanation maps.
* `images/<ImageID>`: 16-bit grayscale PNGs, sides in [min_side, max_side], never square; the
  NIH-shaped images (below) in `images/images_NNN/images/<ImageID>`: 8-bit, max_side square.
* `dataset.json`: written last; marks the dataset complete and records the parameters and a
  summary (per-label counts, projections, inverted ImageIDs, ...).

The cohort mirrors the real data (facts and shapes: see cxrlt.synth.cohort): ImageID =
`<StudyID>_<suffix>.png` in PadChest's three shapes, so ImageID minus its last
`_<suffix>.png` is the StudyID; the CSVs' PatientID is the lossy Excel form ("%.2E", e.g.
`1.90E+38`) of the exact number, shared by many unrelated patients; StudyDate_DICOM is
yyyymmdd (2009-2017), shared by the images of a study. Training studies are mostly a PA +
lateral pair or a single PA (~31% of training images lateral), some single AP /
AP_horizontal frontals; the test list holds one FRONTAL image per study; about a third of
test patients also have training studies.

A second centre (CXR-LT 2026's test list mixes PadChest and NIH images): `--n-nih-train` /
`--n-nih-test` (default 2% / 6%) of the images are NIH ChestX-ray14-shaped (cohort.make_nih_cohort:
`00000001_000.png`, frontal only, plain Patient IDs in the CSVs, not in padchest_metadata.csv).

Labels are drawn per study (all images of a study share them) with the long-tail profile
of CXRLT2026_APPROX_COUNTS, realistic co-occurrences (a noisy-OR network that keeps the
marginal rates), findings that persist across a patient's studies (chronic ones more),
`Normal` exclusive of every finding, some studies with no label at all, and at least
MIN_POS_TRAIN positive frontal images per label among the kept training images (not in
Removal) and MIN_POS_TEST in the test list.

Images: a smooth chest-like attenuation map (body, lungs, mediastinum, heart, spine,
clavicles, ribs, diaphragm domes, gradients; a lateral chest for L images) rendered at low
resolution, upsampled and given full-resolution noise, then stored through a random export
window (10-16 stored bits, random offset, gamma) and 3% inverted (MONOCHROME1-like). Each
finding adds its own pattern (see patterns.PATTERNS): a shape with a label-specific place
in the chest, its own form/orientation/texture and random jitter of position, size and
contrast (down to faint), large enough to survive percentile windowing and a 64-pixel
resize; on lateral images it is drawn as it would project (fainter, elsewhere, or not at
all). In P_OCCULT of the images a labelled finding is not drawn at all (label noise, as
with report-derived labels). Most unlabelled studies and some abnormal ones also show a
finding outside the label set (DISTRACTORS); Normal studies show no pattern at all.

Everything is seeded: the same arguments give byte-identical files whatever the number of
worker processes. The dataset is built in a temp folder beside `out` and renamed into place.

Modules: patterns (what each finding looks like, frontal and lateral), canvas (drawing
primitives), anatomy (the chest without findings, frontal and lateral), render (one image
and its boxes from its job; the worker side), cohort (patients, studies, IDs, projections),
labelling (labels per study), files (writing the CSVs), dataset (generate() and the CLI).
"""

from cxrlt.synth.dataset import generate, main
from cxrlt.synth.files import BOXES_NAME, MARKER_NAME, META_NAME, TEST_LIST_NAME

__all__ = ["generate", "main", "BOXES_NAME", "MARKER_NAME", "META_NAME", "TEST_LIST_NAME"]
