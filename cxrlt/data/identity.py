"""Study, patient and projection keys of an image, and the key that names a test cache.

Standard library only: `test_cache_key` runs at every `make` (python -m cxrlt.data.identity).

Rules (stored per image in a cache's index.csv as `study`, `patient`, `projection`, `centre`):

* study: a PadChest-shaped ImageID (at least 15 digits first, `_<suffix>.png` last, e.g.
  `1019...3351_4_xfebel.png`) -> the ImageID without its last `_<suffix>.png`, which is
  PadChest's exact StudyID (`1019...3351_4`; true for every PadChest image). Otherwise
  `<patient>|<StudyDate_DICOM>` when both are non-blank, else the ImageID itself: an image
  without keys is a study of its own, never pooled with other images.
* patient: the metadata CSV's PatientID when given and non-blank (exact), else the training
  CSV's / test list's PatientID (in the official files a lossy Excel float such as `1.90E+38`
  that joins many patients), else the ImageID (a patient of its own).
* projection: the metadata CSV's `Projection` in PadChest's words (PA, AP, AP_horizontal, L, COSTAL;
  DICOM's POSTEROANTERIOR, ANTEROPOSTERIOR, LATERAL, ... are mapped to them), '' when unknown (no
  metadata, image not in it, blank, UNK, or a word of no known vocabulary: check_projections warns,
  or refuses a column with no known word). Frontal = PA, AP, AP_horizontal. For test images the
  metadata gives the projection (and the centre) only (docs/rules.md).
* centre: the hospital / dataset an image comes from (CXR-LT 2026's test list mixes PadChest and
  NIH images): the metadata CSV's `Centre` when given and non-blank (lowercased), else from the
  shape of the ImageID's file name: PadChest-shaped (above) -> `padchest`; NIH ChestX-ray14's
  `<8-digit patient>_<3-digit follow-up>.png` (`00000001_000.png`) -> `nih`; else `unknown`.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

from cxrlt.core.hashing import file_key

FRONTAL = ("PA", "AP", "AP_horizontal")
_UNKNOWN_PROJECTION = {"", "UNK", "UNKNOWN", "NAN", "NONE"}
_PADCHEST_ID = re.compile(r"^\d{15,}[^/\\]*_[^_/\\]+\.png$", re.IGNORECASE)
_NIH_ID = re.compile(r"^\d{8}_\d{3}\.png$", re.IGNORECASE)
CENTRES = ("padchest", "nih", "unknown")  # the centres the ImageID's shape tells apart
_CENTRE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def is_padchest_id(image_id: str) -> bool:
    return bool(_PADCHEST_ID.match(image_id))


def is_nih_id(image_id: str) -> bool:
    return bool(_NIH_ID.match(image_id))


def valid_centre_name(name: str) -> bool:
    """A metadata `Centre` value the index can hold (lowercase letters, digits, `_.-`)."""
    return bool(_CENTRE_NAME.match(name.strip().lower()))


def centre(image_id: str, meta_centre: str = "") -> str:
    """The centre of an image (see the module docstring): the metadata's, else from the shape of
    the ImageID's file name (a path's folders are ignored: `images_001/images/00000001_000.png`)."""
    given = meta_centre.strip().lower()
    if given:
        return given
    name = image_id.replace("\\", "/").rsplit("/", 1)[-1]
    if is_padchest_id(name):
        return "padchest"
    if is_nih_id(name):
        return "nih"
    return "unknown"


def study_key(image_id: str, patient: str = "", study_date: str = "") -> str:
    """The study an image belongs to (see the module docstring)."""
    if is_padchest_id(image_id):
        return image_id.rsplit("_", 1)[0]
    patient, study_date = patient.strip(), study_date.strip()
    if patient and study_date:
        return f"{patient}|{study_date}"
    return image_id


def patient_key(image_id: str, csv_patient: str = "", meta_patient: str = "") -> str:
    """The patient of an image: exact metadata PatientID, else the CSV's, else the image itself."""
    return meta_patient.strip() or csv_patient.strip() or image_id


# the spellings of each projection (PadChest's own words, DICOM's ViewPosition / Projection words),
# compared in upper case with '-', ' ' and '_' ignored
_SPELLINGS = {
    "PA": ("PA", "POSTEROANTERIOR", "POSTERIORANTERIOR", "PAPOSTEROANTERIOR"),
    "AP": ("AP", "ANTEROPOSTERIOR", "ANTERIORPOSTERIOR", "APANTEROPOSTERIOR"),
    "AP_horizontal": ("APHORIZONTAL", "APSUPINE", "APHORIZ"),
    "L": ("L", "LAT", "LATERAL", "LL", "RL", "LEFTLATERAL", "RIGHTLATERAL"),
    "COSTAL": ("COSTAL",),
}
_CANONICAL = {s: name for name, spellings in _SPELLINGS.items() for s in spellings}


def _squash(value: str) -> str:
    return "".join(c for c in value.upper() if c not in " -_")


def projection(meta_projection: str = "") -> str:
    """The metadata's projection in PadChest's words (PA, AP, AP_horizontal, L, COSTAL; DICOM words
    such as POSTEROANTERIOR or LATERAL are mapped), '' when unknown (blank, UNK, or a word of
    another vocabulary: check_projections names those)."""
    p = meta_projection.strip()
    if p.upper() in _UNKNOWN_PROJECTION:
        return ""
    return _CANONICAL.get(_squash(p), "")


def check_projections(source, values) -> None:
    """Projection values no spelling maps: refused when no value is known at all (no image would
    count as frontal and every choice on the test-like proxy would silently fall back to the full
    fold), else a warning naming them (those images count as of unknown projection)."""
    from collections import Counter

    from cxrlt.core.errors import InputError

    given = [str(v).strip() for v in values if str(v).strip().upper() not in _UNKNOWN_PROJECTION]
    unknown = Counter(v for v in given if _squash(v) not in _CANONICAL)
    if not unknown:
        return
    seen = ", ".join(f"{v!r} x{c}" for v, c in unknown.most_common(6))
    known = "PA, AP, AP_horizontal, L, COSTAL (or POSTEROANTERIOR, ANTEROPOSTERIOR, LATERAL, ...)"
    if len(unknown) and sum(unknown.values()) == len(given):
        raise InputError(f"{source}: column 'Projection': no value is a known projection (seen: {seen}); "
                         f"expected {known}")
    print(f"warning: {source}: column 'Projection': {sum(unknown.values())} value(s) are not a known projection "
          f"and count as unknown (seen: {seen}); expected {known}", file=sys.stderr)


def test_cache_key(test_csv, meta_csv=None) -> str:
    """Names the test cache of a test list (`<root>/test-<key>`): 12 hex digits of the contents
    of the test list and of the metadata CSV (whose projection and keys the cache stores). Fast:
    one read of each file (cached: cxrlt/core/hashing.py), no parsing."""
    h = hashlib.sha256(b"cxrlt test cache\0")
    for path in (test_csv, meta_csv):
        h.update(bytes.fromhex(file_key(path)) if path else b"-")
    return h.hexdigest()[:12]


test_cache_key.__test__ = False  # a function, not a test, when a test module imports it


def main(argv=None) -> int:
    """python -m cxrlt.data.identity TEST_CSV [META_CSV]: print the test cache key (for the Makefile)."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m cxrlt.data.identity TEST_CSV [META_CSV]", file=sys.stderr)
        return 2
    for path in args:
        if path and not os.path.isfile(path):
            print(f"error: {path}: file not found", file=sys.stderr)
            return 2
    print(test_cache_key(args[0], args[1] if len(args) > 1 and args[1] else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
