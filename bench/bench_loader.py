#!/usr/bin/env python
"""Loader throughput: the cache Dataset (memmap + uint8 augmentation) vs decode-and-resize per access.

The baseline is what the reference code does every epoch: read the 16-bit PNG, window it, resize it,
then augment. Both run in the main process (images/s per worker), same augmentations, same images.

    python bench/bench_loader.py [--n 24] [--size 512] [--src-h 2500 --src-w 2000] [--json out.json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrlt.data import AugConfig, CacheDataset, augment  # noqa: E402


def synthetic_png(path, h, w, rng):
    """A smooth 16-bit image (so PNG compression is realistic) with some noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 20000 + 15000 * np.sin(xx / (w / 3.0) + rng.uniform(0, 6)) * np.cos(yy / (h / 2.5))
    img += rng.normal(0, 300, (h, w)).astype(np.float32)
    cv2.imwrite(str(path), np.clip(img, 0, 65535).astype(np.uint16))


def decode_resize(path, size):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    sub = img[::4, ::4]
    lo, hi = np.percentile(sub, (0.5, 99.5))
    img = np.clip((img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--src-h", type=int, default=2500)
    ap.add_argument("--src-w", type=int, default=2000)
    ap.add_argument("--passes", type=int, default=5, help="passes over the cache for the fast loader")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    aug = AugConfig()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        paths = []
        for i in range(args.n):
            p = d / f"img{i}.png"
            synthetic_png(p, args.src_h, args.src_w, rng)
            paths.append(p)
        cache = np.stack([decode_resize(p, args.size) for p in paths])
        np.save(d / "images.npy", cache)

        t0 = time.perf_counter()
        for i, p in enumerate(paths):
            augment(decode_resize(p, args.size), aug, np.random.default_rng(i))
        base = args.n / (time.perf_counter() - t0)

        ds = CacheDataset(d / "images.npy", np.arange(args.n), np.zeros((args.n, 30)), aug=aug)
        t0 = time.perf_counter()
        for e in range(args.passes):
            ds.set_epoch(e)
            for i in range(len(ds)):
                ds[i]
        fast = args.n * args.passes / (time.perf_counter() - t0)
    res = {"size": args.size, "cache_images_per_s": fast, "decode_resize_images_per_s": base, "ratio": fast / base,
           "target_ratio": 20.0}
    print(f"loader @ {args.size}px with augmentation, 1 worker: cache {fast:.0f} img/s, "
          f"decode+resize {base:.1f} img/s -> {fast / base:.0f}x (target >= 20x)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
