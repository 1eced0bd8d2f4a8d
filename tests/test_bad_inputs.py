"""The bad-input corpus: malformed inputs and the error a user sees for each.

Every case asserts what the message names (file, row, column, what is wrong) and, for the scripts,
that they exit with status 2 and print exactly one `error:` line and no traceback. Each script is
run at least once as a real subprocess; the other script-level cases run the script in this
process (runpy, same main_wrapper) to avoid paying the torch/timm import each time.

Cases already covered elsewhere are not repeated here (e.g. the training-CSV cell values are in
test_tables.py, the submission values and rows in test_submission.py).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_script, run_script_inprocess
from cxrlt.data.cache import open_cache
from cxrlt.data.cache_build import build_test_cache, build_train_cache
from cxrlt.models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from cxrlt.data.tables import read_training_csv
from cxrlt.core.errors import InputError
from cxrlt.data.imaging import load_for_cache

LABELS = ["Normal", "Mass", "Hernia"]
SIZE = 16


# ---- helpers ----------------------------------------------------------------------------------------


def one_error_line(stderr: str) -> str:
    """The single `error:` line a script must print for bad input: the last line, no traceback.
    Lines before it may only be progress bars (a bad image stops preprocess.py part-way)."""
    assert "Traceback" not in stderr, stderr
    lines = [x for x in stderr.replace("\r", "\n").splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert all("it/s]" in x or "img/s]" in x or "?img/s" in x or "?it/s" in x for x in lines[:-1]), stderr
    return lines[-1]


def script_fails(*args) -> str:
    """Run a top-level script as a subprocess; assert exit status 2 and one error line."""
    p = run_script(*args, check=False, timeout=300)
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return one_error_line(p.stderr)


def script_fails_inprocess(capsys, script: str, *args) -> str:
    """Run a top-level script in this process (same entry point); assert status 2, one error line."""
    code, _, err = run_script_inprocess(capsys, script, *args)
    assert code == 2, err
    return one_error_line(err)


def gray16(rng, h=40, w=52) -> np.ndarray:
    """A smooth, non-constant 16-bit image."""
    base = cv2.resize(rng.random((5, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(base * 3000 + 500, 0, 65535).astype(np.uint16)


def write_dataset(root: Path, n=12, seed=0, images=None) -> dict:
    """n 16-bit PNGs + a training CSV (3 labels) + a test list of 3 more images."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    ids = [f"{500 + i}_z{i}.png" for i in range(n + 3)]
    for iid in ids:
        cv2.imwrite(str(img_dir / iid), gray16(rng))
    y = rng.integers(0, 2, (n, len(LABELS)))
    lines = ["ImageID,StudyDate_DICOM,PatientID," + ",".join(LABELS)]
    lines += [f"{ids[i]},2016010{i % 9},{1 + i % 6}.90E+38," + ",".join(map(str, y[i])) for i in range(n)]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "test.csv").write_text("ImageID,StudyDate_DICOM,PatientID,,,\n"
                                   + "".join(f"{iid},20200101,9.9E+38,,,\n" for iid in ids[n:]))
    return {"train_csv": root / "train.csv", "image_dir": img_dir, "test_csv": root / "test.csv", "ids": ids}


def build(ds, root, **kw):
    """The train cache (root/train) and the test cache (root/test) -> their manifests."""
    common = dict(workers=1, **kw)
    return (build_train_cache(ds["train_csv"], ds["image_dir"], root / "train", SIZE, folds=2, seed=0, **common),
            build_test_cache(ds["test_csv"], ds["image_dir"], root / "test", SIZE, **common))


@pytest.fixture
def ds(tmp_path):
    return write_dataset(tmp_path / "data")


def cxrlt_checkpoint(path: Path, labels=LABELS) -> Path:
    """A checkpoint in cxrlt's format for timm's test_resnet (untrained weights)."""
    from cxrlt.core import config
    from cxrlt.models.model import build_model

    cfg = config.resolve([], {"model": "test_resnet", "pretrained": False, "workers": 0, "device": "cpu"})
    model = build_model(cfg, len(labels), labels=labels)
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": cfg, "labels": list(labels)}, path)
    return path


