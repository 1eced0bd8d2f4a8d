"""Task 2 (zeroshot.py, cxrlt/zeroshot/scoring.py): scoring maths, the tiny open_clip model end to end,
the image-embedding cache, prompt-file and model errors, and the Task-2 label set downstream
(ensemble.py check, evaluate.py). Nothing is downloaded: models are built here with random weights.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score

from cxrlt.zeroshot import scoring as zs
from conftest import ROOT, run_script, run_script_inprocess

TASK2 = ["Scoliosis", "Osteopenia", "Bulla", "Infarction", "Adenopathy", "goiter"]
LABELS_FILE = ROOT / "prompts" / "cxrlt2026_task2_labels.txt"


def run_inprocess(script, argv, capsys):
    """-> (exit status, stdout, stderr) of `python script argv...`, run in this process."""
    return run_script_inprocess(capsys, script, *argv)


@pytest.fixture(scope="session")
def zs_test_cache(request) -> Path:
    """A cache holding the demo's test images: the test cache where conftest has one (a cache per
    test list), else the one cache of train and test rows."""
    try:
        return request.getfixturevalue("demo_test_cache")
    except pytest.FixtureLookupError:
        return request.getfixturevalue("demo_cache")


def write_prompts(path, findings: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"findings": findings}, sort_keys=False))
    return path


def unique_prompts(n_pos=3, n_neg=2, labels=TASK2) -> dict:
    return {lab: {"positive": [f"{lab} sign {j}" for j in range(n_pos)],
                  "negative": [f"no {lab} {j}" for j in range(n_neg)]} for lab in labels}


def test_shipped_label_file_and_prompts_cover_the_official_task2_set():
    from cxrlt.core.labels import read_labels_file

    assert read_labels_file(LABELS_FILE) == TASK2
    prompts = zs.load_prompts(ROOT / "prompts" / "task2.yaml", TASK2, need_negative=True)
    assert list(prompts) == TASK2
    assert all(len(p.positive) >= 5 and p.negative for p in prompts.values())


# ---- scoring maths ------------------------------------------------------------------------------


def test_scoring_formulas_on_hand_made_embeddings():
    img = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    pos = np.array([[1.0, 0.0], [0.8, 0.6]])
    neg = np.array([[0.0, 1.0]])
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    mean = np.array([0.9, 0.78, 0.3])  # (cos to pos 1 + cos to pos 2) / 2
    np.testing.assert_allclose(zs.pooled_similarity(img, pos, "mean"), mean)
    np.testing.assert_allclose(zs.pooled_similarity(img, pos, "max"), [1.0, 0.96, 0.6])
    c = np.array([0.9, 0.3]) / np.linalg.norm([0.9, 0.3])  # the prompts' mean direction
    np.testing.assert_allclose(zs.pooled_similarity(img, pos, "embedding"), img @ c)

    text = {"a": (pos, neg)}
    p = zs.finding_scores(img, text, "cosine", "mean", temperature=0.1)[:, 0]
    np.testing.assert_allclose(p, sig((mean - 0.78) / 0.1))  # the median is 0.78
    assert p[1] == 0.5
    p = zs.finding_scores(img, text, "cosine", "mean", temperature=0.1, center="zero")[:, 0]
    np.testing.assert_allclose(p, sig(mean / 0.1))
    p = zs.finding_scores(img, text, "softmax", "mean", temperature=0.1)[:, 0]
    s_neg = np.array([0.0, 0.8, 1.0])
    np.testing.assert_allclose(p, np.exp(mean / 0.1) / (np.exp(mean / 0.1) + np.exp(s_neg / 0.1)))
    with pytest.raises(ValueError, match="negative"):
        zs.finding_scores(img, {"a": (pos, None)}, "softmax", "mean", 0.1)
    with pytest.raises(ValueError, match="temperature"):
        zs.finding_scores(img, text, "cosine", "mean", 0.0)


class FakeEncoder:
    """Embeddings chosen so the answer is known: image x belongs to finding k(x) = (sum of its
    pixels) mod K and its embedding is the basis vector e_k; a positive prompt of finding k is e_k
    and a negative one -e_k, each plus small noise. Exactly the images of finding k must rank
    above all others for finding k, under every method and pool."""

    logit_scale = 100.0
    spec = "fake"

    def __init__(self, prompts: dict, dim: int = 16, noise: float = 0.05):
        rng = np.random.default_rng(0)
        self.n_findings, self.dim, self.vec = len(prompts), dim, {}
        for k, p in enumerate(prompts.values()):
            e = np.eye(dim)[k]
            for t in p.positive:
                self.vec[t] = e + noise * rng.normal(size=dim)
            for t in p.negative:
                self.vec[t] = -e + noise * rng.normal(size=dim)
        self.image_batches = 0

    @staticmethod
    def finding_of(img: np.ndarray, n_findings: int) -> int:
        return int(img.astype(np.int64).sum()) % n_findings

    def fingerprint(self) -> dict:
        return {"fake": self.dim}

    def encode_images(self, x):
        self.image_batches += 1
        ks = [self.finding_of(im, self.n_findings) for im in x.numpy()]
        return torch.from_numpy(np.eye(self.dim)[ks])

    def encode_texts(self, texts):
        return np.stack([self.vec[t] for t in texts])


@pytest.mark.parametrize("method,pool", [("cosine", "mean"), ("cosine", "max"), ("cosine", "embedding"),
                                         ("softmax", "mean"), ("softmax", "embedding")])
def test_fake_encoder_answer_is_recovered_exactly(zs_test_cache, tmp_path, method, pool):
    from cxrlt.data.cache import open_cache

    cache = open_cache(zs_test_cache)
    order = TASK2[::-1]  # the output follows the prompts' label order, whatever it is
    prompts = zs.load_prompts(write_prompts(tmp_path / "p.yaml", unique_prompts()), order, need_negative=True)
    enc = FakeEncoder(prompts)
    df, info = zs.score_cache(enc, cache, "test", prompts, tmp_path / "emb", method=method, pool=pool,
                              workers=0, progress=False)
    rows = cache.rows("test")
    images = np.load(zs_test_cache / "images.npy", mmap_mode="r")
    truth = np.array([FakeEncoder.finding_of(images[r], len(order)) for r in rows])
    assert set(truth) == set(range(len(order))), "every finding needs a positive image for the test to bite"
    assert list(df.columns) == ["ImageID", *order]
    assert df["ImageID"].tolist() == zs.cache_ids(cache, rows)
    p = df[order].to_numpy()
    assert ((p >= 0) & (p <= 1)).all()
    for k, label in enumerate(order):
        assert average_precision_score(truth == k, p[:, k]) == 1.0, label
    assert (p.argmax(axis=1) == truth).all()
    assert info["temperature"] == pytest.approx(0.01)  # 1 / the model's logit scale by default


def test_fake_encoder_with_flipped_prompts_is_wrong(zs_test_cache, tmp_path):
    """The check above can fail: with positive and negative prompts swapped, softmax ranks the
    images of each finding last."""
    from cxrlt.data.cache import open_cache

    cache = open_cache(zs_test_cache)
    prompts = zs.load_prompts(write_prompts(tmp_path / "p.yaml", unique_prompts()), TASK2, need_negative=True)
    enc = FakeEncoder(prompts)
    swapped = {k: zs.Prompts(p.negative, p.positive) for k, p in prompts.items()}
    df, _ = zs.score_cache(enc, cache, "test", swapped, tmp_path / "emb", method="softmax", workers=0,
                           progress=False)
    images = np.load(zs_test_cache / "images.npy", mmap_mode="r")
    truth = np.array([FakeEncoder.finding_of(images[r], 6) for r in cache.rows("test")])
    aps = [average_precision_score(truth == k, df[lab]) for k, lab in enumerate(TASK2)]
    assert max(aps) < 0.5


# ---- the real thing with a tiny random open_clip model --------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A local-dir model folder; input 16 px, so the 32-px cache images are resized on the device."""
    from cxrlt.zeroshot.tiny_clip import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "clip", image_size=16, seed=0)


