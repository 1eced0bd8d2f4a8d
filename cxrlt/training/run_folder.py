"""The run folder (train.py --out): which run it holds, runs moved aside and restored, and the
world-size rule of a resume. The files themselves are specified in docs/formats.md ("Run folder").

A run's keys: train_key = config.train_key of the config (epochs and patience left out, so they
can be raised), combined with the content keys of init_checkpoint and of the pseudo-labels when set;
data_key = the training cache's content key; tag = 8 hex of both. run.json records them.
  A start on a folder that holds a run (last.pt) needs resume=True (train.py --resume), then:
  - same keys: continue from last.pt. A finished run (epochs reached, or stopped by patience)
    whose epochs/patience were raised continues to the new end (the LR schedule follows the new
    epoch count) and rewrites model.pt; a finished run not extended is "up to date": model.pt
    is touched (so that Make settles) and nothing is built.
  - other keys: the folder is moved aside to `<out>@<its tag>` (said in the log, with the train
    keys that changed: `lr 0.001 -> 0.002`); when `<out>@<tag of the new keys>` exists (an
    earlier run with exactly these keys), or else any `<other>@<that tag>` beside it (moved aside
    under another config's name), it is moved back and continued, else training starts afresh.
  A cache of another image size than the run's (or than a non-zero cfg img_size) is refused.

World size: last.pt and run.json record the world size W and the global batch
G = batch_size x W x accum_steps. A resume with another world size W' keeps G (and with it the
optimizer-step schedule and the samples of every step, see samplers.py) by running
accum_steps' = G / (batch_size x W') micro-batches per step; when G is not a multiple of
batch_size x W' the resume stops with a message saying which world sizes fit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from cxrlt.core import config as config_mod
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import write_text
from cxrlt.core.hashing import text_key
from cxrlt.pipeline.fingerprints import file_key


# --------------------------------------------------------------------------------------------
def run_train_key(cfg: dict) -> str:
    """config.train_key, combined with the content key of init_checkpoint when one is set (the
    starting weights are an input too: a retrained source run means another run)."""
    train = config_mod.train_key(cfg)
    if cfg["init_checkpoint"]:
        if not os.path.isfile(cfg["init_checkpoint"]):
            raise InputError(f"{cfg['init_checkpoint']}: init_checkpoint not found")
        train = text_key(f"{train}|{file_key(cfg['init_checkpoint'])}", 16)
    if cfg["pseudo_labels"]:  # the soft labels and their images are inputs too
        for path in (cfg["pseudo_labels"], os.path.join(cfg["pseudo_cache"], "manifest.json")):
            if not os.path.isfile(path):
                raise InputError(f"{path}: not found (pseudo_labels / pseudo_cache)")
            train = text_key(f"{train}|{file_key(path)}", 16)
    return train


def run_keys(cfg: dict, cache) -> dict:
    """{"train_key", "data_key", "tag"}: what a run's weights are trained from (module doc);
    the data key is the cache's content key (rows, labels, folds, pixel sources, size)."""
    train, data = run_train_key(cfg), cache.key
    return {"train_key": train, "data_key": data, "tag": text_key(f"{train}|{data}", 8)}


def read_run_json(out: Path) -> dict | None:
    try:
        return json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def aside_path(out: Path, tag: str) -> Path:
    return out.with_name(f"{out.name}@{tag}")


def changed_keys(old_config, cfg: dict, data_changed: bool = False) -> str:
    """'lr 0.001 -> 0.002, loss bce -> ldam': the train keys in which the run of old_config (its
    config.yaml) differs from cfg; 'the training data' when the cache's key differs."""
    try:
        old = {**config_mod.DEFAULTS, **config_mod.load_yaml(old_config)}
    except Exception:  # no or unreadable config.yaml: the keys cannot be compared
        old = None
    parts = []
    if old is not None:
        a, b = config_mod.train_part(old), config_mod.train_part({**config_mod.DEFAULTS, **cfg})
        parts = [f"{k} {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k) and k not in config_mod.EXTENDABLE_KEYS]
    if data_changed:
        parts.append("the training data (cache key)")
    return ", ".join(parts) or ("unknown (no config.yaml)" if old is None else "init_checkpoint or pseudo-label contents")


def earlier_run(out: Path, tag: str) -> Path | None:
    """A moved-aside run with these keys that `out` can take over: `<out>@<tag>`, else any
    `<other>@<tag>` beside it (a run moved aside under another config's name, e.g. a study variant
    whose keys equal a run `make all` trained earlier). Its run.json must hold the same tag."""
    own = aside_path(out, tag)
    for cand in [own] + sorted(p for p in out.parent.glob(f"*@{tag}") if p != own):
        if cand.is_dir() and (cand / "last.pt").exists() and (read_run_json(cand) or {"tag": tag}).get("tag") == tag:
            return cand
    return None


def prepare_run_folder(out: Path, cfg: dict, keys: dict, image_size: int, resume: bool) -> list[str]:
    """Make `out` hold the run of `keys` (module doc: same keys kept, other keys moved aside,
    an earlier run with these keys restored). Rank 0 only. Returns what was done, for the log."""
    said = []
    has_run = (out / "last.pt").exists()
    if has_run and not resume:
        raise InputError(f"{out}: a run already exists here; pass --resume to continue it or choose another --out")
    state = read_run_json(out) if has_run else None
    if has_run and state is None:
        raise InputError(f"{out}: last.pt without a readable run.json (not a run folder of this version); "
                         f"move it away or choose another --out")
    if has_run and state.get("image_size", image_size) != image_size:
        raise InputError(f"{out}: this run was trained on {state['image_size']} px images but the cache has "
                         f"{image_size} px; use the cache of its size, or another --out")
    if has_run and (state["train_key"], state["data_key"]) != (keys["train_key"], keys["data_key"]):
        old_tag = text_key(f"{state['train_key']}|{state['data_key']}", 8)
        aside = aside_path(out, old_tag)
        if aside.exists():
            raise InputError(f"{out}: its run (other config or data) should move to {aside}, which already "
                             f"exists; move one of them away")
        changed = changed_keys(out / "config.yaml", cfg, state["data_key"] != keys["data_key"])
        os.replace(out, aside)
        said.append(f"the run in {out} was trained with another config or data: moved it to {aside} "
                    f"(changed: {changed})")
        has_run = False
    if not has_run:
        earlier = earlier_run(out, keys["tag"])
        if earlier is not None:
            if out.exists():
                shutil.rmtree(out)  # no last.pt: a start killed before its first epoch, nothing to keep
            os.replace(earlier, out)
            said.append(f"restored the earlier run with this config and data from {earlier}")
        elif out.exists():
            # lines left by a start killed before its first last.pt are stale
            (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg, sort_keys=False)  # as config.save writes it
    if not (out / "config.yaml").exists() or (out / "config.yaml").read_text(encoding="utf-8") != text:
        write_text(out / "config.yaml", text)
    return said


def resume_accum_steps(global_batch: int, old_world: int, batch_size: int, world: int, out="run") -> int:
    """Micro-batches per optimizer step that keep a run's global batch when it resumes with
    `world` processes of `batch_size` (it ran with `old_world`). InputError when none does."""
    per_step = batch_size * world
    if global_batch % per_step == 0:
        return global_batch // per_step
    fits = [w for w in range(1, global_batch // batch_size + 1) if global_batch % (batch_size * w) == 0]
    raise InputError(f"{out}: this run's global batch is {global_batch} images ({old_world} processes); "
                     f"{world} processes x batch_size {batch_size} cannot form it: resume with "
                     f"{' or '.join(map(str, fits))} processes")
