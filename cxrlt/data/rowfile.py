"""Row-addressed .npy files on disk, written batch by batch and read by row index, in memory that
does not grow with them.

A "row file" is an ordinary .npy array (n, ...) (`np.load` reads it) whose rows are written batch
by batch (`RowWriter`) and read back by row index (`RowFile`): cRT's cached head inputs, the image
cache's images.npy.

Why not a plain `np.load(mmap_mode="r")`: every page of a memory map that a process has touched
counts in its resident set (RSS) for as long as the map is open, so one pass over a 100 GB file
through a map shows 100 GB resident (page cache the kernel could drop, but the process's peak RSS,
and the memory limit of a job scheduler that counts it, grows with the file). So:
- RowFile reads rows with pread(2) into fresh arrays (a sorted run of consecutive rows in one
  call): nothing of the file stays mapped; the rows returned are ordinary in-memory copies.
- RowWriter writes through `np.lib.format.open_memmap` and drops the map (its dirty pages go to
  the kernel's page cache, to be written back as usual) after every `window_bytes` written: the
  RSS it adds is bounded by the window, whatever the file's size.

RowWriter writes to a temporary name beside the final path (cxrlt.core.fileio.atomic_path) and renames
it into place only when every row was written: a killed writer leaves no file at the final path.
The space is reserved up front (posix_fallocate), so that a full disk is a clean error at the
start rather than a SIGBUS half-way through a memory-mapped write.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

import numpy as np

from cxrlt.core.errors import InputError

WINDOW_BYTES = 4 << 20  # resident bytes a RowWriter's map may hold before it is dropped


def _touched_bytes(n_rows: int, row_bytes: int) -> int:
    """Resident bytes writing n_rows consecutive rows can add (the run may straddle two pages)."""
    return n_rows * row_bytes + 2 * mmap.PAGESIZE


class RowFile:
    """Read access to a row file: `f[i]`, `f[a:b]`, `f[index_array]` return in-memory copies.

    Attributes: path, shape, dtype, row_bytes; len(f) is the number of rows. Safe to pickle into
    DataLoader workers (each process opens the file itself).
    """

    def __init__(self, path):
        self.path = Path(path)
        m = np.load(self.path, mmap_mode="r")  # the header only: no data page is touched
        self.shape, self.dtype, self.offset = tuple(m.shape), m.dtype, int(m.offset)
        if not m.flags.c_contiguous:
            raise ValueError(f"{self.path}: not a C-ordered array")
        del m
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = None

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __len__(self) -> int:
        return self.shape[0]

    def _read_run(self, first: int, buf: np.ndarray) -> None:
        """Fill buf (consecutive rows from `first`) from the file."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(buf.reshape(-1).view(np.uint8))
        pos, offset = 0, self.offset + first * self.row_bytes
        while pos < len(view):
            got = os.preadv(self._fd, [view[pos:]], offset + pos)
            if got <= 0:
                raise OSError(f"{self.path}: file ends before row {first + len(buf) - 1}")
            pos += got

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.path.name}: row out of range 0..{len(self) - 1}")
        # read in file order, one call per run of consecutive rows, then restore the order asked for
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        buf = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        cuts = [0, *(np.flatnonzero(np.diff(srt) != 1) + 1).tolist(), len(srt)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b > a:
                self._read_run(int(srt[a]), buf[a:b])
        if np.array_equal(order, np.arange(len(idx))):
            return buf
        out = np.empty_like(buf)
        out[order] = buf
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return self._rows(np.arange(*key.indices(len(self)), dtype=np.int64))
        if np.isscalar(key):
            i = int(key)
            return self._rows(np.array([i + len(self) if i < 0 else i], dtype=np.int64))[0]
        return self._rows(np.asarray(key, dtype=np.int64))


def shape_of(path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a .npy file (its header only: no data page is read); None when unreadable."""
    try:
        m = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    return tuple(m.shape), m.dtype


def _reserve(path: Path, nbytes: int) -> None:
    """Allocate nbytes for the file now: ENOSPC becomes a one-line InputError here."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise InputError(f"{path.parent}: not enough free disk for {path.name} "
                             f"({nbytes / 2**30:.2f} GiB needed)") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


class RowWriter:
    """Writes a row file batch by batch; use as a context manager:

        with RowWriter(path, (n, 1536), np.float32) as w:
            for start, batch in ...:
                w.write(start, batch)      # rows start .. start + len(batch) - 1

    Each row is written once; the file appears at `path` when the block ends and every row has
    been written (else RuntimeError, and no file).
    """

    def __init__(self, path, shape, dtype, window_bytes: int = WINDOW_BYTES):
        self.path = Path(path)
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.window_bytes = int(window_bytes)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._written = 0
        self._map = None
        self._tmp = None
        self._stack = None

    def __enter__(self) -> "RowWriter":
        from cxrlt.core.fileio import atomic_path

        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.path, suffix=".npy"))
        m = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=self.dtype, shape=self.shape)
        offset = m.offset
        del m
        _reserve(self._tmp, offset + self.shape[0] * self.row_bytes)
        self._touched = 0
        return self

    def _open(self) -> np.ndarray:
        if self._map is None:
            self._map = np.lib.format.open_memmap(self._tmp, mode="r+")
            self._touched = 0
        return self._map

    def _drop(self) -> None:
        # unmapping takes the pages out of this process's RSS; dirty ones stay in the page cache
        # and are written back by the kernel (the rename in atomic_path comes after an fsync)
        self._map = None

    def write(self, start: int, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, expected {self.shape[1:]}")
        if start < 0 or start + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path.name}: rows {start}..{start + len(rows)} outside 0..{self.shape[0]}")
        self._open()[start:start + len(rows)] = rows
        self._written += len(rows)
        self._touched += _touched_bytes(len(rows), self.row_bytes)
        if self._touched >= self.window_bytes:
            self._drop()

    def __exit__(self, exc_type, exc, tb):
        self._drop()
        if exc_type is None and self._written != self.shape[0]:
            exc = RuntimeError(f"{self.path.name}: {self._written} of {self.shape[0]} rows written")
            self._stack.__exit__(type(exc), exc, None)  # discards the temporary file
            raise exc
        return self._stack.__exit__(exc_type, exc, tb)
