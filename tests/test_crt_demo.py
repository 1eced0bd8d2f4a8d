"""cRT on the demo set: the re-trained head must not lower the tail labels' mAP of its source run.

This is the one test that trains the real demo recipe (configs/demo.yaml: test_resnet, LDAM-DRW,
15 epochs at 64 px on the default-size demo set), so it takes a minute or two.
"""

import numpy as np
import torch

from cxrlt import config
from cxrlt.cache import build_cache, open_cache
from cxrlt.crt import run as run_crt
from cxrlt.data import CacheDataset, make_loader
from cxrlt.demo_data import generate
from cxrlt.inference import load_trained, predict_tta
from cxrlt.metrics import average_precision_per_label, frequency_groups, group_map
from cxrlt.trainer import train


def _val_group_map(ckpt, cache_dir, rows, y, groups):
    model, _ = load_trained(ckpt)
    loader = make_loader(CacheDataset(f"{cache_dir}/images.npy", rows, num_classes=y.shape[1]), 128, workers=0)
    _, p = predict_tta(model, loader, torch.device("cpu"), "none", progress=False)
    return group_map(average_precision_per_label(y, p), groups)


def test_crt_matches_or_improves_tail_map_on_the_demo_set(tmp_path):
    data, cache, run = tmp_path / "demo", tmp_path / "cache", tmp_path / "run"
    generate(data, progress=False)  # the default demo set, as `make demo` makes it
    build_cache(data / "train.csv", data / "images", cache, size=64, test_csv=data / "CXRLT_2026_TEST_ALL_TASK1.csv",
                removal_csv=data / "Removal.csv", folds=5, seed=0, workers=1)
    cfg = config.resolve(["configs/demo.yaml"], {"workers": 0, "device": "cpu"})
    train(cfg, str(cache), str(run))
    run_crt(run, cache, run / "crt", {"workers": 0}, device_name="cpu", log=lambda *a: None)

    c = open_cache(cache)
    rows = c.rows("train", fold=cfg["val_fold"])
    y = c.targets(rows)
    train_y = c.targets(c.rows("train"))
    groups = frequency_groups(train_y.sum(0), len(train_y))
    assert "tail" in groups and not np.isnan(group_map(average_precision_per_label(y, y), groups)["tail"])
    src = _val_group_map(run / "model.pt", cache, rows, y, groups)
    crt = _val_group_map(run / "crt" / "model.pt", cache, rows, y, groups)
    assert crt["tail"] >= src["tail"] - 1e-6, (src, crt)
