"""Decoupled classifier re-training (cRT, Kang et al. ICLR 2020) and tau-normalisation.

cRT: freeze the trained backbone, re-initialise (or keep) the head and train only the head with
class-balanced (class-aware) sampling. With augmentation off the backbone output never changes,
so it is computed once per image and cached (`features_train.npy`, `features_val.npy`, float32),
and every head epoch is a few matrix products instead of a full backbone pass.

tau-normalisation: training-free; w_j <- w_j / ||w_j||^tau for each class weight vector,
tau picked on the val fold from a grid (tau = 0 is the unchanged head).

The source run's original head is always a candidate: the output keeps whichever head scores
the best val mAP, so re-training never makes the val mAP worse than the source run.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from .fileio import append_jsonl, torch_save, write_json

TAU_GRID = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def extract_features(model, images_path, rows, device, batch_size=64, workers=2, amp=True, desc="features"):
    """Head inputs (model.head_input) for cache rows, as a float32 array (n, ...).

    float32, not float16: the original head scored on these features must reproduce the
    trained run's val mAP (fp16 rounding moved it by ~1e-3); 143K x 1536 floats is 0.9 GB.
    """
    from .data import CacheDataset, make_loader
    from .inference import batched_forward, model_input

    ds = CacheDataset(images_path, rows, num_classes=1)
    loader = make_loader(ds, batch_size, workers=workers, pin_memory=device.type == "cuda")
    _, out = batched_forward(model, loader, lambda x: model.head_input(model_input(model, x)), device, amp,
                             progress=True, desc=desc)
    return out


def head_probs(head, feats: np.ndarray, device, batch_size=1024) -> np.ndarray:
    """sigmoid(head.classify(features)) for an (n, ...) feature array -> (n, C) float32."""
    from .inference import batched_forward, feature_batches

    return batched_forward(head, feature_batches(feats, batch_size), lambda f: torch.sigmoid(head.classify(f)),
                           device)[1]


def classifier_weight(head) -> torch.nn.Parameter:
    """The (C, F[,1,1]) class weight tensor of a head: the parameter whose first dim is the class count."""
    cands = [(n, p) for n, p in head.named_parameters() if p.ndim >= 2]
    if not cands:
        raise ValueError("head has no class weight matrix")
    return cands[0][1]


@torch.no_grad()
def tau_normalise(head, tau: float):
    h = copy.deepcopy(head)
    w = classifier_weight(h)
    norms = w.flatten(1).norm(dim=1).clamp_min(1e-12)
    w.div_((norms ** tau).view(-1, *([1] * (w.ndim - 1))))
    return h


def train_head(model, feats_tr, y_tr, feats_val, y_val, cfg, device, out_dir: Path, log=print):
    """cRT on cached features. Returns (best head, summary dict). Logs to out_dir/metrics.jsonl."""
    from .losses import build_loss
    from .metrics import score
    from .samplers import build_sampler

    counts = y_tr.sum(0)
    head = copy.deepcopy(model.head).to(device)
    for p in head.parameters():
        p.requires_grad_(True)
    if cfg["crt_reinit"]:
        torch.manual_seed(cfg["seed"])
        for m in head.modules():
            if hasattr(m, "reset_parameters") and m is not head:
                m.reset_parameters()
    # the head's loss re-balances through the sampler; the backbone run's DRW schedule does not apply
    loss_fn = build_loss({**cfg, "drw_epoch": -1}, counts, len(y_tr), name=cfg["crt_loss"]).to(device)
    sampler = build_sampler(cfg["crt_sampler"], y_tr, cfg, seed=cfg["seed"])
    bs = min(cfg["crt_batch_size"], len(y_tr))
    steps_per_epoch = max(1, len(sampler) // bs)
    total = steps_per_epoch * cfg["crt_epochs"]
    opt = torch.optim.AdamW(head.parameters(), lr=cfg["crt_lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))

    base = score(y_val, head_probs(model.head.to(device), feats_val, device))
    best = {"epoch": -1, "mAP": base["mAP"], "source": "original head"}
    best_head = copy.deepcopy(model.head)
    log(f"cRT: original head val mAP {base['mAP']:.4f}")
    y_t = torch.from_numpy(y_tr.astype(np.float32))
    for epoch in range(cfg["crt_epochs"]):
        sampler.set_epoch(epoch)
        torch.manual_seed(cfg["seed"] * 1009 + epoch)
        idx = np.fromiter(iter(sampler), dtype=np.int64)
        head.train()
        tot, t0 = 0.0, time.perf_counter()
        for s in range(steps_per_epoch):
            b = idx[s * bs:(s + 1) * bs]
            f = torch.from_numpy(feats_tr[b].astype(np.float32)).to(device)
            loss = loss_fn(head.classify(f).float(), y_t[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
        v = score(y_val, head_probs(head, feats_val, device))
        rec = {"epoch": epoch, "train_loss": tot / steps_per_epoch, "val_mAP": v["mAP"], "val_mAUC": v["mAUC"],
               "time_s": time.perf_counter() - t0}
        append_jsonl(out_dir / "metrics.jsonl", rec)
        if v["mAP"] > best["mAP"]:
            best = {"epoch": epoch, "mAP": v["mAP"], "source": "cRT"}
            best_head = copy.deepcopy(head).cpu()
        log(f"cRT epoch {epoch + 1}/{cfg['crt_epochs']}  loss {rec['train_loss']:.4f}  val mAP {v['mAP']:.4f}")
    return best_head.cpu(), {"original_mAP": base["mAP"], "best": best}


def run(run_dir: str, cache_dir: str, out_dir: str, cfg_overrides: dict, method: str = "crt",
        device_name: str = "auto", feature_cache: bool = True, log=print) -> dict:
    from .cache import open_cache
    from .config import apply_overrides
    from .device import pick_device
    from .errors import InputError
    from .inference import check_cache_size, load_trained
    from .metrics import score

    run_dir, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run_dir.resolve():
        raise InputError(f"{out}: retrain_head.py never writes into the backbone run folder; use e.g. {run_dir}/crt")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a re-run starts the head log afresh
    device = pick_device(device_name)
    model, ck = load_trained(run_dir / "model.pt", device)
    cfg = apply_overrides(ck["config"], cfg_overrides)
    cache = open_cache(cache_dir)
    check_cache_size(ck, cache, run_dir / "model.pt")
    if list(cache.labels) != list(ck["labels"]):
        raise InputError(f"{cache_dir}: cache labels differ from the run's ({run_dir / 'model.pt'})")
    tr_rows = cache.rows("train", exclude_fold=cfg["val_fold"])
    va_rows = cache.rows("train", fold=cfg["val_fold"])
    y_tr, y_va = cache.targets(tr_rows), cache.targets(va_rows)
    images = Path(cache_dir) / "images.npy"
    amp = cfg["amp"] and device.type == "cuda"
    for p in model.parameters():
        p.requires_grad_(False)

    t0 = time.perf_counter()
    feats = {}
    for name, rows in (("train", tr_rows), ("val", va_rows)):
        path = out / f"features_{name}.npy"
        if feature_cache and path.exists() and np.load(path, mmap_mode="r").shape[0] == len(rows):
            feats[name] = np.load(path, mmap_mode="r")
            continue
        f = extract_features(model, images, rows, device, workers=cfg["workers"], amp=amp, desc=f"features {name}")
        if feature_cache:
            from .fileio import atomic_path
            with atomic_path(path, suffix=".npy") as tmp:
                np.save(tmp, f)
        feats[name] = f
    t_feat = time.perf_counter() - t0

    summary = {"method": method, "source": str(run_dir / "model.pt"), "feature_seconds": t_feat}
    if method == "tau":
        grid = []
        for tau in TAU_GRID:
            h = tau_normalise(model.head, tau).to(device)
            grid.append({"tau": tau, "val_mAP": score(y_va, head_probs(h, feats["val"], device))["mAP"]})
        best = max(grid, key=lambda g: g["val_mAP"])
        new_head = tau_normalise(model.head, best["tau"]).cpu()
        summary.update(grid=grid, best=best, original_mAP=grid[0]["val_mAP"])
        log(f"tau-normalisation: best tau {best['tau']} val mAP {best['val_mAP']:.4f} "
            f"(tau 0: {grid[0]['val_mAP']:.4f})")
    else:
        t1 = time.perf_counter()
        new_head, info = train_head(model, np.asarray(feats["train"]), y_tr, np.asarray(feats["val"]), y_va,
                                    cfg, device, out, log=log)
        summary.update(info, head_train_seconds=time.perf_counter() - t1)
    model = model.cpu()
    model.head = new_head
    y_p = head_probs(model.head.to(device), np.asarray(feats["val"]), device)
    final = score(y_va, y_p)
    summary["val_mAP"] = final["mAP"]
    summary["val_mAUC"] = final["mAUC"]
    meta = {k: v for k, v in ck.items() if k not in ("model",)}
    meta.update(config=cfg, crt=summary, best_map=final["mAP"])
    write_json(out / "summary.json", summary)
    # model.pt is make's target: written last, so that its presence means the stage is complete
    torch_save({**meta, "model": model.cpu().state_dict()}, out / "model.pt")
    log(f"wrote {out / 'model.pt'}: val mAP {final['mAP']:.4f} (source run {summary['original_mAP']:.4f})")
    return summary
