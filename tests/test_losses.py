"""Each loss against its formula, computed independently in float64 numpy on small tensors."""

import numpy as np
import pytest
import torch

from cxrlt.core import config
from cxrlt.core.errors import ConfigError
from cxrlt.models.losses import LOSSES, build_loss, effective_number_weights

Z = np.array([[2.0, -1.0, 0.5, -3.0], [-0.3, 1.5, -2.0, 4.0], [0.0, 0.7, 3.0, -0.8]])
Y = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]], dtype=float)
COUNTS = np.array([500, 40, 3, 0])  # last label has no positive in the training fold
N = 1000


def cfg(**kw):
    c = dict(config.DEFAULTS)
    c.update(kw)
    return c


def run(loss, z=Z, y=Y):
    return loss(torch.tensor(z, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)).item()


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def bce_elems(z, y):
    return -(y * np.log(sig(z)) + (1 - y) * np.log(1 - sig(z)))


def test_bce_matches_formula_and_torch():
    loss = build_loss(cfg(loss="bce"), COUNTS, N)
    assert run(loss) == pytest.approx(bce_elems(Z, Y).mean(), rel=1e-5)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(Z), torch.tensor(Y))
    assert run(loss) == pytest.approx(ref.item(), rel=1e-5)


def test_bce_pos_weight():
    n = np.maximum(COUNTS, 1).astype(float)
    w = np.minimum((N - n) / n, 1000.0)
    ref = -(w * Y * np.log(sig(Z)) + (1 - Y) * np.log(1 - sig(Z))).mean()
    assert run(build_loss(cfg(loss="bce_pw"), COUNTS, N)) == pytest.approx(ref, rel=1e-5)


def test_bce_pos_weight_is_capped():
    # one positive in 5000 images would weigh 4999; the cap is 1000
    loss = build_loss(cfg(loss="bce_pw"), np.array([1]), 5000)
    z, y = np.array([[0.3]]), np.array([[1.0]])
    assert run(loss, z, y) == pytest.approx(1000 * -np.log(sig(0.3)), rel=1e-5)


def test_focal():
    g = 2.0
    p = sig(Z)
    ref = -(Y * (1 - p) ** g * np.log(p) + (1 - Y) * p**g * np.log(1 - p)).mean()
    assert run(build_loss(cfg(loss="focal", focal_gamma=g), COUNTS, N)) == pytest.approx(ref, rel=1e-5)
    # gamma 0 is plain BCE
    assert run(build_loss(cfg(loss="focal", focal_gamma=0.0), COUNTS, N)) == pytest.approx(
        bce_elems(Z, Y).mean(), rel=1e-5)


def test_asl():
    gn, gp, clip = 4.0, 1.0, 0.05
    p = sig(Z)
    pm = np.maximum(p - clip, 0)
    ref = -(Y * (1 - p) ** gp * np.log(p) + (1 - Y) * pm**gn * np.log(1 - pm)).mean()
    loss = build_loss(cfg(loss="asl", asl_gamma_neg=gn, asl_gamma_pos=gp, asl_clip=clip), COUNTS, N)
    assert run(loss) == pytest.approx(ref, rel=1e-5)
    # a negative with p below the clip costs exactly nothing
    assert run(loss, np.array([[-4.0]]), np.array([[0.0]])) == 0.0


def test_asl_without_focusing_or_clip_is_bce():
    loss = build_loss(cfg(loss="asl", asl_gamma_neg=0.0, asl_gamma_pos=0.0, asl_clip=0.0), COUNTS, N)
    assert run(loss) == pytest.approx(bce_elems(Z, Y).mean(), rel=1e-5)


def test_effective_number_weights():
    beta = 0.99
    n = np.array([1000.0, 10.0, 1.0])
    raw = (1 - beta) / (1 - beta**n)
    np.testing.assert_allclose(effective_number_weights(n, beta), raw / raw.mean(), rtol=1e-10)
    assert effective_number_weights(n, beta).mean() == pytest.approx(1.0)
    np.testing.assert_allclose(effective_number_weights(n, 0.0), 1.0)
    # a zero count is never inf: it gets the neutral weight, and the others are normalised without it
    w = effective_number_weights(np.array([0, 1, 5]), 0.9999)
    assert np.all(np.isfinite(w)) and w[0] == 1.0 and w[1:].mean() == pytest.approx(1.0)


def test_class_balanced():
    beta = 0.999
    # normalised over the labels with a positive; the label without one keeps weight 1
    seen = COUNTS > 0
    n = COUNTS[seen].astype(float)
    w = np.ones(len(COUNTS))
    w[seen] = (1 - beta) / (1 - beta**n)
    w[seen] /= w[seen].mean()
    ref = (w * bce_elems(Z, Y)).mean()
    assert run(build_loss(cfg(loss="cb", cb_beta=beta), COUNTS, N)) == pytest.approx(ref, rel=1e-5)


def ldam_ref(z, y, counts, max_m, s):
    """LDAM as in the paper, on RAW scores z: BCE(s * (z - y * m_j)). The loss itself takes real
    logits (s * z, what the model's head returns), so the tests feed it s * Z."""
    seen = np.asarray(counts) > 0  # the rarest label WITH a positive gets max_m; one without, max_m too
    m = np.full(len(counts), float(max_m))
    m[seen] = np.asarray(counts, dtype=float)[seen] ** -0.25
    m[seen] = m[seen] * max_m / m[seen].max()
    return bce_elems(s * (z - y * m), y), m


