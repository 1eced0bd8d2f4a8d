"""Image decoding/windowing/resizing (cxrlt.imaging) and the image cache (cxrlt.cache, preprocess.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import cxrlt.cache as cache_mod
from cxrlt.cache import build_cache, open_cache
from cxrlt.errors import InputError
from cxrlt.imaging import ImageReadError, apply_window, load_for_cache, read_image, resize_square, window_limits

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["Normal", "Mass", "Hernia"]
SIZE = 16


# ---- fixtures ----------------------------------------------------------------------------------


def smooth_u16(rng, h=40, w=52) -> np.ndarray:
    """A non-constant 16-bit image with a few extreme pixels (like burnt-in text)."""
    base = cv2.resize(rng.random((5, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(base * 3000 + 500, 0, 65535).astype(np.uint16)
    img[rng.integers(0, h, 3), rng.integers(0, w, 3)] = 65535
    return img


def make_dataset(root: Path, n_train=12, n_test=3, seed=0) -> dict:
    """Write 16-bit PNGs + train/test/removal CSVs. Removal lists 2 train images and 1 test image."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    ids = [f"{100 + i}_x{i}.png" for i in range(n_train + n_test)]
    for iid in ids:
        cv2.imwrite(str(img_dir / iid), smooth_u16(rng))
    y = rng.integers(0, 2, (n_train, len(LABELS)))
    y[:, 1] = 0
    y[[1, 6], 1] = 1  # a rare label
    lines = ["ImageID,StudyDate_DICOM,PatientID," + ",".join(LABELS)]
    lines += [f"{ids[i]},2016010{i % 9},{1 + i % 5}.90E+38," + ",".join(map(str, y[i])) for i in range(n_train)]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "test.csv").write_text("ImageID,StudyDate_DICOM,PatientID" + "," * 30 + "\n" + "".join(
        f"{iid},20200101,0{j}.5E+38" + "," * 30 + "\n" for j, iid in enumerate(ids[n_train:])))
    (root / "removal.csv").write_text(f"ImageID\n{ids[3]}\n{ids[8]}\n{ids[n_train]}\n")
    return {"train_csv": root / "train.csv", "image_dir": img_dir, "test_csv": root / "test.csv",
            "removal_csv": root / "removal.csv", "ids": ids, "y": y}


@pytest.fixture
def ds(tmp_path):
    return make_dataset(tmp_path / "data")


def build(ds, out, image_dir=None, **kw):
    args = dict(size=SIZE, test_csv=ds["test_csv"], removal_csv=ds["removal_csv"], folds=3, seed=0, workers=1)
    args.update(kw)
    return build_cache(ds["train_csv"], image_dir or ds["image_dir"], out, **args)


# ---- imaging -------------------------------------------------------------------------------------


def test_window_limits_are_exact_percentiles_of_the_strided_sample():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4096, (103, 77)).astype(np.uint16)
    sample = img[::4, ::4]
    lo, hi = window_limits(img, 0.5, 99.5, stride=4)
    assert lo == np.percentile(sample, 0.5, method="lower")
    assert hi == np.percentile(sample, 99.5, method="higher")


def window(img, low=0.5, high=99.5, stride=4):
    """16-bit -> uint8 as the cache does it (limits from the image, then the linear map)."""
    return apply_window(img, *window_limits(img, low, high, stride))


def test_16bit_window_maps_known_percentiles_to_0_and_255():
    img = np.arange(1000, dtype=np.uint16).reshape(40, 25) + 20000  # values 20000..20999, each once
    lo, hi = window_limits(img, 1, 99, stride=1)
    assert (lo, hi) == (20009, 20990)  # sorted[floor(.01*999)], sorted[ceil(.99*999)]
    out = window(img, 1, 99, stride=1)
    assert out.dtype == np.uint8 and out.shape == img.shape
    flat = out.ravel()
    assert (flat[:10] == 0).all() and (flat[990:] == 255).all()  # clipped tails
    assert flat[9] == 0 and flat[990] == 255
    mid = (20009 + 20990) / 2 - 20000
    assert abs(int(flat[int(mid)]) - 128) <= 1
    assert (np.diff(flat.astype(int)) >= 0).all()  # monotone