class NotAllowed:
    """Any custom class makes a checkpoint need pickled code to load."""


# ---- training CSV -----------------------------------------------------------------------------------


def test_renamed_label_column_is_named_with_the_close_match(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("ImageID,StudyDate_DICOM,PatientID,Normal,mass,Hernia\na.png,1,1,0,1,0\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("Normal\nMass\nHernia\n")
    with pytest.raises(InputError) as e:
        read_training_csv(csv, labels_file=labels)
    msg = str(e.value)
    assert msg.startswith(f"{csv}: row 1 (header): missing label column 'Mass'")
    assert str(labels) in msg and "found 'mass'" in msg


def test_preprocess_missing_label_column_exits_2(ds, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("Normal\nMass\nHernia\nPneumothorax\n")
    line = script_fails("preprocess.py", "train", "--train-csv", ds["train_csv"], "--image-dir", ds["image_dir"],
                        "--labels-file", labels, "--size", SIZE, "--out", tmp_path / "cache")
    assert line.startswith(f"error: {ds['train_csv']}: row 1 (header): missing label column 'Pneumothorax'")
    assert not (tmp_path / "cache").exists()


def test_bom_and_crlf_csvs_give_the_same_cache(ds, tmp_path):
    """A training CSV and test list saved by Excel on Windows (BOM + CRLF) must work end to end."""
    build(ds, tmp_path / "plain")
    for key in ("train_csv", "test_csv"):
        text = ds[key].read_text()
        ds[key].write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    build(ds, tmp_path / "windows")
    for name in ("train/index.csv", "train/labels.txt", "train/images.npy", "test/index.csv", "test/images.npy"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "windows" / name).read_bytes(), name
    assert open_cache(tmp_path / "windows/train").index.columns[1] == "ImageID"  # not '\ufeffImageID'


# ---- images -----------------------------------------------------------------------------------------


def test_preprocess_truncated_png_exits_2_naming_image_row_and_file(ds, tmp_path):
    bad = ds["image_dir"] / ds["ids"][4]
    bad.write_bytes(bad.read_bytes()[:300])
    line = script_fails("preprocess.py", "train", "--train-csv", ds["train_csv"], "--image-dir", ds["image_dir"],
                        "--size", SIZE, "--folds", 2, "--out", tmp_path / "cache", "--workers", 1)
    assert f"error: {bad}: " in line and "truncated" in line
    assert f"ImageID '{ds['ids'][4]}', row 6 of {ds['train_csv']}" in line and "--skip-bad" in line
    assert not (tmp_path / "cache").exists()


def test_one_pixel_image_is_refused_with_its_row(ds, tmp_path):
    one = ds["image_dir"] / ds["ids"][13]  # a test-list image
    cv2.imwrite(str(one), np.array([[1234]], dtype=np.uint16))
    with pytest.raises(InputError) as e:
        build(ds, tmp_path / "cache")
    msg = str(e.value)
    assert msg.startswith(f"{one}: image is only 1x1 pixels")
    assert f"row 3 of {ds['test_csv']}" in msg


def test_mixed_bit_depths_and_channels_work(tmp_path):
    """Gray/RGB/RGBA, 8- and 16-bit PNGs in one dataset: each is cached like its gray version."""
    ds = write_dataset(tmp_path / "data", n=12)
    rng = np.random.default_rng(7)
    ref_dir = tmp_path / "gray"
    ref_dir.mkdir()
    kinds = ["gray8", "gray16", "rgb8", "rgb16", "rgba8", "rgba16"]
    for i, iid in enumerate(ds["ids"]):
        kind = kinds[i % len(kinds)]
        g = gray16(rng)
        if kind.endswith("8"):
            g = (g // 256).astype(np.uint8)
        cv2.imwrite(str(ref_dir / iid), g)
        img = g
        if kind.startswith("rgb"):
            img = np.dstack([g, g, g] + ([np.full_like(g, 3)] if kind.startswith("rgba") else []))
        cv2.imwrite(str(ds["image_dir"] / iid), img)
    m_train, m_test = build(ds, tmp_path / "cache")
    assert m_train["counts"]["failed"] == 0 and m_train["counts"]["images"] == 12 and m_test["counts"]["images"] == 3
    for kind in ("train", "test"):
        cache = open_cache(tmp_path / "cache" / kind)
        for row, iid in zip(cache.index["row"], cache.index["ImageID"]):
            expected = load_for_cache(ref_dir / iid, SIZE).astype(int)
            assert np.abs(cache.images[row].astype(int) - expected).max() <= 1, iid


# ---- images and the caches ---------------------------------------


def preprocess_train_args(ds, out, *extra) -> list:
    return ["preprocess.py", "train", "--train-csv", ds["train_csv"], "--image-dir", ds["image_dir"], "--size", SIZE,
            "--folds", 2, "--out", out, "--workers", 1, *extra]


@pytest.mark.parametrize("bad_id", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_image_id_outside_the_image_folder_is_refused(ds, tmp_path, bad_id):
    outside = tmp_path / "data" / "outside.png"
    cv2.imwrite(str(outside), gray16(np.random.default_rng(3)))  # a real image: the old code cached it
    bad_id = str(outside) if bad_id == "ABSOLUTE" else bad_id
    ds["train_csv"].write_text(ds["train_csv"].read_text().replace(ds["ids"][2], bad_id))
    with pytest.raises(InputError) as e:
        build_train_cache(ds["train_csv"], ds["image_dir"], tmp_path / "c", SIZE, folds=2, workers=1)
    msg = str(e.value)
    assert msg.startswith(f"{ds['train_csv']}: row 4, column 'ImageID': {bad_id!r} ")
    assert ("absolute path" in msg) if bad_id.startswith("/") else ("'..'" in msg)
    assert "\n" not in msg and not (tmp_path / "c").exists()


def test_newline_inside_an_image_id_gives_one_line(ds, tmp_path):
    text = ds["train_csv"].read_text().replace(ds["ids"][1], f'"{ds["ids"][1]}\nsecond line.png"')
    ds["train_csv"].write_text(text)
    line = script_fails(*preprocess_train_args(ds, tmp_path / "c"))
    assert line.startswith(f"error: {ds['train_csv']}: row 3, column 'ImageID': "
                           f"'{ds['ids'][1]}\\nsecond line.png' holds a control character")


def test_skip_bad_never_drops_a_test_image(ds, tmp_path):
    bad = ds["image_dir"] / ds["ids"][13]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(InputError) as e:
        build_test_cache(ds["test_csv"], ds["image_dir"], tmp_path / "test", SIZE, skip_bad=True, workers=1)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: ") and f"row 3 of {ds['test_csv']}" in msg
    assert "a test image cannot be left out" in msg and not (tmp_path / "test").exists()
    bad.unlink()
    with pytest.raises(InputError, match=r"1 image file\(s\) not found.*a test image cannot be left out"):
        build_test_cache(ds["test_csv"], ds["image_dir"], tmp_path / "test", SIZE, skip_bad=True, workers=1)


def test_skipped_images_are_in_the_fingerprint_and_a_fixed_image_comes_back(ds, tmp_path, capsys):
    bad = ds["image_dir"] / ds["ids"][4]
    good = bad.read_bytes()
    bad.write_bytes(good[:300])
    out = tmp_path / "train"
    skipped = build_train_cache(ds["train_csv"], ds["image_dir"], out, SIZE, folds=2, workers=1, skip_bad=True)
    assert skipped["counts"]["images"] == 11
    with pytest.raises(InputError, match="--skip-bad"):  # without --skip-bad the cache is not "up to date"
        build_train_cache(ds["train_csv"], ds["image_dir"], out, SIZE, folds=2, workers=1)
    bad.write_bytes(good)  # fixed
    fixed = build_train_cache(ds["train_csv"], ds["image_dir"], out, SIZE, folds=2, workers=1)
    assert fixed["counts"]["images"] == 12 and fixed["decoded_this_run"] == 1 and fixed["failures"] == []
    assert fixed["key"] != skipped["key"]
    cache = open_cache(out)
    row = cache.rows()[cache.ids(cache.rows()) == ds["ids"][4]]
    assert (cache.images[row[0]] == load_for_cache(bad, SIZE)).all()


def test_jpeg_cut_short_with_an_end_marker_appended_is_refused(ds, tmp_path):
    """libjpeg decodes it with a grey lower part; the old check (end marker present) let it through."""
    img = (gray16(np.random.default_rng(4), 120, 100) // 64).astype(np.uint8)
    jpg = ds["image_dir"] / "cut.jpg"
    data = cv2.imencode(".jpg", img)[1].tobytes()
    jpg.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    ds["train_csv"].write_text(ds["train_csv"].read_text().replace(ds["ids"][6], "cut.jpg"))
    line = script_fails(*preprocess_train_args(ds, tmp_path / "c"))
    assert line.startswith(f"error: {jpg}: damaged JPEG data (libjpeg: Corrupt JPEG data: premature end")
    assert f"row 8 of {ds['train_csv']}" in line
    jpg.write_bytes(data)  # the whole file is fine
    assert build_train_cache(ds["train_csv"], ds["image_dir"], tmp_path / "c", SIZE, folds=2,
                             workers=1)["counts"]["failed"] == 0


def test_full_disk_one_worker_one_line_with_the_sizes(ds, tmp_path, monkeypatch):
    """The array cannot be allocated (old: a sparse file, then SIGBUS in the middle of the build)."""
    import cxrlt.data.cache_build as cb

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_usage = shutil.disk_usage
    monkeypatch.setattr(cb.os, "posix_fallocate", no_space)
    monkeypatch.setattr(cb.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=41_000))
    with pytest.raises(InputError) as e:
        build_train_cache(ds["train_csv"], ds["image_dir"], tmp_path / "c", SIZE, folds=2, workers=1)
    need = 12 * SIZE * SIZE + 128
    assert str(e.value) == (f"{tmp_path / 'c.partial' / 'images.npy'}: no space left on the device: "
                            f"{need / 1000:.3g} kB needed, 41 kB free; free some space, or use a smaller --size or "
                            f"another --out")
    monkeypatch.setattr(cb.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=100))
    with pytest.raises(InputError, match=r"images\.npy: no space left on the device: .* needed, 100 B free"):
        build_train_cache(ds["train_csv"], ds["image_dir"], tmp_path / "c", SIZE, folds=2, workers=1)


def test_full_disk_two_workers_names_the_file_it_could_not_write(ds, tmp_path, monkeypatch):
    """The disk fills while two workers decode: saving the progress mask fails (old: that second
    ENOSPC hid the real error behind a traceback)."""
    import cxrlt.data.cache_build as cb

    real_save, calls = np.save, []

    def save(f, arr, *a, **k):
        if getattr(f, "name", "").endswith(".done.npy.tmp"):
            calls.append(1)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(f, arr, *a, **k)

    monkeypatch.setattr(cb, "FLUSH_SECONDS", 0.0)
    monkeypatch.setattr(cb.np, "save", save)
    with pytest.raises(InputError) as e:
        build_train_cache(ds["train_csv"], ds["image_dir"], tmp_path / "c", SIZE, folds=2, workers=2)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'c.partial' / 'done.npy'}: no space left on the device: 140 B needed, ")
    assert "\n" not in msg and " free; " in msg


def test_an_error_on_its_way_out_is_not_replaced_by_a_failing_progress_save(ds, tmp_path, monkeypatch):
    import cxrlt.data.decode_worker as dec
    import cxrlt.data.cache_build as cb

    real_save = np.save

    def save(f, arr, *a, **k):
        if getattr(f, "name", "").endswith(".done.npy.tmp") and (tmp_path / "c.partial" / "plan.json").exists():
            raise OSError(errno.ENOSPC, "No space left on device")  # every save after the set-up
        return real_save(f, arr, *a, **k)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cb.np, "save", save)
    monkeypatch.setattr(dec, "load_for_cache", interrupted)  # this process's first image (workers decode on)
    with pytest.raises(KeyboardInterrupt):
        build_train_cache(ds["train_csv"], ds["image_dir"], tmp_path / "c", SIZE, folds=2, workers=2)


# ---- test list vs predictions -----------------------------------------------------------------------


def write_preds(path: Path, ids) -> Path:
    p = np.random.default_rng(0).random((len(ids), len(LABELS)))
    df = pd.DataFrame(p, columns=LABELS)
    df.insert(0, "ImageID", ids)
    df.to_csv(path, index=False, float_format="%.5f")
    return path


def test_test_list_id_without_prediction_is_named(tmp_path, capsys):
    """The test list holds an image the cache (so every prediction file) lacks: say which."""
    lst = tmp_path / "list.csv"
    lst.write_text("ImageID,StudyDate_DICOM,PatientID,,\n" + "".join(f"t{i}.png,2017,1,,\n" for i in range(4))
                   + "new_9.png,2017,1,,\n")
    pred = write_preds(tmp_path / "pred.csv", [f"t{i}.png" for i in range(4)])
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    line = script_fails("ensemble.py", "check", pred, "--test-list", lst, "--labels-file", labels)
    assert line == f"error: {pred}: 1 ImageID(s) of {lst} have no row, e.g. 'new_9.png'"
    line = script_fails_inprocess(capsys, "ensemble.py", "combine", "--test", pred, "--test-list", lst,
                                  "--out", tmp_path / "sub.csv")
    assert line.startswith(f"error: {pred}: ImageIDs differ from {lst}") and "'new_9.png'" in line
    assert not (tmp_path / "sub.csv").exists()


def test_evaluate_negative_probability_exits_2(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("ImageID,StudyDate_DICOM,PatientID,Normal,Mass,Hernia\n"
                      "a.png,1,1,1,0,0\nb.png,1,1,0,1,0\nc.png,1,1,0,0,1\n")
    pred = tmp_path / "pred.csv"
    pred.write_text("ImageID,Normal,Mass,Hernia\na.png,0.9,0.1,0.2\nb.png,0.1,-0.1,0.3\nc.png,0.2,0.3,0.9\n")
    line = script_fails("evaluate.py", "--pred", pred, "--labels", labels, "--out", tmp_path / "eval")
    assert line == f"error: {pred}: row 3, column 3 ('Mass'): value -0.1 outside [0, 1]"
    assert not (tmp_path / "eval" / "metrics.json").exists()


# ---- configs (train.py as a subprocess) ------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("epochs: 2\nlearning_rate: 0.01\n", "unknown config key 'learning_rate'"),
    ("epochs: two\n", "config key 'epochs' must be int, got 'two' (str)"),
    ("loss: focal_ldam\n", "config key 'loss' = 'focal_ldam' is not one of ['asl', 'bce', 'bce_pw', 'cb', "
                           "'db', 'focal', 'ldam', 'margin_bce']"),
])
def test_train_bad_config_exits_2_naming_file_and_key(tmp_path, text, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    line = script_fails("train.py", "--config", "configs/demo.yaml", cfg, "--cache", tmp_path / "c",
                        "--out", tmp_path / "run")
    assert line.startswith(f"error: {cfg}: {expected}")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_train_bad_value_on_the_command_line(tmp_path):
    line = script_fails("train.py", "--config", "configs/demo.yaml", "--cache", tmp_path / "c",
                        "--out", tmp_path / "run", "--batch_size", "16.5")
    assert line == "error: command line: config key 'batch_size' must be int, got '16.5' (str)"


def test_train_unknown_model_name_exits_2(demo_cache, tmp_path):
    cfg = tmp_path / "model.yaml"
    cfg.write_text("model: resnet5O\npretrained: false\n")
    line = script_fails("train.py", "--config", "configs/demo.yaml", cfg, "--cache", demo_cache,
                        "--out", tmp_path / "run", "--device", "cpu", "--workers", "0")
    assert line.startswith("error: config key 'model': unknown model name 'resnet5O' (close matches: resnet50")
    assert not (tmp_path / "run" / "last.pt").exists()


# ---- checkpoints ------------------------------------------------------------------------------------


def test_predict_refuses_a_checkpoint_that_needs_pickled_code(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": NotAllowed()}, evil)
    line = script_fails("predict.py", "--checkpoint", evil, "--cache", tmp_path / "cache", "--split", "test",
                        "--out", tmp_path / "pred.csv")
    assert line.startswith(f"error: {evil}: refused to load: the checkpoint needs pickled Python objects")
    assert "weights_only=True" in line and not (tmp_path / "pred.csv").exists()


def test_retrain_head_truncated_checkpoint_exits_2(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    whole = cxrlt_checkpoint(tmp_path / "whole.pt")
    (run / "model.pt").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    line = script_fails("retrain_head.py", "--run", run, "--cache", tmp_path / "cache", "--out", run / "crt",
                        "--device", "cpu")
    assert line.startswith(f"error: {run / 'model.pt'}: not a readable checkpoint (")
    assert not (run / "crt" / "model.pt").exists()


@pytest.mark.parametrize("content, expected", [
    ("state_dict", "not a cxrlt checkpoint (no 'config' entry)"),
    ("tensor", "expected a dict checkpoint, got Tensor"),
    ("empty", "not a readable checkpoint (the file is empty, 0 bytes)"),
    ("truncated", "not a readable checkpoint ("),
    ("text", "not a PyTorch checkpoint file (it starts with b'conf', neither a zip archive nor a pickle)"),
])
def test_predict_foreign_checkpoints(tmp_path, capsys, content, expected):
    path = tmp_path / "foreign.pt"
    if content == "state_dict":  # e.g. a plain timm or torchvision state_dict
        torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "truncated":  # a legacy (non-zip) pickle cut short: EOFError without a message
        torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:20])
    elif content == "text":  # e.g. a config file passed as --checkpoint
        path.write_text("config: not a checkpoint\n")
    else:
        path.write_bytes(b"")
    line = script_fails_inprocess(capsys, "predict.py", "--checkpoint", path, "--cache", tmp_path / "c",
                                  "--split", "val", "--out", tmp_path / "p.csv")
    assert line.startswith(f"error: {path}: {expected}")


def test_checkpoint_labels_differ_from_the_cache(demo_cache, tmp_path, capsys):
    ck = cxrlt_checkpoint(tmp_path / "model.pt")  # 3 labels; the demo cache has the 30 official ones
    line = script_fails_inprocess(capsys, "predict.py", "--checkpoint", ck, "--cache", demo_cache,
                                  "--split", "test", "--out", tmp_path / "p.csv")
    assert line == f"error: {demo_cache}: cache labels differ from the checkpoint's ({ck})"


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


# ---- missing or incomplete cache --------------------------------------------------------------------


def test_train_missing_cache_says_run_preprocess(tmp_path, capsys):
    line = script_fails_inprocess(capsys, "train.py", "--config", "configs/demo.yaml", "--cache",
                                  tmp_path / "nocache", "--out", tmp_path / "run", "--device", "cpu")
    assert line == (f"error: {tmp_path / 'nocache'}: no complete image cache (manifest.json missing); "
                    f"run preprocess.py (make preprocess) first")


def test_predict_incomplete_cache_says_run_preprocess(ds, tmp_path, capsys):
    """A cache whose build was interrupted: the folder holds arrays but no manifest.json."""
    build(ds, tmp_path)
    cache = tmp_path / "test"
    (cache / "manifest.json").unlink()
    capsys.readouterr()  # the build's progress bar
    ck = cxrlt_checkpoint(tmp_path / "model.pt")
    line = script_fails_inprocess(capsys, "predict.py", "--checkpoint", ck, "--cache", cache, "--split", "test",
                                  "--out", tmp_path / "p.csv")
    assert line == (f"error: {cache}: no complete image cache (manifest.json missing); "
                    f"run preprocess.py (make preprocess) first")
    assert not (tmp_path / "p.csv").exists()