def test_ldam_per_class_margin():
    s, max_m = 5.0, 0.5
    loss = build_loss(cfg(loss="ldam", ldam_s=s, ldam_max_m=max_m), COUNTS, N)
    elems, m = ldam_ref(Z, Y, COUNTS, max_m, s)
    assert m.max() == pytest.approx(max_m) and m[2] == pytest.approx(max_m)  # rarest label with a positive
    assert run(loss, s * Z) == pytest.approx(elems.mean(), rel=1e-5)
    # row 2 has three positives with different margins: each element uses its own class's margin
    assert run(loss, s * Z[2:3], Y[2:3]) == pytest.approx(elems[2].mean(), rel=1e-5)


def test_drw_switches_on_at_epoch_and_weights_positives_only():
    beta = 0.999
    c = cfg(loss="ldam", ldam_s=3.0, drw_epoch=2, drw_beta=beta)
    loss = build_loss(c, COUNTS, N)
    elems, _ = ldam_ref(Z, Y, COUNTS, c["ldam_max_m"], 3.0)
    for epoch in (0, 1):
        loss.set_epoch(epoch)
        assert run(loss, 3.0 * Z) == pytest.approx(elems.mean(), rel=1e-5)
    loss.set_epoch(2)
    w = effective_number_weights(COUNTS, beta)
    weighted = np.where(Y == 1, w[None, :] * elems, elems)
    assert run(loss, 3.0 * Z) == pytest.approx(weighted.mean(), rel=1e-5)
    # all-negative targets: negatives keep weight 1
    y0 = np.zeros_like(Y)
    assert run(loss, 3.0 * Z, y0) == pytest.approx(ldam_ref(Z, y0, COUNTS, c["ldam_max_m"], 3.0)[0].mean(), rel=1e-5)


def test_drw_applies_to_bce():
    loss = build_loss(cfg(loss="bce", drw_epoch=1, drw_beta=0.99), COUNTS, N)
    assert run(loss) == pytest.approx(bce_elems(Z, Y).mean(), rel=1e-5)
    loss.set_epoch(1)
    w = effective_number_weights(COUNTS, 0.99)
    e = bce_elems(Z, Y)
    assert run(loss) == pytest.approx(np.where(Y == 1, w * e, e).mean(), rel=1e-5)


def test_drw_refused_with_class_weighted_loss():
    with pytest.raises(ConfigError, match="drw_epoch"):
        build_loss(cfg(loss="cb", drw_epoch=0), COUNTS, N)


def db_ref(z, y, counts, n_total, alpha, beta, mu, lam, kappa, gamma):
    n = np.maximum(counts, 1).astype(float)
    C = len(n)
    pc = (1 / C) * (1 / n)
    out = np.zeros_like(z)
    for i in range(z.shape[0]):
        pos_labels = np.flatnonzero(y[i] == 1)
        for j in range(C):
            if len(pos_labels):
                pi = (1 / C) * np.sum(1 / n[pos_labels])
                r_hat = alpha + sig(beta * (pc[j] / pi - mu))
            else:
                r_hat = alpha + 1.0
            p = n[j] / n_total
            zz = z[i, j] + kappa * (-np.log(1 / p - 1))
            if y[i, j] == 1:
                term = np.log1p(np.exp(-zz)) * (1 - sig(zz)) ** gamma
            else:
                term = np.log1p(np.exp(lam * zz)) / lam * sig(lam * zz) ** gamma
            out[i, j] = r_hat * term
    return out


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_distribution_balanced(gamma):
    p = dict(db_alpha=0.1, db_beta=10.0, db_mu=0.3, db_neg_scale=2.0, db_init_bias=0.05, db_focal_gamma=gamma)
    loss = build_loss(cfg(loss="db", **p), COUNTS, N)
    y = Y.copy()
    y[1] = 0  # an image with no positive label
    ref = db_ref(Z, y, COUNTS, N, 0.1, 10.0, 0.3, 2.0, 0.05, gamma)
    assert run(loss, Z, y) == pytest.approx(ref.mean(), rel=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_stable_for_extreme_logits_and_empty_labels(name):
    loss = build_loss(cfg(loss=name), np.array([0, 0, 7]), 10)
    z = torch.tensor([[1e4, -1e4, 80.0], [-90.0, 1e4, -1e4]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    value = loss(z, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    # confident and right: the (positive / negative) BCE terms are ~0; confident and wrong: large
    assert value.item() > 1.0


def test_bf16_logits_are_upcast():
    loss = build_loss(cfg(loss="bce"), COUNTS, N)
    out = loss(torch.tensor(Z, dtype=torch.bfloat16), torch.tensor(Y))
    assert out.dtype == torch.float32


def test_unknown_loss_name():
    with pytest.raises(ConfigError, match="unknown loss 'bogus'"):
        build_loss(cfg(), COUNTS, N, name="bogus")


def test_a_label_without_training_positives_leaves_the_other_labels_margins_and_weights_alone():
    import numpy as np

    from cxrlt.models.losses import effective_number_weights, ldam_margins

    counts = np.array([5000.0, 300.0, 12.0, 3.0])
    with_empty = np.append(counts, 0.0)  # a label that no training image has
    assert np.allclose(ldam_margins(with_empty, 0.5)[:4], ldam_margins(counts, 0.5))
    assert ldam_margins(counts, 0.5).max() == 0.5
    for beta in (0.999, 0.9999, 1.0):
        w, w0 = effective_number_weights(counts, beta), effective_number_weights(with_empty, beta)
        assert np.allclose(w0[:4], w), beta
        assert w0[4] == 1.0 and np.isclose(w.mean(), 1.0)
