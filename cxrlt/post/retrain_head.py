"""Decoupled classifier re-training (cRT, Kang et al. ICLR 2020) and tau-normalisation.

cRT: freeze the trained backbone, re-initialise the head (crt_reinit, seeded by `seed`, through
the head's own reset_parameters: every parameter, biases included) or keep it (fine-tuning), and
train only the head with crt_sampler batches (class-aware by default), crt_loss on real logits.

Head inputs (`model.head_input`: pooled (F,) features for linear/cosine heads, the (F, h, w) map
for CSRA) do not change while the backbone is frozen and augmentation is off, so by default they
are computed once and cached on disk in the output folder as row files (cxrlt.data.rowfile, ordinary
.npy arrays read back by row index, resident memory bounded whatever their size):

  features_train.npy   (n_train, *head input)  the train rows (cache rows not in val_fold), index order
  features_val.npy     (n_val, *head input)    the val_fold rows, index order

crt_feature_cache chooses how (printed at the start with the disk it needs):
  float32  exact: the original head scored on them reproduces the run's val mAP
  float16  half the disk (a CSRA map of convnextv2_base at 512 px is 1024x16x16: 0.5 MiB/image in
           float16); the scores move by ~1e-3 mAP
  off      no cache: the frozen backbone runs on every batch of every cRT epoch (and on the val
           rows after each epoch), E backbone passes instead of one, no disk
  auto     float32 for pooled heads, float16 for map heads, when that fits on the disk with 1 GiB to
           spare; else off
Each feature file carries a fingerprint (sidecar `.features_<split>.npy.inputs.json`, see
cxrlt.pipeline.fingerprints) of the weights (file key of the source model.pt), the cache (its content
key), the rows, the dtype and the precision they were computed in; a file whose fingerprint
differs is deleted and extracted again.

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

metrics.jsonl (cRT), one line per head epoch: epoch, train_loss, val_mAP (full val fold), val_mAUC
(full), val_proxy_mAP, val_select_mAP (selection set), select_on, val_honest_mAP (the honest number
of the choice among the original head and the epochs so far), best (the head kept so far: -1 the
original head, else the 0-based cRT epoch), time_s. Undefined values (no positive) are null.

summary.json: method, source, feature_cache, head_input, feature_seconds, head_train_seconds,
  select_on, describe (the val subsets in words), sets {full, proxy, half_a, half_b: images};
  original {val_mAP, val_proxy_mAP, val_select_mAP} (the source run's head) and original_mAP (its
  val_mAP); best {epoch (-1: original head) and source, or tau; val_mAP, val_proxy_mAP,
  val_select_mAP}: the head kept; half_choices [chosen on half A, chosen on half B] (epochs or taus);
  val_mAP, val_mAUC (full val fold, of the head kept), val_proxy_mAP, val_select_mAP,
  val_honest_mAP (the number to quote), honest_gain (its gain over the original head, halves
  basis); cRT also reinit and head_distance {start_to_trained, end_to_start, end_to_trained},
  tau also grid [{tau, val_mAP, val_proxy_mAP, val_select_mAP}]. crt_method none: method, source,
  original_mAP = val_mAP (the run's best_map), and the run's val_proxy_mAP / val_honest_mAP.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cxrlt.core.errors import InputError
from cxrlt.core.fileio import append_jsonl, torch_save, write_json
from cxrlt.data.rowfile import RowFile, RowWriter, shape_of
from cxrlt.pipeline.stage_inputs import crt_keys

TAU_GRID = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}
DISK_SPARE = 1 << 30  # free disk a feature cache must leave


# ---- configuration and fingerprints --------------------------------------------------------------

def rows_key(rows) -> str:
    return hashlib.sha256(np.asarray(rows, dtype="<i8").tobytes()).hexdigest()[:16]


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
    from cxrlt.models.model import CSRA_MAX_TEMPERATURE

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


# ---- head inputs: cached row files or the backbone on the fly -------------------------------------

def _image_loader(images_path, rows, batch_size: int, workers: int, device):
    from cxrlt.data.dataset import CacheDataset, make_loader

    return make_loader(CacheDataset(images_path, rows, num_classes=1), batch_size, workers=workers,
                       pin_memory=device.type == "cuda")


def _backbone_fn(model):
    from cxrlt.post.inference import model_input

    cl = _is_channels_last(model)
    return lambda x: model.head_input(model_input(model, x, channels_last=cl))


def _is_channels_last(model) -> bool:
    """True when the model's weights were put in channels_last (run() does on a GPU with cfg
    channels_last): its inputs are then given that layout too."""
    w = next((p for p in model.parameters() if p.ndim == 4), None)
    return w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def head_input_shape(model, images_path, row: int, device, amp: bool) -> tuple[int, ...]:
    """The shape of one image's head input ((F,) pooled, (F, h, w) map), from one forward pass."""
    from cxrlt.post.inference import batched_forward

    loader = _image_loader(images_path, [int(row)], 1, 0, device)
    return tuple(batched_forward(model, loader, _backbone_fn(model), device, amp)[1].shape[1:])


