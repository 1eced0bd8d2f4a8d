"""cRT on the demo recipe: a real re-training that does not lower the mAP of the rare labels of its source run.

On the real demo recipe (configs/demo.yaml: test_resnet, cosine head, LDAM-DRW, 15 epochs at 64 px)
trained on the default-size demo set (conftest's demo_recipe_run, shared with the explain test). A
few minutes on a busy 2-core machine, so it is marked slow.

"Rare" is every label below the head group's 5% training frequency (medium and tail): the val fold
holds a single positive of each tail label, so a tail-only mAP is a coin flip (on this set it moves
0.52 -> 0.39 on three positives while the 24 rare labels' mAP rises 0.46 -> 0.49).
"""

import json

import numpy as np
import pytest
import torch

from cxrlt.data.cache import open_cache
from cxrlt.post.retrain_head import run as run_crt
from cxrlt.data.dataset import CacheDataset, make_loader
from cxrlt.post.inference import load_trained, predict_tta
from cxrlt.evaluation.metrics import average_precision_per_label, frequency_groups


def _val_ap(ckpt, cache, rows, y):
    model, _ = load_trained(ckpt)
    loader = make_loader(CacheDataset(cache.images_path, rows, num_classes=y.shape[1]), 128, workers=0)
    _, p = predict_tta(model, loader, torch.device("cpu"), "none", progress=False)
    return average_precision_per_label(y, p)


@pytest.mark.slow
def test_crt_retrains_the_head_from_scratch_and_keeps_the_rare_labels_map_on_the_demo_set(demo_recipe_run, tmp_path):
    cache, run, cfg = demo_recipe_run["cache"], demo_recipe_run["run"], demo_recipe_run["cfg"]
    out = tmp_path / "crt"
    s = run_crt(run, cache, out, {"workers": 0, "device": "cpu"}, config_files=["configs/demo.yaml"],
                log=lambda *a: None)

    # a re-training, not a fine-tune: the head started from a fresh initialisation (a fine-tune starts
    # at distance 0 from the trained head) ...
    assert s["reinit"] and s["head_distance"]["start_to_trained"] > 1.0, s["head_distance"]
    # ... and learnt the task from there: from near chance to within 15% of the trained head's val mAP
    curve = [json.loads(x)["val_mAP"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(curve) == cfg["crt_epochs"]
    assert curve[0] < 0.5 * s["original_mAP"] < 0.85 * s["original_mAP"] < curve[-1], (s["original_mAP"], curve)

    c = open_cache(cache)
    rows = c.rows("train", fold=cfg["val_fold"])
    y = c.targets(rows)
    train_y = c.targets(c.rows("train"))
    rare = np.array(frequency_groups(train_y.sum(0), len(train_y))) != "head"
    assert rare.sum() >= 10 and (y[:, rare].sum(0) > 0).sum() >= 10
    src = np.nanmean(_val_ap(run / "model.pt", c, rows, y)[rare])
    crt = np.nanmean(_val_ap(out / "model.pt", c, rows, y)[rare])
    assert crt >= src - 1e-6, (src, crt)