def _zs_args(cache, model, out, *extra):
    return ["--cache", cache, "--model", f"local-dir:{model}", "--out", out, "--device", "cpu",
            "--workers", "0", "--batch-size", "16", *extra]


def test_tiny_model_end_to_end_and_embedding_cache(zs_test_cache, demo_cache, tiny_model, tmp_path, capsys):
    from cxrlt.data.cache import open_cache
    from cxrlt.zeroshot.tiny_clip import write_tiny_model

    cache = open_cache(zs_test_cache)
    test_ids = zs.cache_ids(cache, cache.rows("test"))
    out = tmp_path / "zs" / "pred_test.csv"
    rc, so, se = run_inprocess("zeroshot.py", _zs_args(zs_test_cache, tiny_model, out), capsys)
    assert rc == 0, se
    assert "image embeddings: computed" in so
    first = pd.read_csv(out)
    assert list(first.columns) == ["ImageID", *TASK2]
    assert first["ImageID"].tolist() == test_ids
    p = first[TASK2].to_numpy()
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert p.std(axis=0).min() > 0  # the images are told apart (random, but not constant)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["n"] == len(test_ids) and meta["labels"] == TASK2 and meta["embeddings"]["status"] == "computed"
    emb_dir = tmp_path / "zs" / "embeddings"
    assert len(list(emb_dir.glob("*.npy"))) == 1

    # another prompt file (findings in another order, negatives, softmax): embeddings reused
    prompts = write_prompts(tmp_path / "p.yaml", {lab: unique_prompts()[lab] for lab in TASK2[::-1]})
    rc, so, se = run_inprocess("zeroshot.py", _zs_args(zs_test_cache, tiny_model, out, "--prompts", prompts,
                                                       "--method", "softmax"), capsys)
    assert rc == 0, se
    assert "image embeddings: reused" in so
    second = pd.read_csv(out)
    assert list(second.columns) == ["ImageID", *TASK2]  # the label file's order, not the prompt file's
    assert not np.allclose(second[TASK2].to_numpy(), p)

    # reused embeddings give what a fresh computation gives
    rc, so, _ = run_inprocess("zeroshot.py", _zs_args(zs_test_cache, tiny_model, out), capsys)
    assert "reused" in so
    np.testing.assert_allclose(pd.read_csv(out)[TASK2].to_numpy(), p, rtol=0, atol=1e-12)
    fresh = tmp_path / "fresh" / "pred.csv"
    rc, so, _ = run_inprocess("zeroshot.py", _zs_args(zs_test_cache, tiny_model, fresh), capsys)
    assert "computed" in so
    np.testing.assert_allclose(pd.read_csv(fresh)[TASK2].to_numpy(), p, rtol=0, atol=1e-6)

    # other rows (the training images) and then other weights in the same folder: new embeddings
    rc, so, _ = run_inprocess("zeroshot.py", _zs_args(demo_cache, tiny_model, out, "--split", "train"), capsys)
    assert "computed" in so and len(pd.read_csv(out)) == len(open_cache(demo_cache).rows("train"))
    rc, so, _ = run_inprocess("zeroshot.py", _zs_args(demo_cache, tiny_model, out, "--split", "all"), capsys)
    assert rc == 0 and len(pd.read_csv(out)) == len(open_cache(demo_cache).index)
    write_tiny_model(tiny_model, image_size=16, seed=1)
    try:
        rc, so, _ = run_inprocess("zeroshot.py", _zs_args(zs_test_cache, tiny_model, out), capsys)
        assert rc == 0 and "computed" in so
        assert not np.allclose(pd.read_csv(out)[TASK2].to_numpy(), p)
        assert len(list(emb_dir.glob("*.npy"))) >= 3
    finally:
        write_tiny_model(tiny_model, image_size=16, seed=0)  # the module's other tests use seed 0


