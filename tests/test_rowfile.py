"""cxrlt.data.rowfile: row files written batch by batch and read by index, in bounded resident memory."""

import pickle

import numpy as np
import pytest

from cxrlt.data.rowfile import RowFile, RowWriter, shape_of


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise RuntimeError("no RssFile in /proc/self/status")


def test_rows_written_in_batches_read_back_by_index(tmp_path):
    data = np.random.default_rng(0).normal(size=(50, 3, 4)).astype(np.float16)
    path = tmp_path / "f.npy"
    with RowWriter(path, data.shape, np.float16, window_bytes=200) as w:  # tiny window: re-maps often
        for start in range(0, 50, 7):
            w.write(start, data[start:start + 7])
        assert not path.exists()  # only once every row is in
    assert np.array_equal(np.load(path), data)  # an ordinary .npy file
    f = RowFile(path)
    assert len(f) == 50 and f.shape == (50, 3, 4) and f.dtype == np.float16
    idx = np.array([41, 3, 3, 17, 0, 49])
    assert np.array_equal(f[idx], data[idx])  # any order, repeats allowed
    assert np.array_equal(f[10:20], data[10:20]) and np.array_equal(f[7], data[7]) and np.array_equal(f[-1], data[-1])
    assert np.array_equal(f[::-3], data[::-3]) and f[idx].flags.writeable
    with pytest.raises(IndexError):
        f[np.array([3, 50])]
    assert np.array_equal(pickle.loads(pickle.dumps(f))[idx], data[idx])  # as a DataLoader worker gets it
    assert shape_of(path) == ((50, 3, 4), np.dtype(np.float16)) and shape_of(tmp_path / "none.npy") is None


def test_an_unfinished_writer_leaves_no_file(tmp_path):
    path = tmp_path / "f.npy"
    with pytest.raises(RuntimeError, match="3 of 5 rows written"):
        with RowWriter(path, (5, 2), np.float32) as w:
            w.write(0, np.ones((3, 2)))
    with pytest.raises(KeyboardInterrupt):
        with RowWriter(path, (5, 2), np.float32) as w:
            w.write(0, np.ones((3, 2)))
            raise KeyboardInterrupt
    with pytest.raises(ValueError, match="outside"):
        with RowWriter(path, (5, 2), np.float32) as w:
            w.write(4, np.ones((3, 2)))
    assert list(tmp_path.iterdir()) == []  # no final file, no temporary file


def test_writing_and_reading_a_whole_file_keeps_at_most_a_window_resident(tmp_path):
    mb = 1 << 20
    n, width = 256, 32 * 1024  # 256 rows of 128 KiB: a 32 MiB file
    batch = lambda start: np.full((16, width), start, np.float32)  # noqa: E731

    def peak_growth(steps):
        before, peak = _rss_file_kb(), 0
        for step in steps:
            step()
            peak = max(peak, _rss_file_kb() - before)
        return peak * 1024

    with RowWriter(tmp_path / "rows.npy", (n, width), np.float32, window_bytes=2 * mb) as w:
        wrote = peak_growth([lambda s=s: w.write(s, batch(s)) for s in range(0, n, 16)])
    f = RowFile(tmp_path / "rows.npy")
    read = peak_growth([lambda s=s: f[np.arange(s, s + 8)] for s in range(0, n, 8)])
    assert f[np.arange(0, n, 8)][:, 0].tolist() == [s - s % 16 for s in range(0, n, 8)]

    plain = np.lib.format.open_memmap(tmp_path / "plain.npy", mode="w+", dtype=np.float32, shape=(n, width))
    plain_wrote = peak_growth([lambda s=s: plain.__setitem__(slice(s, s + 16), batch(s)) for s in range(0, n, 16)])
    assert plain_wrote > 24 * mb, plain_wrote  # a plain memory map keeps every page it touched
    assert wrote < 4 * mb and read < 1 * mb, (wrote, read)
