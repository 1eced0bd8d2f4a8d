import numpy as np
import torch

from cxrlt.inference import apply_view, normal_gating, study_pool


def test_flip_view_twice_is_identity_and_scale_keeps_shape():
    x = torch.rand(2, 1, 20, 20)
    assert torch.equal(apply_view(apply_view(x, True, 1.0), True, 1.0), x)
    for s in (0.9, 1.1):
        assert apply_view(x, False, s).shape == x.shape
    # zoom-out pads with black at the border
    assert float(apply_view(torch.ones(1, 1, 20, 20), False, 0.9)[0, 0, 0, 0]) == 0.0


def test_normal_gating_formula():
    labels = ["Normal", "a", "b"]
    p = np.array([[0.8, 0.5, 0.2], [0.0, 0.6, 0.9]])
    q = normal_gating(p, labels, alpha=2.0)
    assert np.allclose(q[:, 0], p[:, 0])
    assert np.allclose(q[0, 1:], p[0, 1:] * 0.2 ** 2) and np.allclose(q[1, 1:], p[1, 1:])
    assert normal_gating(p, ["x", "a", "b"], 2.0) is p  # no Normal label: unchanged


def test_study_pool_blends_with_study_mean():
    p = np.array([[0.0], [1.0], [0.5]])
    q = study_pool(p, ["P1", "P1", "P2"], ["d", "d", "d"], weight=0.5)
    assert np.allclose(q[:, 0], [0.25, 0.75, 0.5])
    assert study_pool(p, ["P1", "P1", "P2"], ["d", "e", "d"], 0.5)[0, 0] == 0.0  # other date: other study
