"""Row-addressed .npy files on disk, read and written in pieces, in memory that does not grow with them.

A "row file" is an ordinary .npy array (n, ...) (`np.load` reads it) whose rows are written batch
by batch (`RowWriter`) and read back by row index (`RowFile`), e.g. cRT's cached head inputs.

Why not a plain `np.load(mmap_mode="r")`: every page of a memory map that a process has touched
counts in its resident set (RSS) for as long as the map is open, so one pass over a 100 GB file
through a map shows 100 GB resident (page cache the kernel could drop, but the process's peak
RSS, and any memory limit of a job scheduler that counts it, grows with the file). Both classes
here map the file with `np.lib.format.open_memmap` and drop the map (so its pages leave the RSS;
they stay in the kernel's page cache) after every `window_bytes` of rows touched: the RSS they
add is bounded by the window, whatever the file's size.

RowWriter writes to a temporary name beside the final path (cxrlt.fileio.atomic_path) and renames
it into place only when every row was written, after an fsync: a killed writer leaves no file at
the final path. The space is reserved up front (posix_fallocate) so that a full disk is a clean
error at the start rather than a SIGBUS half-way through a memory-mapped write.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

import numpy as np

from .errors import InputError

WINDOW_BYTES = 64 << 20  # RSS a row file may hold mapped before its map is dropped


def _touched_bytes(n_rows: int, row_bytes: int) -> int:
    """Resident bytes reading or writing n_rows rows can add (each row may straddle a page)."""
    return n_rows * (max(row_bytes, mmap.PAGESIZE) + mmap.PAGESIZE)


class RowFile:
    """Read access to a row file: `f[i]`, `f[a:b]`, `f[index_array]` return in-memory copies.

    Attributes: path, shape, dtype, row_bytes. len(f) is the number of rows.
    """

    def __init__(self, path, window_bytes: int = WINDOW_BYTES):
        self.path = Path(path)
        self.window_bytes = int(window_bytes)
        self._map = None
        self._touched = 0
        m = self._open()
        self.shape, self.dtype = tuple(m.shape), m.dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def _open(self) -> np.ndarray:
        if self._map is None:
            self._map = np.load(self.path, mmap_mode="r")
            self._touched = 0
        return self._map

    def _account(self, n_rows: int) -> None:
        self._touched += _touched_bytes(n_rows, self.row_bytes)
        if self._touched >= self.window_bytes:
            self.release()

    def release(self) -> None:
        """Drop the memory map now (the next read maps the file again)."""
        self._map = None  # the copies handed out do not reference it, so this unmaps the file

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        m = self._open()
        if isinstance(key, slice):
            out = np.array(m[key])
        elif np.isscalar(key):
            out = np.array(m[int(key)])
        else:
            key = np.asarray(key, dtype=np.int64)
            # read in file order (sequential pages), then put the rows back in the order asked for
            order = np.argsort(key, kind="stable")
            out = np.empty((len(key), *self.shape[1:]), dtype=self.dtype)
            out[order] = m[key[order]]
        self._account(1 if out.ndim == len(self.shape) - 1 else len(out))
        return out


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
        from .fileio import atomic_path

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
        if self._map is not None:
            self._map.flush()
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
