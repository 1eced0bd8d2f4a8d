"""Image decoding, intensity windowing and resizing for the cache.

Per image (`load_for_cache`): decode -> window limits from a strided subsample -> resize the
16-bit image -> apply the window through a lookup table -> uint8 (size, size).

* Decoding: OpenCV, unchanged bit depth (PadChest PNGs are 16-bit grayscale; NIH PNGs and JPEGs
  are 8-bit). Colour images are converted to gray (alpha ignored).
* Windowing (16-bit only): the intensities at the `low_pct` / `high_pct` percentiles of a
  strided subsample (every `stride`-th pixel in both directions) are mapped to 0 / 255, linearly
  in between, clipped outside. This removes the few extreme pixels (burnt-in text, collimator
  edges) that would otherwise squeeze the lung contrast. Percentiles come from a histogram of
  the subsample (exact for integers): low = numpy's method="lower", high = method="higher", so
  the window of an inverted image is the inverted window.
  8-bit input is passed through unchanged: it was already windowed for display when it was
  exported, and re-stretching it would change its contrast relative to the rest of such data.
  There is no automatic inversion of MONOCHROME1 images: a PNG carries no photometric tag.
* Resizing: a plain squash to size x size (aspect ratio not kept), as the reference solutions
  do. Chest films are close to square (PadChest aspect ~0.8-1.25), squashing keeps the whole
  field of view and every output pixel carries image content, whereas letterboxing would
  spend up to 20% of the input on padding. Shrinking is area averaging (anti-aliased).
  For speed the shrink is done in two steps: an exact integer-factor box average (OpenCV's
  fast INTER_AREA path; up to factor-1 edge pixels are cropped to make the factor exact),
  then INTER_AREA to the final size; ~5x faster than one non-integer INTER_AREA on a 2000x2500
  image, and within a few grey levels of it.
* Windowing is applied after resizing (to 16-bit values), i.e. on size^2 pixels rather than on
  the full image; the limits are still computed on the full-resolution subsample.
"""

from __future__ import annotations

import os
import sys
import tempfile

import cv2
import numpy as np

from cxrlt.core.errors import InputError

MIN_SIDE = 8  # smaller images are certainly not chest X-rays (a thumbnail or a broken export)


class ImageReadError(InputError):
    """An image file that cannot be used: missing, empty, corrupt, not an image, too small.

    `path` and `reason` are kept separately so that callers can report them with more context
    (ImageID, CSV row); str() is "path: reason".
    """

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def read_file(path) -> np.ndarray:
    """The bytes of an image file (uint8 array); ImageReadError naming the file when unreadable."""
    path = os.fspath(path)
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(path, "image file not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image file") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read image file ({e.strerror})") from None


def read_image(path, data: np.ndarray | None = None) -> np.ndarray:
    """Decode an image file (or its bytes `data`, already read from `path`) -> 2-D uint8 or
    uint16 array (colour converted to gray).

    Raises ImageReadError naming the file for: missing, zero-byte, truncated or corrupt files
    (a JPEG whose data libjpeg reports damaged included), non-image files, unsupported pixel
    types and images smaller than MIN_SIDE pixels.
    """
    path = os.fspath(path)
    if data is None:
        data = read_file(path)
    if data.size == 0:
        raise ImageReadError(path, "image file is empty (0 bytes)")
    _check_complete(path, data)
    img = _decode(path, data)
    if img is None:
        raise ImageReadError(path, f"not a readable image (corrupt, truncated or not an image file; "
                             f"{data.size} bytes)")
    img = _to_gray(path, img)
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(path, f"unsupported pixel type {img.dtype} (expected 8- or 16-bit)")
    if min(img.shape) < MIN_SIDE:
        raise ImageReadError(path, f"image is only {img.shape[1]}x{img.shape[0]} pixels "
                             f"(at least {MIN_SIDE}x{MIN_SIDE} expected)")
    return img


def _check_complete(path, data: np.ndarray) -> None:
    """A JPEG cut short still decodes (libjpeg fills the rest with grey): require its end marker.
    Truncated PNGs already fail to decode."""
    if _is_jpeg(data):
        tail = data[-64:].tobytes().rstrip(b"\x00")  # some writers pad after the marker
        if not tail.endswith(b"\xff\xd9"):
            raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")


def _is_jpeg(data: np.ndarray) -> bool:
    return data.size >= 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


