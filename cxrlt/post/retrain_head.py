"""Decoupled classifier re-training (cRT, Kang et al. ICLR 2020) and tau-normalisation.

cRT: freeze the trained backbone, re-initialise the head (crt_reinit, seeded by `seed`, through
the head's own reset_parameters: every parameter, biases included) or keep it (fine-tuning), and
train only the head with crt_sampler batches (class-aware by default), crt_loss on real logits.

tau-normalisation (`--method tau`, training-free): w_j <- w_j / ||w_j||^tau for each class weight,
tau chosen on the val fold from TAU_GRID (tau = 0 is the unchanged head). It multiplies class j's
scores by a positive constant, which leaves the ranking of the images for that label (its AP,
hence the mAP) unchanged unless the scores pass through a non-linearity before the logit: of
our heads only CSRA's spatial attention on raw scores (softmax over locations, csra_temperature < 99,
csra_normalize false) does. So it runs on such a head and is refused, with the reason, on the others
(cosine and normalised CSRA: the scores are divided by the weight norms, so tau changes nothing;
linear, seed_linear, bn_attention, ml_decoder and max-pooling CSRA: a positive factor per label on
the last linear map, whose attention (if any) does not read that weight).

Every head re-initialises through its own reset_parameters: bn_attention its BatchNorm (running
statistics too), linear layer and attention conv; ml_decoder its embedding, decoder layers, group
fully-connected output and its fixed queries (drawn again from the seed).

The source run's original head is always a candidate (the first: the no-choice default), then
each cRT epoch's head (or each tau of the grid). Every candidate's val predictions are scored on
the val subsets of cxrlt/evaluation/selection.py (full fold, test-like proxy, the two patient halves of the
selection set); the output keeps the head with the best mAP on the selection set (config select_on:
the proxy when the cache knows projections, else full; ties keep the earlier candidate), so
re-training never makes the selection-set mAP worse than the source run's. The honest number of
that choice is cross-fitted: the head chosen on half A scored on half B and vice versa, as a gain
over the original head (cxrlt/evaluation/selection.py choose()).

Output folder (never the run folder itself): the feature files, metrics.jsonl, summary.json and
model.pt (the full model with the chosen head, written last; its sidecar `.model.pt.inputs.json`
records what it was built from: weights, cache, crt_* keys, seed and the selection keys select_on /
proxy_require_finding; the stage is up to date, and only touches model.pt, when those match).

The fields of metrics.jsonl and summary.json: docs/formats.md ("cRT folder").
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from cxrlt.core import config, provenance
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import append_jsonl, output_lock, torch_save, write_json
from cxrlt.data.cache import open_cache
from cxrlt.data.labelmask import annotated_counts, has_unannotated
from cxrlt.data.samplers import build_sampler
from cxrlt.evaluation.metrics import score
from cxrlt.evaluation.selection import (choose, json_float, named_scores, score_row, set_sizes, unlabelled_sets,
                                        val_sets)
from cxrlt.models.checkpoint import check_format, load_checkpoint
from cxrlt.models.losses import build_loss
from cxrlt.models.model import CSRA_MAX_TEMPERATURE
from cxrlt.pipeline.fingerprints import file_key, inputs_match, record_inputs, touch
from cxrlt.pipeline.stage_inputs import crt_keys
from cxrlt.post.features import classify_fp32, prepare_inputs
from cxrlt.post.inference import check_cache_size, load_trained
from cxrlt.training.device import pick_device

TAU_GRID = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


# ---- configuration and fingerprints --------------------------------------------------------------

# ---- heads: re-initialisation, tau, distances ----------------------------------------------------

def starting_head(head: torch.nn.Module, reinit: bool, seed: int) -> torch.nn.Module:
    """A trainable copy of `head`: re-initialised by its own reset_parameters (all parameters,
    biases included) from `seed` when reinit, else the trained weights (fine-tuning)."""
    h = copy.deepcopy(head).cpu()
    if reinit:
        with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's RNG
            torch.manual_seed(seed)
            h.reset_parameters()
    for p in h.parameters():
        p.requires_grad_(True)
    return h


def head_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||a - b|| / ||b|| over all parameters (0: the same weights)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    num = sum(float((pa[k].detach().cpu() - pb[k].detach().cpu()).pow(2).sum()) for k in pb)
    den = sum(float(p.detach().cpu().pow(2).sum()) for p in pb.values())
    return math.sqrt(num / max(den, 1e-30))


def classifier_weight(head) -> torch.nn.Parameter:
    """The (C, F[,1,1]) class weight tensor of a head: its first parameter with >= 2 dims."""
    cands = [p for _, p in head.named_parameters() if p.ndim >= 2]
    if not cands:
        raise ValueError("head has no class weight matrix")
    return cands[0]


@torch.no_grad()
def tau_normalise(head, tau: float):
    """A copy of head with each class weight w_j replaced by w_j / ||w_j||^tau (bias unchanged)."""
    h = copy.deepcopy(head)
    w = classifier_weight(h)
    norms = w.flatten(1).norm(dim=1).clamp_min(1e-12)
    w.div_((norms ** tau).view(-1, *([1] * (w.ndim - 1))))
    return h


def check_tau_applies(cfg: dict) -> None:
    """InputError naming the head when tau-normalisation cannot change its val mAP (module doc)."""

    head = cfg["head"]
    positive = ("w_j/||w_j||^tau multiplies each label's score by a positive constant before its bias, which "
                "keeps every per-label ranking, so the val mAP is the same for every tau")
    why = {
        "cosine": "the cosine head normalises every class weight (all norms are 1), so tau changes nothing",
        "linear": f"on a linear head {positive}",
        "seed_linear": f"on the seed_linear head {positive}",
        "bn_attention": f"on the bn_attention head (its attention comes from its own 1x1 conv) {positive}",
        "ml_decoder": "the ml_decoder head has no single class weight matrix (its labels are scored by the "
                      "group fully-connected layer, where a positive factor per label keeps every ranking)",
    }.get(head)
    if head == "csra" and cfg["csra_normalize"]:
        why = "csra_normalize divides each class's scores by its weight's norm, so tau changes nothing"
    elif head == "csra" and cfg["csra_temperature"] >= CSRA_MAX_TEMPERATURE:
        why = ("with csra_temperature >= 99 (max pooling) the CSRA head's logit is a positive multiple of "
               "the weight's scale, so the val mAP is the same for every tau")
    if why:
        raise InputError(f"--method tau: {why}; use --method crt (tau changes the ranking only through "
                         f"CSRA's spatial attention on raw scores: csra_normalize false, csra_temperature < "
                         f"{CSRA_MAX_TEMPERATURE:g})")


# ---- cRT -------------------------------------------------------------------------------------------

class HeadChoice:
    """The candidates' score table and the head kept so far (module doc: chosen on the selection
    set; candidate 0 is the original head, the no-choice default of the honest number)."""

    def __init__(self, y_val, sets: dict):
        self.y, self.sets, self.so = y_val, sets, sets["select_on"]
        self.table: list[dict] = []

    def add(self, probs: np.ndarray) -> tuple[dict, dict, bool]:
        """Score one candidate's val probabilities -> (metrics.score of the full fold, choose()
        over the candidates so far, whether this candidate is now the one kept)."""

        self.table.append(score_row(self.y, self.sets, lambda idx: probs[idx]))
        sel = choose(self.table, self.so)
        return score(self.y, probs), sel, sel["choice"] == len(self.table) - 1

    def scores(self, i: int) -> dict:

        return named_scores(self.table[i], self.so)

    def summary(self, sel: dict) -> dict:
        """The selection fields every head method's summary has (module doc)."""

        return {"select_on": self.so, "describe": self.sets["describe"], "sets": set_sizes(self.sets),
                "original": self.scores(0), "val_honest_mAP": json_float(sel["honest"]),
                "honest_gain": json_float(sel["honest_gain"])}


