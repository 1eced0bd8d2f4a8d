import torch

from cxrlt.inference import apply_view


def test_flip_view_twice_is_identity_and_scale_keeps_shape():
    x = torch.rand(2, 1, 20, 20)
    assert torch.equal(apply_view(apply_view(x, True, 1.0), True, 1.0), x)
    for s in (0.9, 1.1):
        assert apply_view(x, False, s).shape == x.shape
    # zoom-out pads with black at the border
    assert float(apply_view(torch.ones(1, 1, 20, 20), False, 0.9)[0, 0, 0, 0]) == 0.0