# libjpeg reports a damaged entropy-coded segment only as a warning on stderr ("Corrupt JPEG data:
# premature end of data segment", "... bad Huffman code", "Premature end of JPEG file"), and
# OpenCV then returns an image whose missing part is flat grey: a JPEG cut short with an end
# marker appended passes the end-marker check. Such images are refused. Two "Corrupt JPEG data"
# warnings leave the pixels intact and are tolerated: junk bytes between segments, a bad ICC profile.
_JPEG_HARMLESS = ("extraneous bytes", "icc")
_warning_sink = None  # a file, not a pipe: a long message can never block the decoder


def _decode(path, data: np.ndarray):
    """cv2.imdecode; for a JPEG, watch what libjpeg writes to file descriptor 2 while it decodes."""
    global _warning_sink
    if not _is_jpeg(data):
        return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if _warning_sink is None:
        _warning_sink = tempfile.TemporaryFile()
    _warning_sink.seek(0)
    _warning_sink.truncate()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(_warning_sink.fileno(), 2)
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    _warning_sink.seek(0)
    for line in _warning_sink.read(4096).decode("utf-8", "replace").splitlines():
        low = line.lower()
        if ("corrupt jpeg data" in low and not any(k in low for k in _JPEG_HARMLESS)) \
                or "premature end of jpeg file" in low:
            raise ImageReadError(path, f"damaged JPEG data (libjpeg: {line.strip()})")
    return img


def _to_gray(path, img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img
    channels = img.shape[2] if img.ndim == 3 else 0
    if channels == 1:
        return img[:, :, 0]
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)  # alpha ignored
    raise ImageReadError(path, f"unsupported image layout {img.shape}")


def window_limits(img: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
                  stride: int = 4) -> tuple[int, int]:
    """Intensities at the low/high percentiles of img[::stride, ::stride] -> (lo, hi).

    Exact order statistics via a histogram: lo = sorted[floor(q_lo * (n-1))],
    hi = sorted[ceil(q_hi * (n-1))] (numpy's percentile methods "lower" and "higher").
    If that window is empty (hi <= lo: most of the image has one value) it falls back to the
    subsample's min and max.
    """
    if not 0 <= low_pct < high_pct <= 100:
        raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}")
    sample = np.ascontiguousarray(img[::stride, ::stride]).ravel()
    counts = np.bincount(sample, minlength=int(np.iinfo(img.dtype).max) + 1)
    cum = np.cumsum(counts)
    n = int(cum[-1])
    i_lo = int(np.floor(low_pct / 100.0 * (n - 1)))
    i_hi = int(np.ceil(high_pct / 100.0 * (n - 1)))
    # sorted[i] is the smallest value v with cum[v] > i
    lo = int(np.searchsorted(cum, i_lo, side="right"))
    hi = int(np.searchsorted(cum, i_hi, side="right"))
    if hi <= lo:
        lo, hi = int(sample.min()), int(sample.max())
    return lo, hi


def apply_window(img: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Map lo -> 0 and hi -> 255 linearly (rounded, clipped) -> uint8. hi <= lo gives zeros."""
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.uint8)
    levels = int(np.iinfo(img.dtype).max) + 1
    scale = 255.0 / (hi - lo)
    lut = np.clip(np.rint((np.arange(levels, dtype=np.float64) - lo) * scale), 0, 255).astype(np.uint8)
    return lut[img]


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size, aspect ratio NOT kept (squash; see module docstring).

    Shrinking uses area averaging (two steps: exact integer-factor box average, then INTER_AREA);
    enlarging (an axis smaller than `size`) uses bilinear interpolation.
    """
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    if h < size or w < size:
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    fy, fx = h // size, w // size
    if fy > 1 or fx > 1:
        img = img[: h - h % fy, : w - w % fx]
        img = cv2.resize(img, (img.shape[1] // fx, img.shape[0] // fy), interpolation=cv2.INTER_AREA)
    if img.shape[:2] == (size, size):
        return img
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def load_for_cache(path, size: int, low: float = 0.5, high: float = 99.5, stride: int = 4,
                   data: np.ndarray | None = None) -> np.ndarray:
    """Read one image file (or decode its bytes `data`) -> uint8 (size, size): decode, window
    (16-bit), squash-resize."""
    img = read_image(path, data)
    if img.dtype == np.uint8:
        return resize_square(img, size)
    lo, hi = window_limits(img, low, high, stride)
    return apply_window(resize_square(img, size), lo, hi)