def test_submission_from_zeroshot_passes_check_with_the_task2_labels(zs_test_cache, demo_dataset, tiny_model,
                                                                     tmp_path, capsys):
    test_list = demo_dataset / "CXRLT_2026_TEST_ALL_TASK1.csv"
    pred = tmp_path / "pred_test.csv"
    assert run_inprocess("zeroshot.py", _zs_args(zs_test_cache, tiny_model, pred), capsys)[0] == 0
    sub = tmp_path / "sub_task2.csv"
    rc, so, se = run_inprocess("ensemble.py", ["combine", "--test", pred, "--test-list", test_list,
                                               "--out", sub], capsys)
    assert rc == 0, se
    listed = pd.read_csv(test_list, dtype=str)["ImageID"].tolist()
    assert pd.read_csv(sub)["ImageID"].tolist() == listed  # test-list order
    rc, so, se = run_inprocess("ensemble.py", ["check", sub, "--test-list", test_list, "--labels-file",
                                               LABELS_FILE], capsys)
    assert rc == 0 and "OK" in so, se
    rc, so, se = run_inprocess("ensemble.py", ["check", sub, "--test-list", test_list], capsys)
    assert rc == 2 and "Scoliosis" in se  # the default is the Task-1 label set
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("\n".join(TASK2[1:] + TASK2[:1]) + "\n")
    rc, so, se = run_inprocess("ensemble.py", ["check", sub, "--test-list", test_list, "--labels-file", wrong],
                               capsys)
    assert rc == 2 and len(se.strip().splitlines()) == 1


