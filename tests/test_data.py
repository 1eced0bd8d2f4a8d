import numpy as np
import torch

from cxrlt.data.dataset import AugConfig, CacheDataset, augment


def _img():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (32, 32), dtype=np.uint8)


def test_augment_is_deterministic_per_seed_epoch_row(tmp_path):
    arr = np.stack([_img(), _img()[::-1]])
    np.save(tmp_path / "images.npy", arr)
    ds = CacheDataset(tmp_path / "images.npy", [0, 1], np.zeros((2, 3)), aug=AugConfig(), seed=5)
    a = ds[1][0]
    assert torch.equal(a, ds[1][0])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[1][0])  # a new epoch, a new augmentation
    ds2 = CacheDataset(tmp_path / "images.npy", [1, 0], np.zeros((2, 3)), aug=AugConfig(), seed=5)
    assert torch.equal(a, ds2[0][0])  # keyed by cache row, not by position or worker


def test_no_aug_returns_cache_pixels(tmp_path):
    arr = np.stack([_img()])
    np.save(tmp_path / "images.npy", arr)
    ds = CacheDataset(tmp_path / "images.npy", [0], np.ones((1, 2)), aug=None)
    x, y, r = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 32, 32)
    assert np.array_equal(x[0].numpy(), arr[0]) and y.tolist() == [1.0, 1.0] and r == 0


def test_flip_only_augmentation_mirrors():
    img = _img()
    aug = AugConfig(hflip=1.0, rotate=0, scale=0, translate=0, brightness=0, contrast=0)
    out = augment(img, aug, np.random.default_rng(0))
    assert np.array_equal(out, img[:, ::-1])


def test_brightness_contrast_bounded():
    img = np.full((16, 16), 128, np.uint8)
    aug = AugConfig(hflip=0, rotate=0, scale=0, translate=0, brightness=0.1, contrast=0.1)
    vals = [int(augment(img, aug, np.random.default_rng(s))[0, 0]) for s in range(50)]
    assert min(vals) >= 128 - 0.1 * 255 - 2 and max(vals) <= 128 + 0.1 * 255 + 2 and len(set(vals)) > 5


def test_dataset_pickles_without_the_array(tmp_path):
    import pickle

    np.save(tmp_path / "images.npy", np.zeros((100, 64, 64), np.uint8))
    ds = CacheDataset(tmp_path / "images.npy", range(100), np.zeros((100, 2)))
    _ = ds[0]  # opens the memmap
    assert len(pickle.dumps(ds)) < 20000  # workers get a path, not 400 KB of pixels


def test_atomic_write_cleans_temps_left_by_a_killed_writer(tmp_path):
    from cxrlt.core.fileio import write_text

    import os
    import time

    from cxrlt.core.fileio import STALE_TEMP_S

    stale = tmp_path / ".last.pt.abc123.tmp.pt"
    stale.write_bytes(b"x" * 100)
    old = time.time() - STALE_TEMP_S - 5
    os.utime(stale, (old, old))
    live = tmp_path / ".last.pt.def456.tmp.pt"  # being written right now by another node's process
    live.write_bytes(b"z")
    other = tmp_path / ".other.pt.abc123.tmp.pt"
    other.write_bytes(b"y")
    os.utime(other, (old, old))
    write_text(tmp_path / "last.pt", "new")
    assert not stale.exists() and other.exists() and (tmp_path / "last.pt").read_text() == "new"
    assert live.exists()


class _CvThreads(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import cv2

        return torch.tensor(cv2.getNumThreads()), torch.zeros(1), i


def test_loader_workers_run_opencv_single_threaded():
    from cxrlt.data.dataset import make_loader

    threads = [int(x.max()) for x, _, _ in make_loader(_CvThreads(), 1, workers=1)]
    assert threads == [1, 1]  # one OpenCV thread per worker process (the workers are the parallelism)


def test_persistent_workers_get_each_epoch_from_the_sampler(demo_cache):
    from cxrlt.data.cache import open_cache
    from cxrlt.data.dataset import AugConfig, CacheDataset, EpochTagged, make_loader
    from cxrlt.data.samplers import InstanceSampler

    cache = open_cache(demo_cache)
    rows = cache.rows("train")[:8]
    aug = AugConfig(hflip=0.5, rotate=10, scale=0.1, translate=0.05, brightness=0.1, contrast=0.1)

    def reference(epoch):  # a fresh dataset told the epoch, no workers
        ds = CacheDataset(cache.images_path, rows, aug=aug, seed=3)
        ds.set_epoch(epoch)
        s = InstanceSampler(len(rows), seed=3)
        s.set_epoch(epoch)
        return torch.cat([x for x, _, _ in make_loader(ds, 4, sampler=s, workers=0)])

    s = InstanceSampler(len(rows), seed=3)
    loader = make_loader(CacheDataset(cache.images_path, rows, aug=aug, seed=3), 4, sampler=EpochTagged(s),
                         workers=1, persistent=True)
    got = []
    for epoch in (0, 1, 2):
        s.set_epoch(epoch)
        got.append(torch.cat([x for x, _, _ in loader]))
    assert loader._iterator is not None  # one worker process served the three epochs
    for epoch in (0, 1, 2):
        assert torch.equal(got[epoch], reference(epoch))
    assert not torch.equal(got[1], got[2])
