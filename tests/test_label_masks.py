"""Label masks (NaN target = unannotated entry): every loss family, count-based weights over
annotated images, samplers and validation AP count only annotated entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrlt.core import config
from cxrlt.data.labelmask import annotated_counts
from cxrlt.data.samplers import build_sampler, repeat_factors
from cxrlt.evaluation.metrics import auc_per_label, average_precision_per_label, score
from cxrlt.models.losses import LOSSES, bce_pos_weights, build_loss

Z = torch.tensor([[2.0, -1.0, 0.5, -3.0], [-0.3, 1.5, -2.0, 4.0], [0.0, 0.7, 3.0, -0.8], [1.2, -0.4, -1.1, 0.3]])
Y = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.float32)
M = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
COUNTS = np.array([50, 40, 3, 1])


def cfg(**kw):
    c = dict(config.DEFAULTS)
    c.update(kw)
    return c


def grad_of(loss, z, y, mask=None):
    z = z.clone().requires_grad_(True)
    out = loss(z, y, mask=mask)
    out.backward()
    return out.detach(), z.grad


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_masked_loss_is_the_unmasked_one_on_annotated_entries(name):
    loss = build_loss(cfg(loss=name), COUNTS, 100)
    full, g_full = grad_of(loss, Z, Y)
    ones, g_ones = grad_of(loss, Z, Y, torch.ones_like(Y))
    torch.testing.assert_close(ones, full)
    torch.testing.assert_close(g_ones, g_full)
    if name == "db":  # its per-image weights depend on the row's positives: keep the masked ones negative
        y = Y * M
    else:
        y = Y
    ref, g_ref = grad_of(loss, Z, y)
    masked, g_m = grad_of(loss, Z, y, M)
    k = M.sum()
    # per-element gradients: d(mean over A)/dz = dl/dz / |A|; unmasked: dl/dz / (B*C)
    torch.testing.assert_close(g_m * k, torch.where(M > 0, g_ref * Y.numel(), torch.zeros_like(g_ref)))
    assert (g_m[M == 0] == 0).all()
    # the masked entries' targets do not matter, NaN included
    y_nan = torch.where(M > 0, y, torch.full_like(y, float("nan")))
    nan_loss = build_loss(cfg(loss=name), COUNTS, 100, nan_mask=True)
    v, g_nan = grad_of(nan_loss, Z, y_nan)
    torch.testing.assert_close(v, masked)
    torch.testing.assert_close(g_nan, g_m)
    flipped, _ = grad_of(loss, Z, torch.where(M > 0, y, 1 - y), M)
    if name != "db":
        torch.testing.assert_close(flipped, masked)
    if name == "db":
        return  # a one-entry mask changes db's per-image weights; its gradients were compared above
    # the value: sum over A of the elements, each the unmasked element (from one-entry masks)
    elems = torch.zeros_like(Z)
    for i, j in torch.nonzero(M > 0).tolist():
        e = torch.zeros_like(M)
        e[i, j] = 1
        elems[i, j] = loss(Z, y, mask=e)
    torch.testing.assert_close(masked, elems.sum() / k)


def test_annotated_counts_and_count_based_weights():
    y = np.array([[1, np.nan], [0, 1], [1, np.nan], [np.nan, 0]], dtype=np.float32)
    pos, n = annotated_counts(y)
    np.testing.assert_array_equal(pos, [2, 1])
    np.testing.assert_array_equal(n, [3, 2])
    assert annotated_counts(np.zeros((5, 2)))[1] == 5
    np.testing.assert_allclose(bce_pos_weights(pos, n), [0.5, 1.0])
    db = build_loss(cfg(loss="db"), pos, n)
    p = np.array([2 / 3, 1 / 2])
    np.testing.assert_allclose(db.logit_shift.numpy(), cfg()["db_init_bias"] * np.log(p / (1 - p)), rtol=1e-5)


def test_samplers_never_count_masked_labels():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < [0.3, 0.05, 0.5]).astype(np.float32)
    masked = y.copy()
    masked[100:, 1] = np.nan  # label 1 annotated on the first 100 rows only
    masked[150:, 2] = np.nan
    r = repeat_factors(masked, 0.2)
    # label 1's frequency is over its 100 annotated rows (a NaN is neither a positive nor a row)
    f1 = y[:100, 1].mean()
    rows1 = np.flatnonzero(y[:100, 1] > 0)
    assert (r[rows1] >= np.sqrt(0.2 / float(f1)) - 1e-6).all()
    assert not np.isclose(repeat_factors(np.nan_to_num(masked), 0.2), r).all()
    s = build_sampler("class_aware", masked, cfg(), seed=0)
    pos_rows = set(s.label_rows[1].tolist())
    assert pos_rows == set(rows1.tolist())  # only annotated positives
    assert np.isfinite(r).all()


def test_validation_ap_on_annotated_rows():
    rng = np.random.default_rng(1)
    y = (rng.random((60, 2)) < 0.4).astype(np.float64)
    p = rng.random((60, 2))
    masked = y.copy()
    masked[:20, 0] = np.nan
    ap = average_precision_per_label(masked, p)
    np.testing.assert_allclose(ap[0], average_precision_per_label(y[20:, :1], p[20:, :1])[0])
    np.testing.assert_allclose(ap[1], average_precision_per_label(y[:, 1:], p[:, 1:])[0])
    np.testing.assert_allclose(auc_per_label(masked, p)[0], auc_per_label(y[20:, :1], p[20:, :1])[0])
    assert score(masked, p)["mAP"] == pytest.approx(ap.mean())


def test_training_on_a_cache_with_unannotated_entries(tmp_path, capsys):
    import json

    from conftest import run_script_inprocess
    from test_external import _chexpert, _nih

    from cxrlt.data.cache_build import build_multi_cache

    build_multi_cache([("nih", _nih(tmp_path), "zeros", "zeros"), ("chexpert", _chexpert(tmp_path), "ignore", "ignore")],
                      tmp_path / "c" / "train", 32, folds=2, workers=1)
    rc, _out, _err = run_script_inprocess(
        capsys, "train.py", "--cache", tmp_path / "c" / "train", "--out", tmp_path / "run", "--model", "test_convnext",
        "--pretrained", "false", "--epochs", "1", "--batch_size", "2", "--workers", "0", "--device", "cpu",
        "--loss", "db", "--sampler", "repeat_factor", "--img_size", "32", "--warmup_epochs", "0")
    assert rc == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert lines and all(np.isfinite(x["train_loss"]) and np.isfinite(x["val_mAP"]) for x in lines)
    by = lines[-1]["val_mAP_by_dataset"]  # validation per dataset, each on the labels it annotates
    assert set(by) <= {"nih", "chexpert"} and by