def test_evaluate_scores_a_task2_label_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = [f"{i:03d}_t2.png" for i in range(60)]
    y = (rng.random((60, 6)) < 0.2).astype(int)
    y[0] = 1  # every label has a positive
    p = np.clip(0.5 * y + 0.6 * rng.random((60, 6)), 0, 1)
    labels = pd.DataFrame(y, columns=TASK2)
    labels.insert(0, "PatientID", "1.23E+38")
    labels.insert(0, "StudyDate_DICOM", "20170101")
    labels.insert(0, "ImageID", ids)
    labels.to_csv(tmp_path / "task2_labels.csv", index=False)
    pred = pd.DataFrame(p, columns=TASK2)
    pred.insert(0, "ImageID", ids)
    pred.to_csv(tmp_path / "sub_task2.csv", index=False)
    rc, so, se = run_inprocess("evaluate.py", ["--pred", tmp_path / "sub_task2.csv", "--labels",
                                               tmp_path / "task2_labels.csv", "--out", tmp_path / "eval"], capsys)
    assert rc == 0, se
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = np.mean([average_precision_score(y[:, k], p[:, k]) for k in range(6)])
    assert m["mAP"] == pytest.approx(expected, abs=1e-9) and m["n_labels"] == 6
    assert pd.read_csv(tmp_path / "eval" / "per_label.csv")["label"].tolist() == TASK2


# ---- user mistakes: one line, exit 2 ------------------------------------------------------------

_GOOD = unique_prompts()


@pytest.mark.parametrize("content,fragment", [
    (None, "prompt file not found"),
    ("findings:\n  Scoliosis: [a\n", "not valid YAML"),
    ("findings:\n  Scoliosis: [a]\n  Scoliosis: [b]\n", "line 3, column 3: duplicate key 'Scoliosis' (first at line 2)"),
    ("- just a list\n", "'findings:' section"),
    ({**_GOOD, "Scolosis": ["x"]}, "did you mean 'Scoliosis'"),
    ({k: v for k, v in _GOOD.items() if k != "Bulla"}, "no prompts for 'Bulla'"),
    ({**_GOOD, "goiter": []}, "'positive' must be a non-empty list"),
    ({**_GOOD, "goiter": {"positive": ["ok", 3]}}, "positive prompt 2 is not a non-empty string"),
    ({**_GOOD, "goiter": {"positive": ["ok"], "negatives": ["x"]}}, "unknown key 'negatives'"),
    ({**_GOOD, "goiter": ["only positives"]}, "'goiter' has no 'negative' prompts"),
])
def test_prompt_file_errors_are_one_line(demo_cache, tmp_path, capsys, content, fragment):
    path = tmp_path / "prompts.yaml"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        write_prompts(path, content)
    args = ["--cache", demo_cache, "--model", "unused", "--out", tmp_path / "o.csv", "--prompts", path,
            "--method", "softmax"]
    rc, so, se = run_inprocess("zeroshot.py", args, capsys)
    assert rc == 2 and fragment in se, se
    assert len(se.strip().splitlines()) == 1


