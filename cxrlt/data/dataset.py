"""Data loading for training and inference: a Dataset over the image cache.

The cache (see cxrlt/data/cache.py) holds every image as uint8 (size x size). A sample is read
straight from images.npy (a pread of its row, cxrlt.data.rowfile: nothing stays mapped, so a loader
worker's resident memory does not grow with the number of images it has read), augmented
cheaply on the CPU in uint8 (one affine warp that does flip + rotation + zoom + shift, CLAHE, a
brightness/contrast lookup table, Gaussian noise, coarse dropout: docs/augmentation.md) and handed to the device as uint8: conversion to float and
normalisation happen on the device in the training step (`model.normalize`), which keeps the
loader's work and the host->device copy 4x smaller.

Augmentation randomness is a pure function of (seed, epoch, row): the same sample gets the
same augmentation whatever the number of workers, the DDP rank or an interruption and resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class AugConfig:
    hflip: float = 0.5  # probability
    rotate: float = 5.0  # max degrees
    scale: float = 0.1  # max zoom fraction
    translate: float = 0.05  # max shift, fraction of size
    brightness: float = 0.1  # max additive change, fraction of 255
    contrast: float = 0.1  # max multiplicative change
    affine_p: float = 1.0  # probability of the rotate/zoom/shift part of the warp (the flip has its own)
    color_p: float = 1.0  # probability of the brightness/contrast change
    clahe_p: float = 0.0  # probability of CLAHE
    clahe_clip: float = 2.0  # CLAHE clip limit: drawn uniformly from [1, clahe_clip] (as albumentations)
    clahe_tiles: int = 8  # CLAHE tile grid (tiles x tiles)
    noise_p: float = 0.0  # probability of additive Gaussian noise
    noise_var_min: float = 1.0  # its variance, drawn uniformly from [min, max], in grey levels^2 (0-255 scale)
    noise_var_max: float = 5.0
    dropout_p: float = 0.0  # probability of coarse dropout (cutout)
    dropout_holes: int = 6  # holes of it, each dropout_size x dropout_size, filled with 0
    dropout_size: float = 24 / 512  # hole side, fraction of the image side (24 px at 512)

    @classmethod
    def from_config(cls, cfg: dict) -> "AugConfig":
        return cls(
            hflip=cfg["aug_hflip"], rotate=cfg["aug_rotate"], scale=cfg["aug_scale"],
            translate=cfg["aug_translate"], brightness=cfg["aug_brightness"], contrast=cfg["aug_contrast"],
            affine_p=cfg["aug_affine_p"], color_p=cfg["aug_color_p"],
            clahe_p=cfg["aug_clahe_p"], clahe_clip=cfg["aug_clahe_clip"], clahe_tiles=cfg["aug_clahe_tiles"],
            noise_p=cfg["aug_noise_p"], noise_var_min=cfg["aug_noise_var_min"], noise_var_max=cfg["aug_noise_var_max"],
            dropout_p=cfg["aug_dropout_p"], dropout_holes=cfg["aug_dropout_holes"], dropout_size=cfg["aug_dropout_size"],
        )

    @property
    def is_identity(self) -> bool:
        affine = self.affine_p > 0 and any([self.rotate, self.scale, self.translate])
        color = self.color_p > 0 and any([self.brightness, self.contrast])
        noise = self.noise_p > 0 and self.noise_var_max > 0
        dropout = self.dropout_p > 0 and self.dropout_holes > 0 and self.dropout_size > 0
        return not any([self.hflip, affine, color, self.clahe_p, noise, dropout])


def apply_clahe(img: np.ndarray, clip: float, tiles: int) -> np.ndarray:
    """CLAHE (OpenCV) of a uint8 HxW image: clip limit `clip`, a tiles x tiles grid."""
    return cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(int(tiles), int(tiles))).apply(img)


def augment(img: np.ndarray, aug: AugConfig, rng: np.random.Generator) -> np.ndarray:
    """Augment a uint8 HxW image, in this order (the winner's albumentations pipeline, see
    docs/augmentation.md): flip and (with probability affine_p) rotate/zoom/shift as one warp;
    CLAHE (clahe_p); brightness/contrast (color_p); Gaussian noise (noise_p); coarse dropout
    (dropout_p). Every draw comes from `rng`. The first seven draws are those of the flip /
    rotate / zoom / shift / brightness / contrast augmentation alone, taken whatever the
    probabilities; each further draw is taken only when its probability is not 0 (or, for the
    two gates affine_p and color_p, not 1): the defaults give the pixels of that augmentation."""
    h, w = img.shape
    flip = rng.random() < aug.hflip
    angle = rng.uniform(-aug.rotate, aug.rotate)
    zoom = 1.0 + rng.uniform(-aug.scale, aug.scale)
    tx, ty = rng.uniform(-aug.translate, aug.translate, size=2) * (w, h)
    alpha = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
    beta = rng.uniform(-aug.brightness, aug.brightness) * 255.0
    if aug.affine_p < 1 and not rng.random() < aug.affine_p:
        angle, zoom, tx, ty = 0.0, 1.0, 0.0, 0.0
    if aug.color_p < 1 and not rng.random() < aug.color_p:
        alpha, beta = 1.0, 0.0

    if flip or angle or zoom != 1.0 or tx or ty:
        m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, zoom)
        if flip:  # compose a horizontal flip before the rotation: x -> w - 1 - x
            m = m @ np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        m[:, 2] += (tx, ty)
        img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if aug.clahe_p > 0 and rng.random() < aug.clahe_p:
        img = apply_clahe(img, rng.uniform(1.0, max(1.0, aug.clahe_clip)), aug.clahe_tiles)
    if alpha != 1.0 or beta:
        # contrast around the mid-grey, then brightness, through a 256-entry lookup table
        lut = np.clip((np.arange(256, dtype=np.float32) - 127.5) * alpha + 127.5 + beta, 0, 255).astype(np.uint8)
        img = cv2.LUT(img, lut)
    if aug.noise_p > 0 and rng.random() < aug.noise_p:
        sigma = float(np.sqrt(rng.uniform(aug.noise_var_min, aug.noise_var_max)))
        noisy = rng.standard_normal(img.shape, dtype=np.float32)
        noisy *= sigma
        noisy += img
        img = np.clip(np.rint(noisy, out=noisy), 0, 255, out=noisy).astype(np.uint8)
    if aug.dropout_p > 0 and rng.random() < aug.dropout_p:
        img = coarse_dropout(img, aug.dropout_holes, aug.dropout_size, rng)
    return img


def coarse_dropout(img: np.ndarray, holes: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """`holes` squares of side round(size x image side) (at least 1 px) set to 0, each at a
    uniformly drawn position wholly inside the image (they may overlap)."""
    h, w = img.shape
    sh, sw = max(1, min(h, round(size * h))), max(1, min(w, round(size * w)))
    ys = rng.integers(0, h - sh + 1, size=holes)
    xs = rng.integers(0, w - sw + 1, size=holes)
    img = img.copy()
    for y0, x0 in zip(ys, xs):
        img[y0:y0 + sh, x0:x0 + sw] = 0
    return img


class CacheDataset(Dataset):
    """Samples of cache rows: (uint8 tensor (1, S, S), float32 targets (C,), row).

    `images_path` is the cache's images.npy; each process opens it itself on first use and
    reads one row per sample (cxrlt.data.rowfile.RowFile).
    `targets` may be None (test rows): then a zero vector of length `num_classes` is returned.
    """

    def __init__(self, images_path, rows, targets=None, num_classes=0, aug: AugConfig | None = None, seed: int = 0):
        self.images_path = str(images_path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)
        if self.targets is not None and len(self.targets) != len(self.rows):
            raise ValueError("targets and rows differ in length")
        self.num_classes = self.targets.shape[1] if self.targets is not None else num_classes
        self.aug = None if (aug is None or aug.is_identity) else aug
        self.seed = seed
        self.epoch = 0
        self._images = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def images(self):
        if self._images is None:
            from cxrlt.data.rowfile import RowFile

            self._images = RowFile(self.images_path)
        return self._images

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None  # each worker opens the file itself
        return state

    def __getitem__(self, i):
        i, epoch = i if isinstance(i, tuple) else (i, self.epoch)  # (position, epoch) from EpochTagged
        row = int(self.rows[i])
        img = self.images[row]  # a fresh (writable) array
        if self.aug is not None:
            rng = np.random.default_rng([self.seed, epoch, row])
            img = augment(img, self.aug, rng)
        x = torch.from_numpy(np.ascontiguousarray(img)).unsqueeze(0)
        y = torch.from_numpy(self.targets[i]) if self.targets is not None else torch.zeros(self.num_classes)
        return x, y, row


class WeightedConcat(Dataset):
    """Several CacheDatasets as one, each sample with its part's weight: (x, y, weight) (the
    weight replaces the row of CacheDataset). Real labels weigh 1, soft pseudo-labels less."""

    def __init__(self, parts):
        self.parts = [(ds, float(w)) for ds, w in parts]
        self.starts = np.cumsum([0] + [len(ds) for ds, _ in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def set_epoch(self, epoch: int) -> None:
        for ds, _ in self.parts:
            ds.set_epoch(epoch)

    def __getitem__(self, i):
        i, epoch = i if isinstance(i, tuple) else (i, None)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        ds, w = self.parts[k]
        j = i - int(self.starts[k])
        x, y, _row = ds[j if epoch is None else (j, epoch)]
        return x, y, torch.tensor(w, dtype=torch.float32)


PREFETCH_FACTOR = 4  # batches each worker keeps ready (in /dev/shm: see make_loader)


def worker_init(_worker_id: int) -> None:
    """Loader workers are already one process per core: OpenCV's own thread pool in each of
    them would oversubscribe the cores (torch's pool is set to one thread by the DataLoader)."""
    cv2.setNumThreads(1)


class EpochTagged:
    """A sampler whose positions carry its epoch: yields (position, epoch) for the dataset's
    __getitem__, so that loader workers kept alive from epoch to epoch (persistent_workers) draw
    the augmentation of the current epoch without being told (the sampler runs in the main
    process; the workers' copies of the dataset keep the epoch they started with)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = int(self.sampler.epoch)
        return ((int(i), epoch) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def make_loader(dataset, batch_size, sampler=None, shuffle=False, workers=2, drop_last=False, pin_memory=False,
                persistent: bool = False):
    """A DataLoader over `dataset`. Workers hand batches over in shared memory (/dev/shm):
    up to PREFETCH_FACTOR x workers batches at once, each batch_size x S x S bytes (uint8).
    persistent: the workers live as long as the loader (no fork per epoch); a loader that is
    iterated again in another epoch then needs an EpochTagged sampler (or no augmentation)."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
        num_workers=workers, drop_last=drop_last, pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
        worker_init_fn=worker_init if workers > 0 else None,
    )