def test_8bit_passes_through_unchanged(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    assert (load_for_cache(tmp_path / "a.png", SIZE) == img).all()


def test_inverted_input_gives_inverted_output():
    img = smooth_u16(np.random.default_rng(2))
    a = window(img).astype(int)
    b = window((65535 - img).astype(np.uint16)).astype(int)
    assert np.abs((255 - a) - b).max() <= 1  # rounding ties only


def test_flat_and_nearly_flat_images():
    flat = np.full((30, 30), 1234, dtype=np.uint16)
    assert (window(flat) == 0).all()
    assert (apply_window(flat, 5, 5) == 0).all()
    nearly = flat.copy()
    nearly[0, 0] = 3000  # below the 99.5th percentile: falls back to min/max, no division by zero
    out = window(nearly, stride=1)
    assert out[0, 0] == 255 and out[1, 1] == 0


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_colour_images_become_gray(tmp_path, channels, dtype):
    gray = (np.random.default_rng(3).integers(0, 200, (20, 24)) * (1 if dtype == np.uint8 else 300)).astype(dtype)
    img = np.dstack([gray] * 3 + ([np.full_like(gray, 7)] if channels == 4 else []))
    cv2.imwrite(str(tmp_path / "c.png"), img)
    out = read_image(tmp_path / "c.png")
    assert out.ndim == 2 and out.dtype == dtype
    assert np.abs(out.astype(int) - gray.astype(int)).max() <= 1


def test_resize_square_squashes_and_averages():
    const = np.full((50, 70), 321, dtype=np.uint16)
    out = resize_square(const, SIZE)
    assert out.shape == (SIZE, SIZE) and (out == 321).all()
    blocks = np.kron(np.arange(16, dtype=np.uint16).reshape(4, 4) * 100, np.ones((2, 2), np.uint16))
    blocks[0, 0] += 4  # a 2x2 box average of (4, 0, 0, 0) -> +1
    down = resize_square(blocks, 4)
    assert down[0, 0] == 1 and (down.ravel()[1:] == (np.arange(16) * 100)[1:]).all()
    up = resize_square(np.zeros((10, 10), np.uint8), 20)
    assert up.shape == (20, 20)
    big = smooth_u16(np.random.default_rng(4), 250, 200)
    exact = cv2.resize(big, (48, 48), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(resize_square(big, 48).astype(int) - exact).mean() < 0.01 * np.ptp(exact)


def test_load_for_cache_shape_and_dtype(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), smooth_u16(np.random.default_rng(5), 90, 70))
    out = load_for_cache(tmp_path / "a.png", 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def _bad_files(tmp_path) -> dict:
    good = smooth_u16(np.random.default_rng(6))
    cv2.imwrite(str(tmp_path / "ok.png"), good)
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image\n")
    cv2.imwrite(str(tmp_path / "tiny.png"), good[:4, :4])
    cv2.imwrite(str(tmp_path / "ok.jpg"), (good // 256).astype(np.uint8))
    jpg = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(jpg[:-40])
    return {"missing.png": "not found", "empty.png": "empty", "trunc.png": "not a readable image",
            "text.png": "not a readable image", "tiny.png": "only 4x4", "trunc.jpg": "truncated JPEG"}


def test_bad_image_files_raise_input_errors(tmp_path):
    for name, reason in _bad_files(tmp_path).items():
        with pytest.raises(ImageReadError, match=reason) as e:
            read_image(tmp_path / name)
        assert isinstance(e.value, InputError) and str(tmp_path / name) in str(e.value)
    assert read_image(tmp_path / "ok.jpg").dtype == np.uint8


# ---- the cache -----------------------------------------------------------------------------------


def test_cache_layout_index_and_removal(ds, tmp_path):
    out = tmp_path / "cache"
    m = build(ds, out)
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "index.csv", "labels.txt", "manifest.json"]
    assert not (tmp_path / "cache.partial").exists()
    ids = ds["ids"]
    idx = pd.read_csv(out / "index.csv", dtype=str, keep_default_na=False)
    assert list(idx.columns) == ["row", "ImageID", "StudyDate_DICOM", "PatientID", "split", "fold", *LABELS]
    train_ids = [iid for i, iid in enumerate(ids[:12]) if i not in (3, 8)]
    assert idx["ImageID"].tolist() == train_ids + ids[12:]  # removal drops train rows only, order kept
    assert idx["row"].tolist() == [str(i) for i in range(len(idx))]
    assert idx["split"].tolist() == ["train"] * 10 + ["test"] * 3
    assert idx["PatientID"].iloc[0] == "1.90E+38" and idx["PatientID"].iloc[10] == "00.5E+38"
    assert set(idx["fold"][:10]) == {"0", "1", "2"} and (idx["fold"][10:] == "-1").all()
    assert (idx.loc[10:, LABELS] == "").all().all()
    keep = [i for i in range(12) if i not in (3, 8)]
    assert (idx.loc[:9, LABELS].astype(int).to_numpy() == ds["y"][keep]).all()
    assert (out / "labels.txt").read_text() == "Normal\nMass\nHernia\n"

    images = np.load(out / "images.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape == (13, SIZE, SIZE)
    for row, iid in [(0, ids[0]), (9, train_ids[9]), (12, ids[14])]:
        assert (images[row] == load_for_cache(ds["image_dir"] / iid, SIZE)).all()

    c = m["counts"]
    assert (c["train"], c["test"], c["removed"], c["failed"]) == (10, 3, 2, 0)
    assert c["positives"] == {lab: int(ds["y"][keep][:, j].sum()) for j, lab in enumerate(LABELS)}
    assert sum(c["fold_sizes"]) == 10 and m["labels"] == LABELS and m["size"] == SIZE
    assert m["sources"]["train_csv"]["bytes"] == os.path.getsize(ds["train_csv"])
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == m["fingerprint"]


def test_open_cache_helpers(ds, tmp_path):
    build(ds, tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    assert cache.labels == LABELS and cache.size == SIZE
    assert cache.index["PatientID"].dtype == object and cache.index["PatientID"].iloc[0] == "1.90E+38"
    train, test = cache.rows("train"), cache.rows("test")
    assert train.tolist() == list(range(10)) and test.tolist() == [10, 11, 12]
    for f in range(3):
        val, rest = cache.rows("train", fold=f), cache.rows("train", exclude_fold=f)
        assert len(val) > 0 and sorted(np.concatenate([val, rest]).tolist()) == train.tolist()
    keep = [i for i in range(12) if i not in (3, 8)]
    t = cache.targets(train[::-1])
    assert t.dtype == np.float32 and (t == ds["y"][keep][::-1]).all()
    assert np.isnan(cache.targets(test)).all()


def test_open_cache_missing_or_incomplete(tmp_path):
    with pytest.raises(InputError, match="run preprocess.py"):
        open_cache(tmp_path / "nothing")
    (tmp_path / "c.partial").mkdir()
    with pytest.raises(InputError, match=r"interrupted build .*c\.partial"):
        open_cache(tmp_path / "c")


def test_finished_cache_is_reused_and_rebuilt_when_inputs_change(ds, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cache"
    first = build(ds, out)

    def fail(*a, **k):
        raise AssertionError("should not decode")

    with monkeypatch.context() as m:
        m.setattr(cache_mod, "load_for_cache", fail)
        again = build(ds, out)
    assert again["fingerprint"] == first["fingerprint"] and "up to date" in capsys.readouterr().out
    text = ds["train_csv"].read_text().replace(",1.90E+38,", ",7.77E+38,", 1)
    ds["train_csv"].write_text(text)
    build(ds, out)
    assert open_cache(out).index["PatientID"].iloc[0] == "7.77E+38"


def _run_slow_build_and_kill(ds, out: Path, min_done: int) -> int:
    """Start build_cache in a subprocess (slowed down, flushing after every chunk), SIGKILL it
    once `min_done` rows are recorded as done; -> rows done at the kill."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import cxrlt.cache as c
c.FLUSH_SECONDS = 0
orig = c.load_for_cache
def slow(*a, **k):
    time.sleep(0.15)
    return orig(*a, **k)
c.load_for_cache = slow
c.build_cache({str(ds['train_csv'])!r}, {str(ds['image_dir'])!r}, {str(out)!r}, size={SIZE},
              test_csv={str(ds['test_csv'])!r}, removal_csv={str(ds['removal_csv'])!r}, folds=3, workers=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_path = out.with_name(out.name + ".partial") / "done.npy"
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if np.load(done_path).sum() >= min_done:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, f"build finished or failed before the kill: {proc.stderr.read()!r}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return int(np.load(done_path).sum())


def test_resume_after_sigkill_matches_an_uninterrupted_build(ds, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    build(ds, ref)
    out = tmp_path / "cache"
    n_done = _run_slow_build_and_kill(ds, out, min_done=4)
    assert 4 <= n_done < 13
    assert not out.exists()  # nothing at the final path until complete

    calls = []
    orig = cache_mod.load_for_cache
    monkeypatch.setattr(cache_mod, "load_for_cache", lambda p, *a, **k: calls.append(p) or orig(p, *a, **k))
    m = build(ds, out)
    assert len(calls) == 13 - n_done  # finished rows were not redone
    assert m["reused_rows"] == n_done
    assert (out / "images.npy").read_bytes() == (ref / "images.npy").read_bytes()
    assert (out / "index.csv").read_bytes() == (ref / "index.csv").read_bytes()
    assert not (out / "done.npy").exists() and not out.with_name("cache.partial").exists()


def test_two_workers_give_the_same_cache(ds, tmp_path):
    build(ds, tmp_path / "one", workers=1)
    m = build(ds, tmp_path / "two", workers=2)
    assert m["workers"] == 2
    assert (tmp_path / "one/images.npy").read_bytes() == (tmp_path / "two/images.npy").read_bytes()


def test_bad_image_stops_with_context_then_skip_bad_reports(ds, tmp_path, capsys):
    (ds["image_dir"] / ds["ids"][5]).write_bytes(b"\x89PNG garbage")
    (ds["image_dir"] / ds["ids"][13]).write_bytes(b"")
    out = tmp_path / "cache"
    with pytest.raises(InputError) as e:
        build(ds, out)
    msg = str(e.value)
    assert ds["ids"][5] in msg and "row 7 of" in msg and str(ds["image_dir"] / ds["ids"][5]) in msg
    assert "--skip-bad" in msg and not out.exists()

    m = build(ds, out, skip_bad=True)
    failed = {f["ImageID"]: f for f in m["failures"]}
    assert set(failed) == {ds["ids"][5], ds["ids"][13]} and m["counts"]["failed"] == 2
    assert "empty" in failed[ds["ids"][13]]["reason"] and failed[ds["ids"][5]]["csv_row"] == 7
    assert m["reused_rows"] > 0  # the rows done before the stop were kept
    err = capsys.readouterr().err
    assert "2 image(s) could not be used" in err and ds["ids"][5] in err
    cache = open_cache(out)
    assert ds["ids"][5] not in set(cache.index["ImageID"]) and len(cache.index) == 11
    assert cache.images.shape[0] == 13 and (cache.images[4] == 0).all()  # not compacted: row 4 unused
    assert 4 not in cache.index["row"].tolist()


def test_missing_images_are_reported_before_decoding(ds, tmp_path):
    (ds["image_dir"] / ds["ids"][2]).unlink()
    with pytest.raises(InputError, match=rf"not found.*{ds['ids'][2]}.*row 4 of"):
        build(ds, tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="none of the 13 images was found.*--image-dir"):
        build(ds, tmp_path / "cache", image_dir=tmp_path / "empty")


def test_images_in_subfolders_are_found(ds, tmp_path):
    sub = ds["image_dir"] / "7"
    sub.mkdir()
    os.replace(ds["image_dir"] / ds["ids"][0], sub / ds["ids"][0])
    build(ds, tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    assert (cache.images[0] == load_for_cache(sub / ds["ids"][0], SIZE)).all()


def test_test_image_in_training_csv_is_an_error(ds, tmp_path):
    with pytest.raises(InputError, match=r"also in .*train\.csv.*--removal-csv"):
        build(ds, tmp_path / "cache", test_csv=ds["train_csv"], removal_csv=None)


def test_train_only_cache_and_foreign_out_dir(ds, tmp_path):
    m = build(ds, tmp_path / "cache", test_csv=None)
    assert m["counts"]["test"] == 0 and len(open_cache(tmp_path / "cache").rows("test")) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not part of an image cache"):
        build(ds, foreign)


def test_cli_bad_input_exits_2_with_one_line(ds, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(ds["train_csv"].read_text().replace(",0\n", ",2\n", 1))
    p = subprocess.run([sys.executable, "preprocess.py", "--train-csv", str(bad), "--image-dir",
                        str(ds["image_dir"]), "--size", str(SIZE), "--out", str(tmp_path / "c")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
    assert "label values must be 0 or 1" in lines[0] and "'2'" in lines[0]