@pytest.mark.parametrize("model,extra,fragment", [
    ("ViT-B-32", [], "needs --weights FILE"),
    ("ViT-B-32", ["--weights", "no/such.bin"], "file not found"),
    ("local-dir:{empty}", [], "no open_clip_config.json"),
    ("local-dir:{tiny}", ["--weights", "x.bin"], "not used with a model folder"),
    ("NoSuchArch-1", ["--weights", "{tiny}/open_clip_model.safetensors"], "cannot load the model"),
])
def test_model_errors_are_one_line(demo_cache, tiny_model, tmp_path, capsys, model, extra, fragment):
    (tmp_path / "empty").mkdir()
    fill = lambda s: s.format(empty=tmp_path / "empty", tiny=tiny_model)  # noqa: E731
    args = ["--cache", demo_cache, "--model", fill(model), "--out", tmp_path / "o.csv", *map(fill, extra)]
    rc, so, se = run_inprocess("zeroshot.py", args, capsys)
    assert rc == 2 and fragment in se, se
    assert len(se.strip().splitlines()) == 1


@pytest.mark.slow
def test_hub_model_offline_says_how_to_use_a_local_copy(demo_cache, tmp_path):
    """A subprocess with the hub forced offline: nothing is downloaded, the error says what to do."""
    p = run_script("zeroshot.py", "--cache", demo_cache, "--model", "hf-hub:nobody/no-such-clip",
                   "--out", tmp_path / "o.csv", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
                   check=False, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "local-dir:DIR" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o.csv")


# ---- Make ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_make_task2_writes_a_checked_submission_then_settles(demo_dataset, tiny_model, tmp_path):
    from test_make import _make, _mirror

    _mirror(tmp_path)
    d = demo_dataset
    ids = pd.read_csv(d / "CXRLT_2026_TEST_ALL_TASK1.csv", dtype=str)["ImageID"]
    y = (np.random.default_rng(0).random((len(ids), 6)) < 0.3).astype(int)
    y[0] = 1
    labels = pd.DataFrame(y, columns=TASK2)
    labels.insert(0, "ImageID", ids)
    labels.to_csv(tmp_path / "task2_labels.csv", index=False)
    # copies of the test list and the prompts, so that the test may touch them
    shutil.copy(d / "CXRLT_2026_TEST_ALL_TASK1.csv", tmp_path / "test.csv")
    shutil.copy(ROOT / "prompts" / "task2.yaml", tmp_path / "prompts.yaml")
    vars_ = ["DATASET=t2", f"TRAIN_CSV={d}/train.csv", f"IMAGE_DIR={d}/images",
             f"TEST_CSV={tmp_path}/test.csv", f"REMOVAL_CSV={d}/Removal.csv", "IMG_SIZE=32",
             "FOLDS=2", "NAME=t2", f"ZS_MODEL=local-dir:{tiny_model}", f"TASK2_LABELS={tmp_path}/task2_labels.csv",
             f"ZS_PROMPTS={tmp_path}/prompts.yaml"]
    p = _make(tmp_path, "task2", *vars_, "ZS_ARGS=--device cpu --workers 0")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sub = pd.read_csv(tmp_path / "submissions" / "t2_task2.csv")
    assert list(sub.columns) == ["ImageID", *TASK2] and sub["ImageID"].tolist() == ids.tolist()
    assert (tmp_path / "submissions" / "t2_task2.zip").exists()
    assert "Task-2 test mAP" in p.stdout
    again = _make(tmp_path, "task2", *vars_, "ZS_ARGS=--device cpu --workers 0")
    assert again.returncode == 0 and ".py" not in again.stdout, again.stdout
    for f in ("test.csv", "prompts.yaml", "task2_labels.csv"):  # a touch re-runs nothing
        os.utime(tmp_path / f)
    again = _make(tmp_path, "task2", *vars_, "ZS_ARGS=--device cpu --workers 0")
    assert again.returncode == 0 and ".py" not in again.stdout, again.stdout
    # another scoring choice: only the scoring re-runs, on the cached image embeddings
    other = _make(tmp_path, "task2", *vars_, "ZS_ARGS=--device cpu --workers 0 --pool max")
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    assert "image embeddings: reused" in other.stdout and "preprocess.py" not in other.stdout
    assert json.loads((tmp_path / "runs" / "t2_zeroshot" / "pred_test.csv.json").read_text())["pool"] == "max"
