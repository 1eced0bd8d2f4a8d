#!/usr/bin/env python
"""Predict probabilities for the val fold or the test list, with test-time augmentation.

    python predict.py --checkpoint runs/x/crt/model.pt --cache data/cache/cxrlt2026_512/test-<key> \
        --split test --out runs/x/pred_test.csv [--tta flip_scale] [--tta-merge logit]
        [--normal-gating-alpha 1] [--study-pool-weight 0.5] [--patient-context-weight 0.2]
        [--postproc-from runs/x/pred_val.csv.postproc.json] [--train-cache data/cache/x/train]

Output CSV (leaderboard format): `ImageID` + the label columns in the training CSV's order, one
row per image (in the cache index order), probabilities in [0, 1].

For --split val it also writes `<out>.postproc.json` (format: cxrlt/post/postproc.py): the val mAP of
every post-processing grid point (normal gating, study pooling, patient context) on the full val
fold, the test-like proxy subset and two patient-disjoint halves, the choice made on the
selection set (config select_on) and its honest, cross-fitted mAP. Pass that file to a test run
with --postproc-from to apply the values chosen on val. Patient context reads the training
labels of --train-cache (default: --cache when it holds training rows, else its sibling `train/`).

Post keys (tta, tta_merge, the post-processing values, select_on, ...) and run keys come from
--config (+ flags), as Make passes them; without --config from the checkpoint's copy (+ flags).
Train keys given as flags are ignored (the checkpoint's apply). When --out was already written from
the same weights, cache, split and post keys it is only touched, so that make settles.
"""

import argparse
import time

