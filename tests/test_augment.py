"""Training augmentations (cxrlt/data/dataset.py) and label mixing (cxrlt/training/mixing.py)."""

import cv2
import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from cxrlt.core import config
from cxrlt.core.errors import ConfigError
from cxrlt.data.dataset import AugConfig, CacheDataset, apply_clahe, augment
from cxrlt.training.mixing import Mixer, mix

OFF = dict(hflip=0.0, rotate=0.0, scale=0.0, translate=0.0, brightness=0.0, contrast=0.0)
# every augmentation on, each with probability 1
ALL_ON = dict(hflip=0.5, rotate=7.0, scale=0.05, translate=0.03, brightness=0.08, contrast=0.08, affine_p=1.0,
              color_p=1.0, clahe_p=1.0, noise_p=1.0, dropout_p=1.0, dropout_size=0.1)


def _image(size=64, seed=0):
    """A smooth image with structure (CLAHE and the warp change it), no saturated pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 90 + 60 * np.sin(6 * x) * np.cos(4 * y) + rng.normal(0, 8, (size, size))
    return np.clip(img, 20, 235).astype(np.uint8)


def _dataset(tmp_path, aug, n=4, seed=3):
    imgs = np.stack([_image(seed=i) for i in range(n)])
    np.save(tmp_path / "images.npy", imgs)
    return CacheDataset(tmp_path / "images.npy", np.arange(n), np.zeros((n, 2)), aug=aug, seed=seed)


def test_same_seed_epoch_row_same_pixels_another_row_or_epoch_other_pixels(tmp_path):
    ds = _dataset(tmp_path, AugConfig(**ALL_ON))
    a = ds[1][0].numpy()
    assert np.array_equal(a, ds[1][0].numpy())  # same (seed, epoch, row): the same pixels
    again = CacheDataset(tmp_path / "images.npy", np.arange(4), np.zeros((4, 2)), aug=AugConfig(**ALL_ON), seed=3)
    assert np.array_equal(a, again[1][0].numpy())  # another dataset object (another worker, a resume)
    # another row: other augmentation draws (rows 1 and 2 hold the same image here)
    np.save(tmp_path / "images.npy", np.stack([_image(seed=0)] * 4))
    same = CacheDataset(tmp_path / "images.npy", np.arange(4), np.zeros((4, 2)), aug=AugConfig(**ALL_ON), seed=3)
    assert not np.array_equal(same[1][0].numpy(), same[2][0].numpy())
    e0 = same[1][0].numpy()
    same.set_epoch(1)
    assert not np.array_equal(e0, same[1][0].numpy())  # another epoch: other draws
    other_seed = CacheDataset(tmp_path / "images.npy", np.arange(4), np.zeros((4, 2)), aug=AugConfig(**ALL_ON), seed=4)
    assert not np.array_equal(e0, other_seed[1][0].numpy())


def test_the_defaults_of_the_new_keys_keep_the_old_pixels():
    """Defaults (affine_p = color_p = 1, the rest 0) take exactly the draws of the flip / rotate /
    zoom / shift / brightness / contrast augmentation: today's runs see the same images."""
    img = _image()
    aug = AugConfig()  # today's defaults
    for s in range(5):
        rng = np.random.default_rng([0, 0, s])
        flip = rng.random() < aug.hflip
        angle, zoom = rng.uniform(-aug.rotate, aug.rotate), 1 + rng.uniform(-aug.scale, aug.scale)
        tx, ty = rng.uniform(-aug.translate, aug.translate, size=2) * 64
        alpha, beta = 1 + rng.uniform(-aug.contrast, aug.contrast), rng.uniform(-aug.brightness, aug.brightness) * 255
        m = cv2.getRotationMatrix2D((32.0, 32.0), angle, zoom)
        if flip:
            m = m @ np.array([[-1.0, 0, 63], [0, 1, 0], [0, 0, 1]])
        m[:, 2] += (tx, ty)
        want = cv2.warpAffine(img, m, (64, 64), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        lut = np.clip((np.arange(256, dtype=np.float32) - 127.5) * alpha + 127.5 + beta, 0, 255).astype(np.uint8)
        want = cv2.LUT(want, lut)
        assert np.array_equal(augment(img, aug, np.random.default_rng([0, 0, s])), want)


@pytest.mark.parametrize("on, off", [
    (dict(hflip=1.0), dict(hflip=0.0)),
    (dict(rotate=7.0, scale=0.05, translate=0.03, affine_p=1.0), dict(rotate=7.0, scale=0.05, translate=0.03, affine_p=0.0)),
    (dict(brightness=0.08, contrast=0.08, color_p=1.0), dict(brightness=0.08, contrast=0.08, color_p=0.0)),
    (dict(clahe_p=1.0), dict(clahe_p=0.0)),
    (dict(noise_p=1.0), dict(noise_p=0.0)),
    (dict(dropout_p=1.0), dict(dropout_p=0.0)),
])
def test_each_augmentation_changes_pixels_at_p_1_and_not_at_p_0(on, off):
    img = _image()
    for s in range(5):
        assert not np.array_equal(augment(img, AugConfig(**{**OFF, **on}), np.random.default_rng(s)), img)
        assert np.array_equal(augment(img, AugConfig(**{**OFF, **off}), np.random.default_rng(s)), img)
    assert AugConfig(**{**OFF, **off}).is_identity and not AugConfig(**{**OFF, **on}).is_identity


def test_a_gate_of_0_4_applies_about_40_percent_of_the_time():
    img = _image()
    aug = AugConfig(**{**OFF, "rotate": 7.0, "affine_p": 0.4})
    changed = [not np.array_equal(augment(img, aug, np.random.default_rng(s)), img) for s in range(400)]
    assert 0.3 < np.mean(changed) < 0.5


def test_clahe_is_opencvs():
    img = _image()
    want = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(img)
    assert np.array_equal(apply_clahe(img, 2.0, 8), want)
    # in augment: clip drawn from [1, clahe_clip]; with clahe_clip 1 it is exactly 1
    one = cv2.createCLAHE(clipLimit=1.0, tileGridSize=(4, 4)).apply(img)
    got = augment(img, AugConfig(**OFF, clahe_p=1.0, clahe_clip=1.0, clahe_tiles=4), np.random.default_rng(0))
    assert np.array_equal(got, one)


def test_noise_has_the_drawn_variance_and_dropout_makes_its_holes():
    img = np.full((128, 128), 128, np.uint8)
    noisy = augment(img, AugConfig(**OFF, noise_p=1.0, noise_var_min=4.0, noise_var_max=4.0),
                    np.random.default_rng(0)).astype(np.float64)
    assert noisy.var() == pytest.approx(4.0 + 1 / 12, rel=0.1)  # + the rounding's variance
    assert abs(noisy.mean() - 128) < 0.1
    holes = augment(img, AugConfig(**OFF, dropout_p=1.0, dropout_holes=1, dropout_size=0.25), np.random.default_rng(0))
    zero = np.argwhere(holes == 0)
    assert len(zero) == 32 * 32 and np.ptp(zero[:, 0]) == 31 and np.ptp(zero[:, 1]) == 31  # one 32 x 32 square
    assert (holes[holes != 0] == 128).all()


def test_config_keys_reach_the_augmentation_and_default_off():
    cfg = tiny_cfg(aug_clahe_p=0.2, aug_noise_p=0.15, aug_dropout_p=0.15, aug_affine_p=0.4, aug_color_p=0.2)
    aug = AugConfig.from_config(cfg)
    assert (aug.clahe_p, aug.noise_p, aug.dropout_p, aug.affine_p, aug.color_p) == (0.2, 0.15, 0.15, 0.4, 0.2)
    d = AugConfig.from_config(config.DEFAULTS)
    assert (d.clahe_p, d.noise_p, d.dropout_p, d.affine_p, d.color_p) == (0.0, 0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="variance"):
        config.resolve([], {"aug_noise_var_min": 6.0})


# ---- mixup / cutmix ------------------------------------------------------------------------------
def _batch(n=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), (torch.rand(n, c, generator=g) < 0.4).float()


def test_mixup_mixes_images_and_labels_by_one_lambda():
    x, y = _batch()
    m = Mixer(mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0, seed=1)
    d = m.draw(0, 0, 8, 16, 16)
    lam, perm = d["lam"], torch.as_tensor(d["perm"])
    assert d["kind"] == "mixup" and 0 < lam < 1 and sorted(d["perm"]) == list(range(8))
    xm, ym = m(x, y, 0, 0)
    assert torch.allclose(ym, lam * y + (1 - lam) * y[perm])  # the convex combination of the two label vectors
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm])
    assert ((ym > 0) & (ym < 1)).any()  # soft targets
    # deterministic per (seed, epoch, batch); another batch or epoch draws anew
    assert torch.equal(m(x, y, 0, 0)[1], ym)
    assert not torch.equal(m(x, y, 0, 1)[1], ym) and not torch.equal(m(x, y, 1, 0)[1], ym)


