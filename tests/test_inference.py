import numpy as np
import pytest
import torch

from cxrlt.post.inference import apply_view


def test_flip_view_twice_is_identity_and_scale_keeps_shape():
    x = torch.rand(2, 1, 20, 20)
    assert torch.equal(apply_view(apply_view(x, True, 1.0), True, 1.0), x)
    for s in (0.9, 1.1):
        assert apply_view(x, False, s).shape == x.shape
    # zoom-out pads with black at the border
    assert float(apply_view(torch.ones(1, 1, 20, 20), False, 0.9)[0, 0, 0, 0]) == 0.0


def _tiny_model(**kw):
    from cxrlt.core import config
    from cxrlt.models.model import build_model

    torch.manual_seed(0)
    return build_model(config.resolve([], dict(model="test_resnet", pretrained=False, **kw)), 3)


def test_predict_tta_none_is_sigmoid_of_the_model_and_feature_batches_cover_all_rows(tmp_path):
    from cxrlt.data.dataset import CacheDataset, make_loader
    from cxrlt.post.inference import batched_forward, feature_batches, predict_tta

    model = _tiny_model(loss="ldam", ldam_s=4.0).eval()
    imgs = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    np.save(tmp_path / "images.npy", imgs[:, 0].numpy())
    ds = CacheDataset(tmp_path / "images.npy", np.arange(5), num_classes=3)
    rows, p = predict_tta(model, make_loader(ds, 2, workers=0), torch.device("cpu"), "none", progress=False)
    with torch.no_grad():
        ref = torch.sigmoid(model(model.normalize(imgs))).numpy()
    assert rows.tolist() == [0, 1, 2, 3, 4] and np.allclose(p, ref, atol=1e-6)
    feats = np.random.default_rng(0).random((7, 4)).astype(np.float32)
    r, out = batched_forward(torch.nn.Identity(), feature_batches(feats, 3), lambda f: 2 * f, torch.device("cpu"))
    assert r.tolist() == list(range(7)) and np.allclose(out, 2 * feats)


def test_a_checkpoint_of_another_format_is_refused_in_one_line(tmp_path):
    from cxrlt.core import config
    from cxrlt.core.errors import InputError
    from cxrlt.models.checkpoint import CHECKPOINT_FORMAT
    from cxrlt.post.inference import load_trained

    model = _tiny_model()
    cfg = config.resolve([], dict(model="test_resnet", pretrained=False))
    body = {"model": model.state_dict(), "config": cfg, "labels": ["a", "b", "c"]}
    torch.save({**body, "format": CHECKPOINT_FORMAT}, tmp_path / "now.pt")
    loaded, _ = load_trained(tmp_path / "now.pt")
    x = model.normalize(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)
    for name, extra, words in (("old.pt", {}, "no format version: written by an older version"),
                               ("next.pt", {"format": CHECKPOINT_FORMAT + 1}, f"format {CHECKPOINT_FORMAT + 1}")):
        torch.save({**body, **extra}, tmp_path / name)
        with pytest.raises(InputError) as e:
            load_trained(tmp_path / name)
        assert words in str(e.value) and str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)