from cxrlt.core import config
from cxrlt.core.cli import main_wrapper, positive_int


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model.pt of a run (or of its crt/ folder)")
    ap.add_argument("--cache", required=True,
                    help="cache folder written by preprocess.py: the train cache for --split val, "
                         "the test list's cache (ROOT/test-<key>) for --split test")
    ap.add_argument("--split", choices=["val", "test"], required=True)
    ap.add_argument("--out", required=True, help="predictions CSV to write")
    ap.add_argument("--postproc-from", default=None, help="postproc.json from a val run: apply its choice")
    ap.add_argument("--train-cache", default=None, help="cache with the training labels (patient context)")
    ap.add_argument("--apply-choice", action="store_true",
                    help="--split val: write the val predictions post-processed with the choice made on val "
                         "(Make's POSTPROC=auto, so that ensemble weights are fitted on what the test "
                         "predictions will be)")
    ap.add_argument("--batch-size", type=positive_int, default=None,
                    help="images per inference batch (default 64 on the CPU, 256 on a GPU; the config key "
                         "batch_size is --batch_size here)")
    ap.add_argument("--config", nargs="*", default=[], help="YAML config file(s): their post and run keys apply")
    config.add_config_flags(ap)
    args = ap.parse_args(argv)
    chosen = config.load_postproc(args.postproc_from) if args.postproc_from else {}  # checked before any work

    import numpy as np
    import pandas as pd
    import torch

    from cxrlt.post import postproc
    from cxrlt.data.cache import open_cache
    from cxrlt.data.dataset import CacheDataset, make_loader
    from cxrlt.training.device import pick_device
    from cxrlt.core.errors import InputError
    from cxrlt.core import provenance
    from cxrlt.core.fileio import write_csv, write_json
    from cxrlt.pipeline import stage_inputs
    from cxrlt.pipeline.fingerprints import file_key, inputs_match, record_inputs, touch
    from cxrlt.post.inference import check_cache_size, inference_batch, load_trained, predict_tta
    from cxrlt.evaluation.selection import val_keys, val_sets_from_keys

    t0 = time.time()
    device = pick_device(args.cfg__device or "auto")
    model, ck = load_trained(args.checkpoint, device)
    cfg = config.stage_config(ck["config"], args.config, config.overrides_from_args(args), stage="predict")
    cfg.update(chosen)
    params = postproc.PostParams.from_cfg(cfg)
    labels = list(ck["labels"])
    cache = open_cache(args.cache)
    check_cache_size(ck, cache, args.checkpoint)
    if cache.labels and list(cache.labels) != labels:  # a test cache has no labels
        raise InputError(f"{args.cache}: cache labels differ from the checkpoint's ({args.checkpoint})")
    rows = cache.rows("train", fold=cfg["val_fold"]) if args.split == "val" else cache.rows("test")
    if len(rows) == 0:
        what = "a test list's cache (ROOT/test-<key>)" if args.split == "test" else "the train cache (ROOT/train)"
        raise InputError(f"{args.cache}/index.csv: no rows for split '{args.split}'; --split {args.split} "
                         f"reads {what}")
    keys = val_keys(cache, rows)
    if params.patient_context_weight > 0 and not cfg["allow_patient_linking"]:
        raise InputError(f"patient_context_weight {params.patient_context_weight:g}"
                         f"{' (from ' + args.postproc_from + ')' if chosen else ''} links test images to training "
                         f"patients, which CXR-LT 2026 forbids; set allow_patient_linking: true to opt in "
                         f"(docs/rules.md)")
    linking = bool(cfg["allow_patient_linking"])
    need_context = linking and (args.split == "val" or params.patient_context_weight > 0)
    ctx_cache = context_cache(args, cache) if need_context else None
    context = (postproc.Context.from_cache(ctx_cache, csv_patient=args.split == "test")
               if ctx_cache is not None else None)
    inputs = {"model": file_key(args.checkpoint), "cache": cache.key, "split": args.split,
              "post": stage_inputs.predict_keys(cfg), "apply_choice": args.apply_choice,
              "context": ctx_cache.key if ctx_cache is not None else None}
    if inputs_match(args.out, inputs):
        touch(args.out)
        print(f"{args.out}: up to date (same weights, cache and post-training keys)")
        return 0
    ds = CacheDataset(f"{args.cache}/images.npy", rows, num_classes=len(labels))
    batch = args.batch_size or inference_batch(device)
    loader = make_loader(ds, batch, workers=cfg["workers"], pin_memory=device.type == "cuda")
    amp = cfg["amp"] and device.type == "cuda"
    channels_last = cfg["channels_last"] and device.type == "cuda"
    if channels_last:  # the weights in the layout of the input: no layout conversion inside each conv
        model = model.to(memory_format=torch.channels_last)
    got_rows, probs = predict_tta(model, loader, device, cfg["tta"], cfg["tta_merge"], amp=amp,
                                  channels_last=channels_last,
                                  desc=f"predict {args.split} (tta {cfg['tta']})")
    assert np.array_equal(got_rows, rows)

    if args.split == "val":
        sets = val_sets_from_keys(keys, labels, cfg)
        res = postproc.choose_postproc(probs, keys, labels, context, sets, allow_patient_linking=linking)
        write_json(args.out + ".postproc.json", {**res, "tta": cfg["tta"]})
        ctx = (f"{res['n_with_context']} image(s) with patient context" if linking
               else "patient context off (allow_patient_linking: false)")
        print(f"{sets['describe']}; {ctx} (tta {cfg['tta']})")
        print(postproc.summary_line(res, applied=args.apply_choice))
        if args.apply_choice:
            params = postproc.PostParams.from_cfg({**cfg, **res["choice"]})
            what = "the raw predictions are kept" if res["kept_raw"] else "the choice above is applied"
            print(f"post-processing: {what} (POSTPROC=auto)")
        else:
            print("post-processing: the choice above is reported only, not applied (POSTPROC=off; "
                  "the predictions use the config's own post-processing keys)")

    probs = postproc.apply(probs, keys, labels, context, params)
    df = pd.DataFrame(np.clip(probs, 0.0, 1.0), columns=labels)
    df.insert(0, "ImageID", keys.ids)
    write_csv(args.out, df, float_format="%.6f")
    provenance.write(provenance.beside(args.out))
    config.save(cfg, f"{args.out}.config.yaml")  # the resolved config these predictions used (NAME.json, the zip)
    record_inputs(args.out, inputs)
    print(f"wrote {args.out}: {len(df)} images x {len(labels)} labels in {time.time() - t0:.1f}s")
    return 0


def context_cache(args, cache):
    """The cache whose training labels give the patient context (see the module docstring)."""
    from pathlib import Path

    from cxrlt.data.cache import open_cache
    from cxrlt.core.errors import InputError

    if args.train_cache:
        return open_cache(args.train_cache)
    if len(cache.rows("train")):
        return cache
    sibling = Path(args.cache).parent / "train"
    if not (sibling / "manifest.json").is_file():
        raise InputError(f"{args.cache}: no training rows for the patient context; pass --train-cache")
    return open_cache(sibling)


if __name__ == "__main__":
    main_wrapper(main)
