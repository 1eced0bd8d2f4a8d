"""Class activation maps (cxrlt/explain.py, explain.py) for the linear, cosine and CSRA heads."""

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_cfg
from cxrlt import explain as X
from cxrlt.models.checkpoint import CHECKPOINT_FORMAT
from cxrlt.models.model import CXRModel, build_head, build_model

HEADS = ["linear", "cosine", "csra"]
LABELS = ["spot", "other", "third"]


class SpotBackbone(nn.Module):
    """A stand-in backbone whose feature map is known: channel 0 is the image's brightness pooled
    to 8 x 8, channel 1 is constant. A head that reads channel 0 for label 0 finds 'spot' where
    the image is bright."""

    num_features = 2

    def forward_features(self, x):
        a = F.adaptive_avg_pool2d(x[:, :1], 8)
        return torch.cat([a - a.amin(dim=(2, 3), keepdim=True), torch.ones_like(a)], dim=1)

    def forward_head(self, f, pre_logits=True):
        return f


def spot_model(head: str) -> CXRModel:
    cfg = tiny_cfg(head=head, csra_lambda=0.5)
    h = build_head(cfg, 2, len(LABELS))
    with torch.no_grad():
        w = torch.zeros(len(LABELS), 2)
        w[0, 0] = 1.0  # label 0 reads channel 0 only
        w[1, 1] = 1.0
        w[2] = torch.tensor([-1.0, 0.5])
        if head == "linear":
            h.fc.weight.copy_(w)
            h.fc.bias.zero_()
        elif head == "cosine":
            h.weight.copy_(w)
        else:
            h.conv.weight.copy_(w[:, :, None, None])
    return CXRModel(SpotBackbone(), h, 2, in_chans=1).eval()


def spot_image(x0, y0, side=64, w=12) -> np.ndarray:
    img = np.full((side, side), 40, np.uint8)
    img[y0:y0 + w, x0:x0 + w] = 220
    return img


@pytest.mark.parametrize("head", HEADS)
def test_the_map_of_a_label_peaks_where_the_feature_it_reads_is(head):
    model = spot_model(head)
    for x0, y0 in [(8, 40), (44, 6), (26, 26)]:
        img = torch.from_numpy(spot_image(x0, y0))[None, None]
        probs, maps = X.class_maps(model, img, [0, 2], "auto")
        px, py = X.peak(maps[0, 0], (64, 64))
        assert x0 - 4 <= px < x0 + 16 and y0 - 4 <= py < y0 + 16, (head, (x0, y0), (px, py))
        # label 2 reads the opposite of channel 0: its map peaks away from the spot
        qx, qy = X.peak(maps[0, 1], (64, 64))
        assert not (x0 - 4 <= qx < x0 + 16 and y0 - 4 <= qy < y0 + 16), (head, (x0, y0), (qx, qy))
        assert maps.shape == (1, 2, 8, 8) and (maps >= 0).all() and probs.shape == (1, 3)


def test_gradcam_of_the_linear_head_is_its_class_activation_map():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(model="test_resnet", head="linear"), num_classes=4).eval()
    x = model.normalize(torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8))
    maps, logits = X.gradcam(model, x, [1, 3])
    with torch.no_grad():
        a = model.features(x)
        w = model.head.fc.weight
        # d logit_c / d A_k = w_ck / (h w) at every location: Grad-CAM = ReLU(w_c . A) / (h w)
        cam = torch.stack([F.relu(torch.einsum("k,bkhw->bhw", w[c], a)) for c in (1, 3)], 1) / a[0, 0].numel()
        assert torch.allclose(maps, cam, atol=1e-5)
        assert torch.allclose(logits, model(x), atol=1e-5)


def test_csra_attention_is_the_softmax_of_the_class_scores_over_locations():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(model="test_resnet", head="csra", csra_temperature=2.0), num_classes=3).eval()
    x = model.normalize(torch.randint(0, 255, (1, 1, 64, 64), dtype=torch.uint8))
    att, _ = X.csra_attention(model, x, [0, 2])
    assert att.shape == (1, 2, 2, 2)
    assert torch.allclose(att.sum(dim=(2, 3)), torch.ones(1, 2), atol=1e-6)
    # csra_normalize (the default): each class's scores divided by its weight's norm
    s = model.head.conv(model.features(x))[0, 2].flatten() / model.head.conv.weight[2].norm()
    assert torch.allclose(att[0, 1].flatten(), torch.softmax(2.0 * s, 0), atol=1e-6)