def extract_features(model, images_path, rows, device, path, dtype=np.float32, shape=None, batch_size: int = 64,
                     workers: int = 2, amp: bool = True, desc: str = "features") -> Path:
    """Write the head inputs of cache `rows` into the row file `path`, batch by batch (`shape`:
    one row's, when the caller knows it)."""
    from cxrlt.post.inference import forward_batches

    shape = shape or head_input_shape(model, images_path, rows[0], device, amp)
    loader = _image_loader(images_path, rows, batch_size, workers, device)
    tdtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
    cuda = torch.device(device).type == "cuda"
    with RowWriter(path, (len(rows), *shape), dtype) as w, _WriterThread(w) as writer:
        i = 0
        for _, f in forward_batches(model, loader, _backbone_fn(model), device, amp, progress=True, desc=desc):
            f = f.to(tdtype)  # converted where it was computed (on a GPU: not by the CPU)
            if cuda:  # an asynchronous copy into pinned memory; the writer waits for its event
                host = torch.empty(f.shape, dtype=tdtype, pin_memory=True)
                host.copy_(f, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            else:
                host, done = f, None
            writer.put(i, host, done)
            i += len(f)
    return Path(path)


class _WriterThread:
    """Writes (start row, CPU tensor, CUDA event or None) batches into a RowWriter from a thread,
    in order, each after its event (its device->host copy) completed; at most MAX_PENDING batches
    wait (the GPU runs ahead of the disk by that much). An error in the thread is raised by the
    next put() or by the end of the `with` block."""

    MAX_PENDING = 4

    def __init__(self, writer):
        import queue
        import threading

        self.w = writer
        self.q = queue.Queue(self.MAX_PENDING)
        self.error = None
        self.thread = threading.Thread(target=self._run, name="feature-writer", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after an error
            i, host, done = item
            try:
                if done is not None:
                    done.synchronize()
                self.w.write(i, host.numpy())
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                self.error = e

    def put(self, i: int, host, done) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((i, host, done))

    def __exit__(self, *exc) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


def _classify_fp32(head, f: torch.Tensor) -> torch.Tensor:
    """head.classify in float32 whatever autocast is active (the head is trained in float32)."""
    with torch.autocast(f.device.type, enabled=False):
        return head.classify(f.float())


def head_probs(head, feats, device, batch_size: int = 1024) -> np.ndarray:
    """sigmoid(head.classify(features)) for an (n, ...) feature array or row file -> (n, C) float32."""
    from cxrlt.post.inference import batched_forward, feature_batches

    return batched_forward(head, feature_batches(feats, batch_size), lambda f: torch.sigmoid(head.classify(f)),
                           device)[1]


class CachedInputs:
    """Head inputs of a set of rows, read from a row file."""

    def __init__(self, path):
        self.file = RowFile(path)

    def __len__(self) -> int:
        return len(self.file)

    def batches(self, order: np.ndarray, batch_size: int, device):
        for s in range(len(order) // batch_size):
            yield torch.from_numpy(self.file[order[s * batch_size:(s + 1) * batch_size]]).to(device).float()

    def probs(self, head, device) -> np.ndarray:
        return head_probs(head, self.file, device)


class BackboneInputs:
    """Head inputs of a set of rows computed by the frozen backbone at every use (no cache)."""

    def __init__(self, model, images_path, rows, device, amp: bool, workers: int, batch_size: int = 64):
        self.model, self.images_path, self.rows = model, images_path, np.asarray(rows, dtype=np.int64)
        self.device, self.amp, self.workers, self.batch_size = device, amp, workers, batch_size

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, order: np.ndarray, batch_size: int, device):
        from cxrlt.post.inference import forward_batches

        n = len(order) // batch_size * batch_size  # whole batches, as CachedInputs
        loader = _image_loader(self.images_path, self.rows[order[:n]], batch_size, self.workers, device)
        for _, f in forward_batches(self.model, loader, _backbone_fn(self.model), device, self.amp):
            yield f.float()

    def probs(self, head, device) -> np.ndarray:
        from cxrlt.post.inference import batched_forward

        fn = _backbone_fn(self.model)
        head.eval()
        loader = _image_loader(self.images_path, self.rows, self.batch_size, self.workers, device)
        return batched_forward(self.model, loader, lambda x: torch.sigmoid(_classify_fp32(head, fn(x))), device,
                               self.amp)[1]


def choose_feature_cache(setting: str, head_input: tuple, need_bytes: dict, free_bytes: int,
                         where) -> tuple[str, str]:
    """-> (mode "float32" | "float16" | "off", a line saying why). need_bytes: dtype name -> bytes
    still to write for that dtype. InputError when an explicit dtype does not fit on the disk."""
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    is_map = len(head_input) > 1
    what = f"{'map' if is_map else 'pooled'} head inputs {'x'.join(map(str, head_input))}"
    fits = {d: need_bytes[d] + DISK_SPARE <= free_bytes for d in FEATURE_DTYPES}
    if setting == "off":
        return "off", f"{what}; crt_feature_cache off: the frozen backbone runs every cRT epoch (no disk)"
    if setting in FEATURE_DTYPES:
        if not fits[setting]:
            raise InputError(f"{where}: crt_feature_cache {setting} needs {gb(need_bytes[setting])} of disk "
                             f"for the cRT features and {gb(free_bytes)} is free (1 GiB kept spare); free some, "
                             f"or set crt_feature_cache float16 (half) or off (backbone every cRT epoch)")
        return setting, f"{what}; crt_feature_cache {setting}: {gb(need_bytes[setting])} to write in {where}"
    want = "float16" if is_map else "float32"
    if fits[want]:
        return want, (f"{what}; crt_feature_cache auto -> {want} cache on disk: {gb(need_bytes[want])} to write "
                      f"in {where} ({gb(free_bytes)} free)")
    return "off", (f"{what}; crt_feature_cache auto -> off: the {want} cache needs {gb(need_bytes[want])} and "
                   f"{where} has {gb(free_bytes)} free, so the frozen backbone runs every cRT epoch")


def feature_fingerprint(model_key: str, data_key: str, rows, dtype: str, precision: str) -> dict:
    return {"model": model_key, "cache": data_key, "rows": rows_key(rows), "dtype": dtype, "precision": precision}


def _feature_file_ok(path: Path, fp: dict, n_rows: int) -> bool:
    from cxrlt.pipeline.fingerprints import inputs_match

    got = shape_of(path)
    return got is not None and got[0][0] == n_rows and inputs_match(path, fp)


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
        from cxrlt.evaluation.metrics import score
        from cxrlt.evaluation.selection import choose, score_row

        self.table.append(score_row(self.y, self.sets, lambda idx: probs[idx]))
        sel = choose(self.table, self.so)
        return score(self.y, probs), sel, sel["choice"] == len(self.table) - 1

    def scores(self, i: int) -> dict:
        from cxrlt.evaluation.selection import named_scores

        return named_scores(self.table[i], self.so)

    def summary(self, sel: dict) -> dict:
        """The selection fields every head method's summary has (module doc)."""
        from cxrlt.evaluation.selection import json_float, set_sizes

        return {"select_on": self.so, "describe": self.sets["describe"], "sets": set_sizes(self.sets),
                "original": self.scores(0), "val_honest_mAP": json_float(sel["honest"]),
                "honest_gain": json_float(sel["honest_gain"])}


def _val_sets(y_val, sets):
    from cxrlt.evaluation.selection import unlabelled_sets

    return sets if sets is not None else unlabelled_sets(y_val)


def train_head(model, train_in, y_tr, val_in, y_val, cfg, device, out_dir: Path, log=print, sets=None):
    """cRT of model.head on the head inputs train_in / val_in (CachedInputs or BackboneInputs).

    sets: cxrlt.evaluation.selection.val_sets of the val rows (None: every val image its own patient, the
    full set is the selection set). Returns (kept head, last re-trained head, info dict). Logs one
    line per epoch to out_dir/metrics.jsonl.
    """
    from cxrlt.models.losses import build_loss
    from cxrlt.data.labelmask import annotated_counts, has_unannotated
    from cxrlt.data.samplers import build_sampler
    from cxrlt.evaluation.selection import json_float

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
            loss = loss_fn(_classify_fp32(head, f), y_t[b].to(device))
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


def prepare_inputs(model, cache, splits: dict, out: Path, cfg: dict, model_key: str, device, amp: bool, log=print):
    """Head inputs for each split ({name: rows}) -> ({name: CachedInputs | BackboneInputs}, info)."""
    from cxrlt.pipeline.fingerprints import record_inputs

    for name, rows in splits.items():
        if not len(rows):
            raise InputError(f"{cache.path}: no {name} rows for val_fold {cfg['val_fold']}")
    precision = "bf16" if amp and device.type == "cuda" else "fp32"
    images = cache.images_path
    shape = head_input_shape(model, images, splits["train"][0], device, amp)
    per_row = int(np.prod(shape))
    fps, need = {}, {d: 0 for d in FEATURE_DTYPES}
    for d in FEATURE_DTYPES:
        for name, rows in splits.items():
            fp = feature_fingerprint(model_key, cache.key, rows, d, precision)
            fps[name, d] = fp
            if not _feature_file_ok(out / f"features_{name}.npy", fp, len(rows)):
                need[d] += len(rows) * per_row * np.dtype(d).itemsize
    mode, why = choose_feature_cache(cfg["crt_feature_cache"], shape, need, shutil.disk_usage(out).free, out)
    log(f"cRT features: {why}")
    inputs, t0 = {}, time.perf_counter()
    for name, rows in splits.items():
        path = out / f"features_{name}.npy"
        if mode == "off":
            inputs[name] = BackboneInputs(model, images, rows, device, amp, cfg["workers"])
            continue
        fp = fps[name, mode]
        if _feature_file_ok(path, fp, len(rows)):
            log(f"cRT features: {path.name} matches the weights and rows: reused")
        else:
            if path.exists():
                log(f"cRT features: {path.name} was computed from other weights, rows or precision: re-extracting")
            path.unlink(missing_ok=True)  # first, so that the stale and the new file never hold the disk together
            extract_features(model, images, rows, device, path, FEATURE_DTYPES[mode], shape, workers=cfg["workers"],
                             amp=amp, desc=f"features {name}")
            record_inputs(path, fp)
        inputs[name] = CachedInputs(path)
    return inputs, {"feature_cache": mode, "head_input": list(shape), "feature_seconds": time.perf_counter() - t0}


def run(run_dir, cache_dir, out_dir, cfg_overrides: dict | None = None, method: str | None = None,
        device_name: str | None = None, config_files=(), log=print) -> dict:
    """retrain_head.py: cRT, tau or nothing (`method`, default: the config's crt_method) for the run in
    run_dir on cache_dir, written to out_dir -> summary."""
    from cxrlt.core import config
    from cxrlt.data.cache import open_cache
    from cxrlt.models.checkpoint import check_format, load_checkpoint
    from cxrlt.core.fileio import output_lock
    from cxrlt.pipeline.fingerprints import file_key, inputs_match, touch
    from cxrlt.post.inference import check_cache_size
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
        from cxrlt.core import provenance
        provenance.write(out / "provenance.json")
        if method == "none":
            return _keep_head(src, ck, out, cfg, stage_inputs, log)
        del ck
        return _build(src, cache, out, cfg, method, stage_inputs, model_key,
                      device_name or cfg["device"], log)


def _keep_head(src: Path, ck: dict, out: Path, cfg: dict, stage_inputs: dict, log) -> dict:
    """crt_method none: the run's own model, as trained, is the head stage's output (a study's
    "no post-training" variant shares the backbone run with the cRT variants)."""
    from cxrlt.pipeline.fingerprints import record_inputs

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
    from cxrlt.training.device import pick_device
    from cxrlt.pipeline.fingerprints import record_inputs
    from cxrlt.post.inference import load_trained
    from cxrlt.evaluation.metrics import score
    from cxrlt.evaluation.selection import val_sets

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
