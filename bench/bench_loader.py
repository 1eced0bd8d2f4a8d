#!/usr/bin/env python
"""Loader throughput: the cache Dataset (memmap + uint8 augmentation) vs decode-and-resize per access.

    python bench/bench_loader.py [--n 8] [--size 512] [--src-h 2500 --src-w 2000] [--passes 5] [--json OUT.json]

The baseline is what a loader without a cache does for every image of every epoch: read the
16-bit PNG, window it and resize it (cxrlt.data.imaging.load_for_cache, the cache builder's own
decode), then augment. The fast path is cxrlt.data.dataset.CacheDataset over the cached images. Both run
in this process (images/s per loader worker), with the same augmentations on the same images
(synthetic films, bench/common.py). Target: >= 20x.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import add_json_flag, write_result, write_xray_pngs

TARGET_RATIO = 20.0


def run(n: int = 8, size: int = 512, src_h: int = 2500, src_w: int = 2000, passes: int = 5, workdir=None) -> dict:
    """Images/s of decode + resize + augment vs the cache Dataset (augment included) -> numbers."""
    import cv2

    from cxrlt.data.dataset import AugConfig, CacheDataset, augment
    from cxrlt.data.imaging import load_for_cache

    cv2.setNumThreads(1)
    aug = AugConfig()
    with tempfile.TemporaryDirectory(prefix="bench_loader_", dir=workdir) as d:
        d = Path(d)
        paths = write_xray_pngs(d / "png", n, src_h, src_w)
        np.save(d / "images.npy", np.stack([load_for_cache(p, size) for p in paths]))

        t0 = time.perf_counter()
        for i, p in enumerate(paths):
            augment(load_for_cache(p, size), aug, np.random.default_rng(i))
        base = n / (time.perf_counter() - t0)

        ds = CacheDataset(d / "images.npy", np.arange(n), np.zeros((n, 30)), aug=aug)
        t0 = time.perf_counter()
        for e in range(passes):
            ds.set_epoch(e)
            for i in range(len(ds)):
                ds[i]
        fast = n * passes / (time.perf_counter() - t0)
    return {"size": size, "images": n, "passes": passes, "cache_images_per_s": fast,
            "decode_resize_images_per_s": base, "ratio": fast / base, "target_ratio": TARGET_RATIO}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="synthetic images")
    ap.add_argument("--size", type=int, default=512, help="cached image side")
    ap.add_argument("--src-h", type=int, default=2500, help="height of the synthetic PNGs")
    ap.add_argument("--src-w", type=int, default=2000, help="width of the synthetic PNGs")
    ap.add_argument("--passes", type=int, default=5, help="passes over the cache for the fast loader")
    add_json_flag(ap)
    a = ap.parse_args()
    r = run(a.n, a.size, a.src_h, a.src_w, a.passes)
    print(f"loader @ {r['size']} px with augmentation, 1 worker: cache {r['cache_images_per_s']:.0f} img/s, "
          f"decode+resize {r['decode_resize_images_per_s']:.1f} img/s -> {r['ratio']:.0f}x (target >= "
          f"{TARGET_RATIO:.0f}x)")
    write_result(a.json, r)


if __name__ == "__main__":
    main()