def test_cutmix_pastes_a_box_and_lambda_is_the_own_area():
    x, y = _batch()
    m = Mixer(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, seed=2)
    for b in range(10):
        d = m.draw(0, b, 8, 16, 16)
        y0, y1, x0, x1 = d["box"]
        assert d["kind"] == "cutmix" and d["lam"] == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 256)
        xm, ym = m(x, y, 0, b)
        perm = torch.as_tensor(d["perm"])
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(xm[..., inside], x[perm][..., inside]) and torch.equal(xm[..., ~inside], x[..., ~inside])
        assert torch.allclose(ym, d["lam"] * y + (1 - d["lam"]) * y[perm])


def test_mix_prob_and_both_kinds():
    m = Mixer(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.5, seed=0)
    draws = [m.draw(0, b, 8, 16, 16) for b in range(400)]
    assert 0.4 < np.mean([d is None for d in draws]) < 0.6
    kinds = [d["kind"] for d in draws if d is not None]
    assert 0.35 < np.mean([k == "cutmix" for k in kinds]) < 0.65
    assert Mixer.from_config(tiny_cfg()) is None  # off by default
    x, y = _batch()
    off = Mixer(0.4, 0.0, 0.0, 0)
    assert off(x, y, 0, 0)[1] is y


def test_unannotated_targets_stay_masked_where_either_image_lacks_them():
    x, y = _batch()
    y[0, 1] = float("nan")
    d = Mixer(0.4, 0.0, 1.0, 0).draw(0, 0, 8, 16, 16)
    _, ym = mix(x, y, d)
    j = int(np.flatnonzero(d["perm"] == 0)[0])  # the image mixed with image 0's labels
    assert torch.isnan(ym[0, 1]) and torch.isnan(ym[j, 1]) and torch.isnan(ym).sum() == (2 if j != 0 else 1)