def test_a_finer_layer_gives_a_finer_map_and_a_wrong_one_is_named():
    model = build_model(tiny_cfg(model="test_resnet", head="cosine"), num_classes=3).eval()
    x = model.normalize(torch.randint(0, 255, (1, 1, 64, 64), dtype=torch.uint8))
    assert X.gradcam(model, x, [0])[0].shape[-2:] == (2, 2)
    assert X.gradcam(model, x, [0], layer="layer2")[0].shape[-2:] == (8, 8)
    with pytest.raises(X.InputError, match="--layer 'nope'.*layer1"):
        X.gradcam(model, x, [0], layer="nope")
    with pytest.raises(X.InputError, match="needs a csra or bn_attention head"):
        X.class_maps(model, torch.zeros(1, 1, 64, 64, dtype=torch.uint8), [0], "attention")


@pytest.mark.parametrize("head", [*HEADS, "bn_attention", "ml_decoder", "seed_linear"])
def test_explain_cli_writes_a_panel_per_image_for_every_head(tmp_path, head):
    import explain as script
    from cxrlt.core.fileio import torch_save

    cfg = tiny_cfg(model="test_resnet", head=head)
    model = build_model(cfg, num_classes=len(LABELS))
    torch_save({"format": CHECKPOINT_FORMAT, "config": cfg, "labels": LABELS, "model": model.state_dict(), "image_size": 64},
               tmp_path / "m.pt")
    files = []
    for i, (x0, y0) in enumerate([(5, 30), (40, 10)]):
        f = tmp_path / f"img{i}.png"
        cv2.imwrite(str(f), cv2.resize(spot_image(x0, y0), (80, 96)).astype(np.uint16) * 200)  # 16-bit, not square
        files.append(str(f))
    assert script.main(["--checkpoint", str(tmp_path / "m.pt"), "--files", *files, "--top", "2",
                        "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    rows = pd.read_csv(tmp_path / "out" / "explain.csv")
    assert list(rows["ImageID"]) == ["img0.png", "img0.png", "img1.png", "img1.png"]
    assert set(rows["method"]) == {"attention" if head in ("csra", "bn_attention") else "gradcam"}
    assert rows["prob"].between(0, 1).all() and rows["peak_x"].isin([16, 48]).all()  # 2 x 2 maps at 64 px
    for i in range(2):
        assert (tmp_path / "out" / f"img{i}.png").stat().st_size > 3000
    # chosen labels instead of the top predicted ones; an unknown label is a one-line error
    assert script.main(["--checkpoint", str(tmp_path / "m.pt"), "--files", files[0], "--labels", "third",
                        "--out", str(tmp_path / "o2")]) == 0
    assert list(pd.read_csv(tmp_path / "o2" / "explain.csv")["label"]) == ["third"]
    with pytest.raises(X.InputError, match="'nodule' is not a label"):
        script.main(["--checkpoint", str(tmp_path / "m.pt"), "--files", files[0], "--labels", "nodule",
                     "--out", str(tmp_path / "o3")])


@pytest.mark.parametrize("head", HEADS)
def test_pointing_game_scores_peaks_inside_boxes_given_in_original_pixels(head):
    model = spot_model(head)
    ck = {"labels": LABELS}
    rng = np.random.default_rng(0)
    spots = [(int(rng.integers(0, 52)), int(rng.integers(0, 52))) for _ in range(12)]
    images = np.stack([spot_image(x0, y0) for x0, y0 in spots] + [spot_image(0, 0, w=0)] * 6)
    ids = [f"im{i}.png" for i in range(len(images))]
    y = np.zeros((len(images), 3), np.float32)
    y[:12, 0] = 1
    sizes = {i: (96, 128) for i in ids}  # the original files: 128 wide, 96 high; the cache squashed them to 64
    rows = [{"ImageID": ids[k], "label": "spot", "x0": x0 * 2, "y0": y0 * 1.5, "x1": (x0 + 12) * 2,
             "y1": (y0 + 12) * 1.5} for k, (x0, y0) in enumerate(spots)]
    res = X.pointing_game(model, ck, images, ids, y, pd.DataFrame(rows), sizes)
    assert (res["n"], res["hits"], res["boxes"], res["map_size"]) == (12, 12, 12, [8, 8]) and res["ceiling"] == 1
    assert res["random_rate"] == pytest.approx(144 / 64 ** 2)
    # the same boxes mirrored to the other side of the image: no hit
    mirrored = pd.DataFrame([{**r, "x0": 128 - r["x1"], "x1": 128 - r["x0"], "y0": 96 - r["y1"], "y1": 96 - r["y0"]}
                             for r, (x0, y0) in zip(rows, spots) if abs(x0 - 26) > 10 or abs(y0 - 26) > 10])
    res = X.pointing_game(model, ck, images, ids, y, mirrored, sizes)
    assert res["n"] == len(mirrored) > 0 and res["hits"] == 0


def test_a_wrong_boxes_file_is_a_one_line_error(tmp_path):
    f = tmp_path / "boxes.csv"
    for text, message in [("ImageID,label,x0,y0,x1\n", "missing column(s) ['y1']"),
                          ("ImageID,label,x0,y0,x1,y1\na.png,spot,1,2,x,4\n", "row 2, column x1: not a number"),
                          ("ImageID,label,x0,y0,x1,y1\na.png,spot,5,2,5,4\n", "row 2: empty box"),
                          ("ImageID,label,x0,y0,x1,y1\na.png,nodule,1,2,3,4\n", "'nodule' is not a label")]:
        f.write_text(text)
        with pytest.raises(X.InputError) as e:
            X.read_boxes(f, LABELS)
        assert message in str(e.value) and str(f) in str(e.value)


@pytest.mark.slow
def test_maps_of_a_demo_run_point_inside_the_generators_boxes(demo_recipe_run, tmp_path):
    """The pointing game on the demo recipe (cosine head: Grad-CAM), trained on the default-size demo set
    (conftest's demo_recipe_run, shared with the cRT demo test), scored on its val fold with the
    generator's boxes. At 64 px the backbone's map is 2 x 2, so a box between the cell centres is out of
    reach (the ceiling)."""
    import json

    import explain as script

    run, cache, data = demo_recipe_run["run"], demo_recipe_run["cache"], demo_recipe_run["data"]
    assert script.main(["--checkpoint", str(run / "model.pt"), "--cache", str(cache), "--n", "2",
                        "--boxes", str(data / "boxes.csv"), "--image-dir", str(data / "images"),
                        "--out", str(tmp_path / "explain"), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "explain" / "pointing.json").read_text())
    print(f"pointing game: {res['hits']}/{res['n']} = {res['hit_rate']:.3f} vs random {res['random_rate']:.3f}, "
          f"ceiling {res['ceiling']:.3f} at {res['map_size']} ({res['method']})")
    assert res["n"] >= 40 and res["method"] == "gradcam"
    assert res["hit_rate"] >= 1.8 * res["random_rate"]
    assert res["hit_rate"] >= 0.6 * res["ceiling"]


def test_explain_cli_on_cache_images_with_labels_and_the_pointing_game(tmp_path, demo_cache, demo_dataset):
    import json

    import explain as script
    from cxrlt.data.cache import open_cache
    from cxrlt.core.fileio import torch_save

    cache = open_cache(demo_cache)
    cfg = tiny_cfg(model="test_resnet", head="csra")
    model = build_model(cfg, num_classes=len(cache.labels))
    torch_save({"format": CHECKPOINT_FORMAT, "config": cfg, "labels": cache.labels, "model": model.state_dict()},
               tmp_path / "m.pt")
    out = tmp_path / "out"
    assert script.main(["--checkpoint", str(tmp_path / "m.pt"), "--cache", str(demo_cache), "--n", "3", "--top", "1",
                        "--boxes", str(demo_dataset / "boxes.csv"), "--image-dir", str(demo_dataset / "images"),
                        "--out", str(out)]) == 0
    rows = pd.read_csv(out / "explain.csv")
    val = cache.rows("train", fold=cfg["val_fold"])
    labelled = val[np.nansum(cache.targets(val), axis=1) > 0][:3]
    assert list(rows["ImageID"]) == list(cache.ids(labelled))  # the first labelled val-fold images
    truth = cache.targets(labelled)
    for r, t in zip(rows.itertuples(), truth):
        assert r.labelled == int(t[cache.labels.index(r.label)])
    res = json.loads((out / "pointing.json").read_text())
    assert {"n", "hit_rate", "random_rate", "ceiling", "per_label"} <= set(res) and res["boxes"] > 0
    with pytest.raises(X.InputError, match="not in the cache"):
        script.main(["--checkpoint", str(tmp_path / "m.pt"), "--cache", str(demo_cache), "--images", "nope.png",
                     "--out", str(out)])
