"""Image decoding/windowing/resizing (cxrlt.data.imaging) and the image caches (cxrlt.data.cache, cxrlt.data.cache_build,
preprocess.py): layout, the Cache API, reuse of pixels between the caches of a root, resume, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import cxrlt.data.decode_worker as decode_mod
from cxrlt.data import identity
from cxrlt.data.cache import open_cache
from cxrlt.data.cache_build import build_test_cache, build_train_cache
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import output_lock
from cxrlt.data.imaging import ImageReadError, apply_window, load_for_cache, read_image, resize_square, window_limits

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


def build(ds, root, image_dir=None, **kw) -> dict:
    """The train cache root/train (Removal.csv applied, 3 folds) -> its manifest."""
    args = dict(removal_csv=ds["removal_csv"], folds=3, seed=0, workers=1)
    args.update(kw)
    return build_train_cache(ds["train_csv"], image_dir or ds["image_dir"], root / "train", SIZE, **args)


def build_test(ds, root, test_csv=None, **kw) -> Path:
    """The test cache of `test_csv` (default: the dataset's) in root/test-<key> -> its folder."""
    test_csv = test_csv or ds["test_csv"]
    out = root / f"test-{identity.test_cache_key(test_csv)}"
    build_test_cache(test_csv, kw.pop("image_dir", ds["image_dir"]), out, SIZE, **{"workers": 1, **kw})
    return out


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The file names decoded in this process from now on (workers=1 decodes in-process)."""
    calls = []
    orig = decode_mod.load_for_cache
    monkeypatch.setattr(decode_mod, "load_for_cache",
                        lambda p, *a, **k: calls.append(os.path.basename(p)) or orig(p, *a, **k))
    return calls


def inode(path: Path) -> int:
    return path.stat().st_ino


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
    (tmp_path / "cut_marked.jpg").write_bytes(jpg[: len(jpg) // 2] + b"\xff\xd9")  # cut, end marker appended
    return {"missing.png": "not found", "empty.png": "empty", "trunc.png": "not a readable image",
            "text.png": "not a readable image", "tiny.png": "only 4x4", "trunc.jpg": "truncated JPEG",
            "cut_marked.jpg": "damaged JPEG data"}


def test_bad_image_files_raise_input_errors(tmp_path):
    for name, reason in _bad_files(tmp_path).items():
        with pytest.raises(ImageReadError, match=reason) as e:
            read_image(tmp_path / name)
        assert isinstance(e.value, InputError) and str(tmp_path / name) in str(e.value)
    assert read_image(tmp_path / "ok.jpg").dtype == np.uint8


# ---- the caches: layout and reading ----------------------------------------------------------------


def test_train_cache_layout_index_and_removal(ds, tmp_path):
    out = tmp_path / "train"
    m = build(ds, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "index.csv", "labels.txt", "manifest.json",
                                                    "sources.csv"]
    assert not (tmp_path / "train.partial").exists()
    ids = ds["ids"]
    idx = pd.read_csv(out / "index.csv", dtype=str, keep_default_na=False)
    assert list(idx.columns) == ["row", "ImageID", "StudyDate_DICOM", "PatientID", "study", "patient", "projection",
                                 "centre", "split", "fold", *LABELS]
    keep = [i for i in range(12) if i not in (3, 8)]
    assert idx["ImageID"].tolist() == [ids[i] for i in keep]  # removal drops its rows, order kept
    assert idx["row"].tolist() == [str(i) for i in range(10)] and (idx["split"] == "train").all()
    assert idx["PatientID"].iloc[0] == "1.90E+38" and idx["patient"].iloc[0] == "1.90E+38"
    assert idx["study"].iloc[0] == "1.90E+38|20160100"  # not PadChest-shaped IDs: patient|date
    assert (idx["projection"] == "").all() and set(idx["fold"]) == {"0", "1", "2"}
    assert (idx["centre"] == "unknown").all()  # neither PadChest- nor NIH-shaped IDs
    assert (idx[LABELS].astype(int).to_numpy() == ds["y"][keep]).all()
    assert (out / "labels.txt").read_text() == "Normal\nMass\nHernia\n"

    images = np.load(out / "images.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape == (10, SIZE, SIZE)
    for row, i in [(0, 0), (9, keep[9])]:
        assert (images[row] == load_for_cache(ds["image_dir"] / ids[i], SIZE)).all()
    sources = pd.read_csv(out / "sources.csv", dtype={"ImageID": str})
    assert sources["ImageID"].tolist() == idx["ImageID"].tolist() and sources["row"].tolist() == list(range(10))
    assert sources["bytes"].iloc[0] == os.path.getsize(ds["image_dir"] / ids[0])

    c = m["counts"]
    assert (c["images"], c["removed"], c["failed"]) == (10, 2, 0) and sum(c["fold_sizes"]) == 10
    assert c["positives"] == {lab: int(ds["y"][keep][:, j].sum()) for j, lab in enumerate(LABELS)}
    assert m["labels"] == LABELS and m["pixels"]["size"] == SIZE and m["kind"] == "train"
    assert m["sources"]["train_csv"]["bytes"] == os.path.getsize(ds["train_csv"])
    assert json.loads((out / "manifest.json").read_text())["key"] == m["key"]


def test_test_cache_holds_every_listed_image_and_no_labels(ds, tmp_path):
    out = build_test(ds, tmp_path)
    assert out.name == f"test-{identity.test_cache_key(ds['test_csv'])}"
    idx = pd.read_csv(out / "index.csv", dtype=str, keep_default_na=False)
    assert list(idx.columns) == ["row", "ImageID", "StudyDate_DICOM", "PatientID", "study", "patient", "projection",
                                 "centre", "split", "fold"]
    assert idx["ImageID"].tolist() == ds["ids"][12:]  # the one in Removal.csv too: a test list is never cut
    assert (idx["split"] == "test").all() and (idx["fold"] == "-1").all()
    assert idx["PatientID"].iloc[0] == "00.5E+38" and (out / "labels.txt").read_text() == ""
    cache = open_cache(out)
    assert cache.labels == [] and cache.rows("test").tolist() == [0, 1, 2] and len(cache.rows("train")) == 0
    assert (cache.images[2] == load_for_cache(ds["image_dir"] / ds["ids"][14], SIZE)).all()


def test_open_cache_api(ds, tmp_path):
    build(ds, tmp_path)
    cache = open_cache(tmp_path / "train")
    assert cache.labels == LABELS and cache.size == SIZE and cache.images_path == tmp_path / "train/images.npy"
    assert cache.index["PatientID"].dtype == object and cache.index["PatientID"].iloc[0] == "1.90E+38"
    rows = cache.rows()
    assert rows.tolist() == list(range(10)) and cache.rows("train").tolist() == rows.tolist()
    for f in range(3):
        val, rest = cache.rows("train", fold=f), cache.rows(fold=None, exclude_fold=f)
        assert len(val) > 0 and sorted(np.concatenate([val, rest]).tolist()) == rows.tolist()
    keep = [i for i in range(12) if i not in (3, 8)]
    t = cache.targets(rows[::-1])
    assert t.dtype == np.float32 and (t == ds["y"][keep][::-1]).all()
    assert cache.ids(rows[[2, 0]]).tolist() == [ds["ids"][2], ds["ids"][0]]
    assert cache.patient_keys(rows[:1]).tolist() == ["1.90E+38"]
    assert cache.study_keys(rows[:2]).tolist() == ["1.90E+38|20160100", "2.90E+38|20160101"]
    assert cache.projections(rows[:1]).tolist() == [""] and not cache.has_projection
    assert cache.frontal(rows).all()  # projection unknown: every image counts as frontal
    assert len(cache.key) == 16 and cache.key == cache.manifest["key"]
    with pytest.raises(ValueError, match="out of range"):
        cache.ids([10])


def test_open_cache_missing_incomplete_or_old(ds, tmp_path):
    with pytest.raises(InputError, match="run preprocess.py"):
        open_cache(tmp_path / "nothing")
    (tmp_path / "c.partial").mkdir()
    with pytest.raises(InputError, match=r"interrupted build .*c\.partial"):
        open_cache(tmp_path / "c")
    build(ds, tmp_path)
    m = json.loads((tmp_path / "train/manifest.json").read_text())
    m["version"] = 1
    (tmp_path / "train/manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="another version of preprocess.py .*re-run preprocess.py"):
        open_cache(tmp_path / "train")


# ---- what a rebuild does ----------------------------------------------------------------------------


def test_unchanged_inputs_reuse_the_cache_and_touch_its_manifest(ds, tmp_path, decoded, capsys):
    first = build(ds, tmp_path)
    manifest = tmp_path / "train/manifest.json"
    os.utime(manifest, (1, 1))
    decoded.clear()
    again = build(ds, tmp_path)
    assert decoded == [] and again["key"] == first["key"] and "up to date" in capsys.readouterr().out
    assert manifest.stat().st_mtime > 1  # newer than its prerequisites again: Make settles


def test_label_fold_removal_and_meta_edits_decode_nothing(ds, tmp_path, decoded):
    first = build(ds, tmp_path)
    array = tmp_path / "train/images.npy"
    ino, n_decoded = inode(array), len(decoded)
    assert n_decoded == 10
    keys_seen = {first["key"]}

    ds["train_csv"].write_text(ds["train_csv"].read_text().replace(",1.90E+38,", ",7.77E+38,", 1))  # CSV edit
    m = build(ds, tmp_path)
    assert open_cache(tmp_path / "train").index["PatientID"].iloc[0] == "7.77E+38"
    keys_seen.add(m["key"])
    m = build(ds, tmp_path, folds=4)  # folds
    assert sum(m["counts"]["fold_sizes"]) == 10 and len(m["counts"]["fold_sizes"]) == 4
    keys_seen.add(m["key"])
    ds["removal_csv"].write_text(ds["removal_csv"].read_text() + f"{ds['ids'][0]}\n")  # one more removed
    m = build(ds, tmp_path, folds=4)
    assert m["counts"]["images"] == 9 and ds["ids"][0] not in set(open_cache(tmp_path / "train").index["ImageID"])
    keys_seen.add(m["key"])
    meta = tmp_path / "meta.csv"
    meta.write_text("ImageID,StudyID,PatientID,StudyDate_DICOM,Projection,ViewPosition_DICOM,Report\n"
                    f"{ds['ids'][1]},s1,EXACT1,20160101,L,LL,\"a, b\"\n")
    m = build(ds, tmp_path, folds=4, meta_csv=meta)  # metadata
    keys_seen.add(m["key"])
    cache = open_cache(tmp_path / "train")
    row = cache.rows()[cache.ids(cache.rows()) == ds["ids"][1]]
    assert cache.projections(row).tolist() == ["L"] and cache.patient_keys(row).tolist() == ["EXACT1"]
    assert cache.has_projection and not cache.frontal(row)[0]

    assert len(decoded) == n_decoded and m["linked"] and inode(array) == ino  # the very same array
    assert len(keys_seen) == 5  # every edit changes the content key
    images = np.load(array, mmap_mode="r")
    for row, iid in zip(cache.index["row"], cache.index["ImageID"]):
        assert (images[row] == load_for_cache(ds["image_dir"] / iid, SIZE)).all()


def test_removal_shrink_decodes_only_the_images_put_back(ds, tmp_path, decoded):
    build(ds, tmp_path)
    decoded.clear()
    ds["removal_csv"].write_text(f"ImageID\n{ds['ids'][8]}\n")  # ids[3] is a training image again
    m = build(ds, tmp_path)
    assert decoded == [ds["ids"][3]] and m["copied_rows"] == 10 and m["counts"]["images"] == 11
    ref = tmp_path / "ref"
    build(ds, ref)
    for name in ("images.npy", "index.csv", "sources.csv"):
        assert (tmp_path / "train" / name).read_bytes() == (ref / "train" / name).read_bytes(), name


def test_a_new_test_list_decodes_only_its_new_images_and_leaves_train_alone(ds, tmp_path, decoded):
    build(ds, tmp_path)
    old_test = build_test(ds, tmp_path)
    train_files = {p.name: (p.stat().st_mtime_ns, inode(p)) for p in (tmp_path / "train").iterdir()}
    decoded.clear()
    new_list = tmp_path / "phase2.csv"
    new_list.write_text(f"ImageID\n{ds['ids'][14]}\n{ds['ids'][8]}\n{ds['ids'][13]}\n")  # ids[8]: never decoded
    new_test = build_test(ds, tmp_path, new_list)
    assert new_test != old_test and (old_test / "manifest.json").exists()
    assert decoded == [ds["ids"][8]]
    assert {p.name: (p.stat().st_mtime_ns, inode(p)) for p in (tmp_path / "train").iterdir()} == train_files
    cache = open_cache(new_test)
    assert cache.ids(cache.rows()).tolist() == [ds["ids"][14], ds["ids"][8], ds["ids"][13]]
    for row, iid in zip(cache.index["row"], cache.index["ImageID"]):
        assert (cache.images[row] == load_for_cache(ds["image_dir"] / iid, SIZE)).all()


def test_another_image_dir_decodes_only_the_files_that_differ(ds, tmp_path, decoded):
    first = build(ds, tmp_path)
    moved = tmp_path / "moved_images"
    shutil.copytree(ds["image_dir"], moved)  # copy2: same bytes and mtime_ns
    decoded.clear()
    m = build(ds, tmp_path, image_dir=moved)
    assert decoded == [] and m["key"] == first["key"]
    cv2.imwrite(str(moved / ds["ids"][5]), smooth_u16(np.random.default_rng(99)))
    m = build(ds, tmp_path, image_dir=moved)
    assert decoded == [ds["ids"][5]] and m["key"] != first["key"]
    cache = open_cache(tmp_path / "train")
    row = cache.rows()[cache.ids(cache.rows()) == ds["ids"][5]]
    assert (cache.images[row[0]] == load_for_cache(moved / ds["ids"][5], SIZE)).all()


def test_cache_key_is_the_same_for_the_same_content_anywhere(ds, tmp_path):
    a = build(ds, tmp_path / "a")
    copy = make_dataset(tmp_path / "elsewhere")  # same seed: the same files, other paths and times
    b = build_train_cache(copy["train_csv"], copy["image_dir"], tmp_path / "b" / "train", SIZE,
                          removal_csv=copy["removal_csv"], folds=3, seed=0, workers=2)
    assert a["key"] == b["key"] and a["inputs_key"] != b["inputs_key"]


def test_another_size_in_the_same_root_reuses_nothing(ds, tmp_path, decoded):
    build_test(ds, tmp_path)
    decoded.clear()
    build_test_cache(ds["test_csv"], ds["image_dir"], tmp_path / "test-big", SIZE * 2, workers=1)
    assert len(decoded) == 3


# ---- resume, workers, locks -------------------------------------------------------------------------


def _run_slow_build_and_kill(ds, root: Path, min_done: int) -> int:
    """Start a train-cache build in a subprocess (slowed down, flushing after every image), SIGKILL
    it once `min_done` rows are recorded as done; -> rows done at the kill."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import cxrlt.data.cache_build as c, cxrlt.data.decode_worker as d
c.FLUSH_SECONDS = 0
orig = d.load_for_cache
def slow(*a, **k):
    time.sleep(0.15)
    return orig(*a, **k)
d.load_for_cache = slow
c.build_train_cache({str(ds['train_csv'])!r}, {str(ds['image_dir'])!r}, {str(root / 'train')!r}, {SIZE},
                    removal_csv={str(ds['removal_csv'])!r}, folds=3, workers=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_path = root / "train.partial" / "done.npy"
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


def test_resume_after_sigkill_matches_an_uninterrupted_build(ds, tmp_path, decoded):
    build(ds, tmp_path / "ref")
    root = tmp_path / "cache"
    n_done = _run_slow_build_and_kill(ds, root, min_done=4)
    assert 4 <= n_done < 10
    assert not (root / "train").exists()  # nothing at the final path until complete
    decoded.clear()
    m = build(ds, root)
    assert len(decoded) == 10 - n_done and m["resumed_rows"] == n_done  # finished rows were not redone
    for name in ("images.npy", "index.csv", "sources.csv"):
        assert (root / "train" / name).read_bytes() == (tmp_path / "ref/train" / name).read_bytes(), name
    assert not (root / "train/done.npy").exists() and not (root / "train.partial").exists()


def test_two_workers_give_the_same_cache(ds, tmp_path):
    build(ds, tmp_path / "one", workers=1)
    m = build(ds, tmp_path / "two", workers=2)
    assert m["workers"] == 2 and m["decoded_this_run"] == 10
    assert (tmp_path / "one/train/images.npy").read_bytes() == (tmp_path / "two/train/images.npy").read_bytes()


def test_a_decode_worker_that_dies_stops_the_build_naming_its_file(tmp_path):
    import threading

    from cxrlt.data.decode_pool import DecodePool

    # the worker blocks opening a named pipe (no writer) until it is killed, as by the OOM killer
    fifo, fifo2 = tmp_path / "stuck.png", tmp_path / "next.png"
    os.mkfifo(fifo)
    os.mkfifo(fifo2)
    images = tmp_path / "images.npy"
    np.lib.format.open_memmap(images, mode="w+", dtype=np.uint8, shape=(2, SIZE, SIZE)).flush()
    pool = DecodePool(images, {"size": SIZE, "low_pct": 0.5, "high_pct": 99.5}, [(0, str(fifo)), (1, str(fifo2))], 2)
    assert len(pool.procs) == 1  # both tasks went to the worker: this process only waits
    threading.Timer(0.5, pool.procs[0].kill).start()
    try:
        with pytest.raises(InputError) as e:
            list(pool.results())
    finally:
        pool.stop()
    assert str(e.value) == (f"a decode worker process was killed by signal {signal.SIGKILL.value} while decoding "
                            f"{fifo}; re-run to continue (finished images are kept), with fewer --workers if it "
                            f"ran out of memory")


def test_a_second_build_of_the_same_cache_is_refused_naming_the_first(ds, tmp_path):
    with output_lock(tmp_path / "train"):
        with pytest.raises(InputError) as e:
            build(ds, tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'train'}: pid {os.getpid()} on ")
    assert str(e.value).endswith(") is running on this output; wait for it or stop it")
    assert "\n" not in str(e.value) and not (tmp_path / "train").exists()
    build(ds, tmp_path)  # the lock is free again


# ---- bad images -------------------------------------------------------------------------------------


def test_bad_image_stops_with_context_then_skip_bad_leaves_it_out(ds, tmp_path, capsys, decoded):
    bad = ds["image_dir"] / ds["ids"][5]
    bad.write_bytes(b"\x89PNG garbage")
    (ds["image_dir"] / ds["ids"][9]).write_bytes(b"")
    with pytest.raises(InputError) as e:
        build(ds, tmp_path)
    msg = str(e.value)
    assert ds["ids"][5] in msg and "row 7 of" in msg and str(bad) in msg
    assert "--skip-bad" in msg and not (tmp_path / "train").exists()

    m = build(ds, tmp_path, skip_bad=True)
    failed = {f["ImageID"]: f for f in m["failures"]}
    assert set(failed) == {ds["ids"][5], ds["ids"][9]} and m["counts"]["failed"] == 2
    assert "empty" in failed[ds["ids"][9]]["reason"] and failed[ds["ids"][5]]["csv_row"] == 7
    assert m["resumed_rows"] > 0  # the rows done before the stop were kept
    err = capsys.readouterr().err
    assert "2 image(s) could not be used" in err and ds["ids"][5] in err
    cache = open_cache(tmp_path / "train")
    assert ds["ids"][5] not in set(cache.index["ImageID"]) and len(cache.index) == 8
    assert cache.images.shape[0] == 10 and (cache.images[4] == 0).all()  # not compacted: row 4 unused
    assert 4 not in cache.index["row"].tolist()
    with pytest.raises(ValueError, match="not in the index"):
        cache.targets([4])


def test_missing_images_are_reported_before_decoding(ds, tmp_path):
    (ds["image_dir"] / ds["ids"][2]).unlink()
    with pytest.raises(InputError, match=rf"not found.*{ds['ids'][2]}.*row 4 of"):
        build(ds, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="none of the 10 images was found.*--image-dir"):
        build(ds, tmp_path, image_dir=tmp_path / "empty")


def test_images_in_subfolders_are_found(ds, tmp_path):
    sub = ds["image_dir"] / "7"
    sub.mkdir()
    os.replace(ds["image_dir"] / ds["ids"][0], sub / ds["ids"][0])
    build(ds, tmp_path)
    cache = open_cache(tmp_path / "train")
    assert (cache.images[0] == load_for_cache(sub / ds["ids"][0], SIZE)).all()


def test_test_image_in_the_train_cache_is_an_error(ds, tmp_path):
    build(ds, tmp_path)
    with pytest.raises(InputError, match=r"train\.csv: row 2: ImageID .* is also a training image .*--removal-csv"):
        build_test(ds, tmp_path, ds["train_csv"])


def test_foreign_out_dir_is_refused(ds, tmp_path):
    foreign = tmp_path / "train"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not part of an image cache"):
        build(ds, tmp_path)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---- preprocess.py ----------------------------------------------------------------------------------


def test_cli_train_and_test_caches(ds, tmp_path):
    root = tmp_path / "root"
    key = subprocess.run([sys.executable, "-m", "cxrlt.data.identity", str(ds["test_csv"])], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert key == identity.test_cache_key(ds["test_csv"])
    common = ["--image-dir", str(ds["image_dir"]), "--size", str(SIZE), "--workers", "2"]
    for args in (["train", "--train-csv", str(ds["train_csv"]), "--removal-csv", str(ds["removal_csv"]),
                  "--folds", "3", "--out", str(root / "train")],
                 ["test", "--test-csv", str(ds["test_csv"]), "--out", str(root / f"test-{key}")]):
        subprocess.run([sys.executable, "preprocess.py", *args, *common], cwd=ROOT, capture_output=True, text=True,
                       check=True, timeout=120)
    assert len(open_cache(root / "train").rows()) == 10 and len(open_cache(root / f"test-{key}").rows()) == 3


def test_cli_bad_input_exits_2_with_one_line(ds, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(ds["train_csv"].read_text().replace(",0\n", ",2\n", 1))
    p = subprocess.run([sys.executable, "preprocess.py", "train", "--train-csv", str(bad), "--image-dir",
                        str(ds["image_dir"]), "--size", str(SIZE), "--out", str(tmp_path / "c")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
    assert "label values must be 0 or 1" in lines[0] and "'2'" in lines[0]