def _val_sets(y_val, sets):

    return sets if sets is not None else unlabelled_sets(y_val)


def train_head(model, train_in, y_tr, val_in, y_val, cfg, device, out_dir: Path, log=print, sets=None):
    """cRT of model.head on the head inputs train_in / val_in (CachedInputs or BackboneInputs).

    sets: cxrlt.evaluation.selection.val_sets of the val rows (None: every val image its own patient, the
    full set is the selection set). Returns (kept head, last re-trained head, info dict). Logs one
    line per epoch to out_dir/metrics.jsonl.
    """

    counts, annotated = annotated_counts(y_tr)  # over annotated entries (NaN = unannotated)
    start = starting_head(model.head, cfg["crt_reinit"], cfg["seed"])
    head = copy.deepcopy(start).to(device)
    # the head's loss re-balances through the sampler; the backbone run's DRW schedule does not apply
    loss_fn = build_loss({**cfg, "drw_epoch": -1}, counts, annotated, name=cfg["crt_loss"],
                         nan_mask=has_unannotated(y_tr)).to(device)
    sampler = build_sampler(cfg["crt_sampler"], y_tr, cfg, seed=cfg["seed"])
    bs = min(cfg["crt_batch_size"], len(y_tr))
    steps_per_epoch = max(1, len(sampler) // bs)
    total = steps_per_epoch * cfg["crt_epochs"]
    opt = torch.optim.AdamW(head.parameters(), lr=cfg["crt_lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))

    choice = HeadChoice(y_val, _val_sets(y_val, sets))
    base, sel, _ = choice.add(val_in.probs(model.head.to(device), device))
    kept, best_head = -1, copy.deepcopy(model.head).cpu()
    how = f"re-initialised (seed {cfg['seed']})" if cfg["crt_reinit"] else "fine-tuned from the trained weights"
    log(f"cRT: original head val mAP {_fmt(base['mAP'])} (proxy {_fmt(choice.table[0]['proxy'])}); the re-trained "
        f"head is {how}; the head kept is chosen on {choice.so}: {choice.sets['describe']}")
    y_t = torch.from_numpy(y_tr.astype(np.float32))
    for epoch in range(cfg["crt_epochs"]):
        sampler.set_epoch(epoch)
        idx = np.fromiter(iter(sampler), dtype=np.int64)[:steps_per_epoch * bs]
        head.train()
        tot, t0 = torch.zeros((), device=device), time.perf_counter()
        for s, f in enumerate(train_in.batches(idx, bs, device)):
            b = idx[s * bs:(s + 1) * bs]
            loss = loss_fn(classify_fp32(head, f), y_t[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot = tot + loss.detach()  # on the device: one read per epoch, not a sync per step
        v, sel, improved = choice.add(val_in.probs(head, device))
        if improved:
            kept, best_head = epoch, copy.deepcopy(head).cpu()
        rec = {"epoch": epoch, "train_loss": float(tot) / steps_per_epoch, **choice.scores(epoch + 1),
               "val_mAUC": json_float(v["mAUC"]), "select_on": choice.so, "val_honest_mAP": json_float(sel["honest"]),
               "best": kept, "time_s": time.perf_counter() - t0}
        append_jsonl(out_dir / "metrics.jsonl", rec)
        log(f"cRT epoch {epoch + 1}/{cfg['crt_epochs']}  loss {rec['train_loss']:.4f}  val mAP {_fmt(rec['val_mAP'])}"
            f"  proxy {_fmt(rec['val_proxy_mAP'])}  honest {_fmt(rec['val_honest_mAP'])} ({choice.so})"
            + ("  *kept*" if improved else ""))
    last = head.cpu()
    trained = model.head.cpu()
    name = lambda i: {"epoch": i - 1, "source": "original head" if i == 0 else "cRT"}  # noqa: E731 (table index)
    info = {"original_mAP": json_float(base["mAP"]), "best": {**name(kept + 1), **choice.scores(kept + 1)},
            **choice.summary(sel), "half_choices": [name(i) for i in sel["half_choices"]],
            "reinit": bool(cfg["crt_reinit"]),
            "head_distance": {"start_to_trained": head_distance(start, trained),
                              "end_to_start": head_distance(last, start),
                              "end_to_trained": head_distance(last, trained)}}
    return best_head, last, info


def _fmt(x) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{x:.4f}"


def _tau_search(model, val_in, y_va, device, log, sets=None):
    """The tau of TAU_GRID (tau 0, the original head, first) kept on the selection set -> (head, info)."""
    choice = HeadChoice(y_va, _val_sets(y_va, sets))
    for tau in TAU_GRID:
        _, sel, _ = choice.add(val_in.probs(tau_normalise(model.head, tau).to(device), device))
    grid = [{"tau": tau, **choice.scores(i)} for i, tau in enumerate(TAU_GRID)]
    best = grid[sel["choice"]]
    log(f"tau-normalisation: tau {best['tau']} kept on {choice.so} (val mAP {_fmt(best['val_select_mAP'])}; tau 0: "
        f"{_fmt(grid[0]['val_select_mAP'])}); honest {_fmt(sel['honest'])}")
    return tau_normalise(model.head, best["tau"]).cpu(), {
        "grid": grid, "best": best, "original_mAP": grid[0]["val_mAP"], **choice.summary(sel),
        "half_choices": [{"tau": TAU_GRID[i]} for i in sel["half_choices"]]}


def run(run_dir, cache_dir, out_dir, cfg_overrides: dict | None = None, method: str | None = None,
        device_name: str | None = None, config_files=(), log=print) -> dict:
    """retrain_head.py: cRT, tau or nothing (`method`, default: the config's crt_method) for the run in
    run_dir on cache_dir, written to out_dir -> summary."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run_dir.resolve():
        raise InputError(f"{out}: retrain_head.py never writes into the backbone run folder; use e.g. {run_dir}/crt")
    if method not in (None, "crt", "tau", "none"):
        raise InputError(f"--method {method}: choose crt, tau or none")
    src = run_dir / "model.pt"
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        ck = load_checkpoint(src)
        if "config" not in ck or "labels" not in ck:
            raise InputError(f"{src}: not a cxrlt checkpoint (no 'config' or 'labels' entry)")
        check_format(ck, src)
        cfg = config.stage_config(config.check_dict(ck["config"], str(src)), config_files, cfg_overrides, log=log,
                                  stage="cRT")
        method = method or cfg["crt_method"]
        cfg["crt_method"] = method
        if method == "tau":
            check_tau_applies(cfg)
        cache = open_cache(cache_dir)
        check_cache_size(ck, cache, src)
        if list(cache.labels) != list(ck["labels"]):
            raise InputError(f"{cache_dir}: cache labels differ from the run's ({src})")
        model_key = file_key(src)
        stage_inputs = {"model": model_key, "cache": cache.key, "method": method,
                        "post": crt_keys(cfg)}
        target = out / "model.pt"
        if inputs_match(target, stage_inputs) and (out / "summary.json").is_file():
            touch(target)
            log(f"{target}: up to date (same weights, cache and crt_* keys)")
            return json.loads((out / "summary.json").read_text(encoding="utf-8"))
        provenance.write(out / "provenance.json")
        if method == "none":
            return _keep_head(src, ck, out, cfg, stage_inputs, log)
        del ck
        return _build(src, cache, out, cfg, method, stage_inputs, model_key,
                      device_name or cfg["device"], log)


def _keep_head(src: Path, ck: dict, out: Path, cfg: dict, stage_inputs: dict, log) -> dict:
    """crt_method none: the run's own model, as trained, is the head stage's output (a study's
    "no post-training" variant shares the backbone run with the cRT variants)."""

    trained = ck.get("selection") or {}  # how the run chose its epoch (cxrlt/training/trainer.py)
    summary = {"method": "none", "source": str(src), "original_mAP": ck.get("best_map"), "val_mAP": ck.get("best_map"),
               **{k: trained.get(k) for k in ("select_on", "val_proxy_mAP", "val_honest_mAP")}}
    write_json(out / "summary.json", summary)
    torch_save({**ck, "config": cfg, "crt": summary}, out / "model.pt")
    record_inputs(out / "model.pt", stage_inputs)
    log(f"wrote {out / 'model.pt'}: the run's own head (crt_method none)")
    return summary


def _build(src: Path, cache, out: Path, cfg: dict, method: str, stage_inputs: dict, model_key: str,
           device_name: str, log) -> dict:

    (out / "metrics.jsonl").unlink(missing_ok=True)  # a re-run starts the head log afresh
    device = pick_device(device_name)
    model, ck = load_trained(src, device)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg["channels_last"] and device.type == "cuda":  # the frozen backbone's layout (its inputs follow)
        model = model.to(memory_format=torch.channels_last)
    train_rows, val_rows = cache.training_rows(cfg)  # the rows the backbone trained on (train_projections)
    splits = {"train": train_rows, "val": val_rows}
    y_tr, y_va = cache.targets(splits["train"]), cache.targets(splits["val"])
    amp = bool(cfg["amp"]) and device.type == "cuda"
    inputs, summary = prepare_inputs(model, cache, splits, out, cfg, model_key, device, amp, log)
    summary = {"method": method, "source": str(src), **summary}
    sets = val_sets(cache, splits["val"], cfg)
    _say_backbone_selection(ck, sets, cfg, log)
    t1 = time.perf_counter()
    if method == "tau":
        new_head, info = _tau_search(model, inputs["val"], y_va, device, log, sets)
    else:
        new_head, _, info = train_head(model, inputs["train"], y_tr, inputs["val"], y_va, cfg, device, out, log=log,
                                       sets=sets)
    summary.update(info, head_train_seconds=time.perf_counter() - t1)
    final = score(y_va, inputs["val"].probs(new_head.to(device), device))
    best = info["best"]
    summary.update(val_mAP=final["mAP"], val_mAUC=final["mAUC"], val_proxy_mAP=best["val_proxy_mAP"],
                   val_select_mAP=best["val_select_mAP"])
    model = model.cpu()
    model.head = new_head.cpu()
    meta = {k: v for k, v in ck.items() if k != "model"}
    meta.update(config=cfg, crt=summary, best_map=final["mAP"])
    write_json(out / "summary.json", summary)
    # model.pt is make's target: written last, so that its presence means the stage is complete
    torch_save({**meta, "model": model.state_dict()}, out / "model.pt")
    record_inputs(out / "model.pt", stage_inputs)
    o = summary["original"]
    log(f"wrote {out / 'model.pt'}: head chosen on {sets['select_on']}: val mAP full {_fmt(final['mAP'])}, proxy "
        f"{_fmt(best['val_proxy_mAP'])}, honest {_fmt(summary['val_honest_mAP'])} (source run: full "
        f"{_fmt(o['val_mAP'])}, proxy {_fmt(o['val_proxy_mAP'])})")
    return summary


def _say_backbone_selection(ck: dict, sets: dict, cfg: dict, log) -> None:
    """A line when the backbone run chose its epoch on other subsets than this stage chooses on:
    select_on is a post key, and a trained run keeps the epoch it chose (cxrlt/training/trainer.py)."""
    trained = ck.get("selection")
    if not trained:
        return
    then = (trained.get("select_on"), bool(trained.get("proxy_require_finding")))
    now = (sets["select_on"], bool(cfg["proxy_require_finding"]))
    if then != now:
        log(f"cRT: the backbone run chose its best epoch on {then[0]} (proxy_require_finding {then[1]}); the head is "
            f"chosen on {now[0]} (proxy_require_finding {now[1]}); retrain the run to choose its epoch that way too")