@pytest.mark.parametrize("loss", ["ldam", "db"])
def test_mixing_is_refused_with_a_loss_that_takes_hard_labels_only(loss):
    with pytest.raises(ConfigError, match="mixed .soft. labels"):
        config.resolve([], {"loss": loss, "mixup_alpha": 0.2})
    with pytest.raises(ConfigError, match="mixed .soft. labels"):
        config.resolve([], {"loss": loss, "cutmix_alpha": 1.0})
    for ok in ("bce", "bce_pw", "focal", "asl", "cb"):
        config.resolve([], {"loss": ok, "mixup_alpha": 0.2, "cutmix_alpha": 1.0})


def test_the_trainer_feeds_mixed_labels_to_the_loss(demo_cache, tmp_path):
    from cxrlt.training.trainer import Trainer

    seen = {}
    for name, kw in (("plain", {}), ("mixed", {"mixup_alpha": 0.4, "cutmix_alpha": 1.0})):
        tr = Trainer(tiny_cfg(epochs=1, max_train_batches=3, **kw), str(demo_cache), str(tmp_path / name))
        targets = []
        forward = tr.loss_fn.forward
        tr.loss_fn.forward = lambda z, y, mask=None, f=forward: (targets.append(y.clone()), f(z, y, mask))[1]
        tr.train_epoch(0)
        seen[name] = torch.cat(targets)
    assert set(seen["plain"].unique().tolist()) <= {0.0, 1.0}
    assert ((seen["mixed"] > 0) & (seen["mixed"] < 1)).any()
