#!/usr/bin/env python
"""Predict probabilities for the val fold or the test list, with test-time augmentation.

    python predict.py --checkpoint runs/x/crt/model.pt --cache data/cache/cxrlt2026_512 \
        --split test --out runs/x/pred_test.csv [--tta flip_scale] [--tta_merge logit]
        [--normal_gating_alpha 1] [--study_pool_weight 0.5] [--postproc-from runs/x/pred_val.postproc.json]

Output CSV (leaderboard format): `ImageID` + the label columns in the training CSV's order, one
row per image (in the cache index order), probabilities in [0, 1].

For --split val it also writes `<out>.postproc.json`: the val mAP with normal gating (alpha) and
study pooling (weight) over a small grid, and the best pair; pass that file to a test run with
--postproc-from to apply the values chosen on val. TTA, gating and pooling default to the values
in the checkpoint's config (keys tta, tta_merge, normal_gating_alpha, study_pool_weight).
"""

import argparse
import json
import time

from cxrlt import config
from cxrlt.cli import main_wrapper

GATING_GRID = [0.0, 0.5, 1.0, 2.0]
POOL_GRID = [0.0, 0.25, 0.5, 0.75]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model.pt of a run (or of its crt/ folder)")
    ap.add_argument("--cache", required=True, help="cache folder written by preprocess.py")
    ap.add_argument("--split", choices=["val", "test"], required=True)
    ap.add_argument("--out", required=True, help="predictions CSV to write")
    ap.add_argument("--postproc-from", default=None, help="postproc.json from a val run: apply its best values")
    ap.add_argument("--batch-size", type=int, default=64)
    config.add_config_flags(ap, ["tta", "tta_merge", "normal_gating_alpha", "study_pool_weight", "workers", "device", "amp"])
    args = ap.parse_args()

    import numpy as np
    import pandas as pd
    import torch

    from cxrlt.cache import open_cache
    from cxrlt.data import CacheDataset, make_loader
    from cxrlt.device import pick_device
    from cxrlt.errors import InputError
    from cxrlt.fileio import write_csv, write_json
    from cxrlt.inference import check_cache_size, load_trained, postprocess, predict_tta

    t0 = time.time()
    device = pick_device(args.cfg__device or "auto")
    model, ck = load_trained(args.checkpoint, device)
    cfg = config.apply_overrides(ck["config"], config.overrides_from_args(args))
    if args.postproc_from:
        chosen = json.load(open(args.postproc_from))["best"]
        cfg["normal_gating_alpha"], cfg["study_pool_weight"] = chosen["normal_gating_alpha"], chosen["study_pool_weight"]
    labels = list(ck["labels"])
    cache = open_cache(args.cache)
    check_cache_size(ck, cache, args.checkpoint)
    if list(cache.labels) != labels:
        raise InputError(f"{args.cache}: cache labels differ from the checkpoint's ({args.checkpoint})")
    rows = cache.rows("train", fold=cfg["val_fold"]) if args.split == "val" else cache.rows("test")
    if len(rows) == 0:
        raise InputError(f"{args.cache}/index.csv: no rows for split '{args.split}'")
    ds = CacheDataset(f"{args.cache}/images.npy", rows, num_classes=len(labels))
    loader = make_loader(ds, args.batch_size, workers=cfg["workers"], pin_memory=device.type == "cuda")
    amp = cfg["amp"] and device.type == "cuda"
    got_rows, probs = predict_tta(model, loader, device, cfg["tta"], cfg["tta_merge"], amp=amp,
                                  channels_last=cfg["channels_last"] and device.type == "cuda",
                                  desc=f"predict {args.split} (tta {cfg['tta']})")
    assert np.array_equal(got_rows, rows)
    idx = cache.index.set_index("row").loc[rows]
    pids, dates = idx["PatientID"].to_numpy(), idx["StudyDate_DICOM"].to_numpy()

    if args.split == "val":
        from cxrlt.metrics import score

        y = cache.targets(rows)
        grid = []
        for a in GATING_GRID:
            for w in POOL_GRID:
                if a and "Normal" not in labels:
                    continue
                m = score(y, postprocess(probs, labels, pids, dates, a, w))["mAP"]
                grid.append({"normal_gating_alpha": a, "study_pool_weight": w, "val_mAP": m})
        best = max(grid, key=lambda g: g["val_mAP"])
        raw = next(g for g in grid if g["normal_gating_alpha"] == 0 and g["study_pool_weight"] == 0)
        write_json(args.out + ".postproc.json", {"raw": raw, "best": best, "grid": grid, "tta": cfg["tta"]})
        print(f"val mAP {raw['val_mAP']:.4f} (tta {cfg['tta']}); best post-processing on val: gating alpha "
              f"{best['normal_gating_alpha']}, study pooling {best['study_pool_weight']} -> {best['val_mAP']:.4f}")

    probs = postprocess(probs, labels, pids, dates, cfg["normal_gating_alpha"], cfg["study_pool_weight"])
    df = pd.DataFrame(np.clip(probs, 0.0, 1.0), columns=labels)
    df.insert(0, "ImageID", idx["ImageID"].to_numpy())
    write_csv(args.out, df, float_format="%.6f")
    print(f"wrote {args.out}: {len(df)} images x {len(labels)} labels in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    main_wrapper(main)
