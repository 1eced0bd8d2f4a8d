"""Studies: one base config, named variants, trained by the ordinary Make rules, compared in one table.

A study file (studies/<name>.yaml):

    name: losses                        # optional (default: the file's stem): names the generated
                                        # configs, the run folders and reports/<name>/
    base: configs/paper_ldam_drw.yaml   # a config file, or a list of them (later ones override);
                                        # paths relative to the folder make runs in
    overrides: {crt_method: none}       # optional: config keys set in every variant
    baseline: ldam_drw                  # the variant every other one is compared with (default: the first)
    seeds: [0, 1, 2]                    # optional: train every variant once per seed (config key seed)
    folds: [0]                          # optional: validate every variant on each fold (config key val_fold)
    variants:                           # name -> the config keys it changes ({} or empty: the base as is)
      ldam_drw: {}
      bce: {loss: bce, head: linear, drw_epoch: -1}

Expansion (`expand`, run by cxrlt/pipeline/plan.py for `make study STUDY=...`): one config per (variant,
seed, fold), written to <state>/studies/<name>/<stem>.yaml with stem = <name>.<variant>, plus
`.s<seed>` for a seed other than the base's and `.f<fold>` for a fold other than the base's
val_fold, so adding seeds or folds later never renames a run that is already trained. A file holds
the base files' keys, then the study's overrides, then the variant's keys, then seed/val_fold.
Every generated file and the manifest study.json are rewritten only when their content changes;
configs of variants no longer in the study are deleted. Make then trains them like any config in
CONFIGS: variants whose training keys are identical (post-training variants: crt_method, tta,
normal gating ...) share one trained backbone (vars.mk BASE_<stem>); a finished run is not redone.

study.json: {"name", "file", "baseline", "seeds", "folds", "variants": [{"name", "overrides"}],
"runs": [{"stem", "variant", "seed", "fold", "config"}]} (seed/fold: the values the run uses).

The report and its statistics: cxrlt/studies/report.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


from cxrlt.core import config as config_mod
from cxrlt.core.errors import InputError
from cxrlt.core.fileio import write_if_changed
from cxrlt.pipeline.stamps import stamp_text

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # no dots: they separate stem parts
STUDY_KEYS = {"name", "base", "overrides", "baseline", "seeds", "folds", "variants"}
MANIFEST = "study.json"


# ---- the study file ---------------------------------------------------------------------------------
@dataclass
class Study:
    name: str
    file: str
    base: list[str]
    overrides: dict
    variants: dict[str, dict]  # name -> overrides, in file order
    baseline: str
    seeds: list[int] | None = None
    folds: list[int] | None = None
    runs: list[dict] = field(default_factory=list)  # filled by expand()


def _fail(path, what: str):
    raise InputError(f"{path}: {what}")


def _int_list(path, key: str, value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)):
        _fail(path, f"'{key}' must be a list of whole numbers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        _fail(path, f"'{key}' lists a value twice: {value}")
    return list(value)


def _checked_overrides(path, where: str, value) -> dict:
    """A mapping of config keys, every key and value checked against the schema."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(path, f"{where} must be a mapping of config key: value, got {type(value).__name__}")
    return {k: config_mod.coerce(k, v, f"{path} ({where})") for k, v in value.items()}


def load_study(path) -> Study:
    """Read and check a study file; InputError (one line, naming the file and key) if it is wrong."""
    path = Path(path)
    data = config_mod.read_yaml(path, "study file")
    if not isinstance(data, dict):
        _fail(path, "a study file must be a mapping (keys: " + ", ".join(sorted(STUDY_KEYS)) + ")")
    unknown = sorted(set(map(str, data)) - STUDY_KEYS)
    if unknown:
        _fail(path, f"unknown key(s) {unknown} (a study file has: {', '.join(sorted(STUDY_KEYS))}; "
                    f"config keys go under 'overrides' or a variant)")
    name = str(data.get("name") or path.stem)
    if not NAME_RE.match(name):
        _fail(path, f"study name '{name}' must be letters, digits, '_' or '-' (it names files and folders)")
    base = data.get("base")
    base = [base] if isinstance(base, str) else base
    if not base or not isinstance(base, list) or not all(isinstance(b, str) and b for b in base):
        _fail(path, "'base' must name a config file (or a list of them)")
    for b in base:
        if not Path(b).is_file():
            _fail(path, f"base config '{b}' not found (paths are relative to the folder make runs in)")
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        _fail(path, "'variants' must be a mapping of variant name -> config overrides, with at least one")
    checked = {}
    for v, over in variants.items():
        v = str(v)
        if not NAME_RE.match(v):
            _fail(path, f"variant name '{v}' must be letters, digits, '_' or '-' (it names run folders)")
        checked[v] = _checked_overrides(path, f"variant '{v}'", over)
        for key in ("seed", "val_fold"):
            if key in checked[v] and data.get({"seed": "seeds", "val_fold": "folds"}[key]) is not None:
                _fail(path, f"variant '{v}' sets '{key}' while the study lists "
                            f"'{'seeds' if key == 'seed' else 'folds'}'; set it in one place")
    baseline = str(data.get("baseline") or next(iter(checked)))
    if baseline not in checked:
        _fail(path, f"baseline '{baseline}' is not one of the variants ({', '.join(checked)})")
    study = Study(name=name, file=str(path), base=list(base),
                  overrides=_checked_overrides(path, "'overrides'", data.get("overrides")),
                  variants=checked, baseline=baseline,
                  seeds=_int_list(path, "seeds", data.get("seeds")),
                  folds=_int_list(path, "folds", data.get("folds")))
    return study


# ---- expansion into generated configs ------------------------------------------------------------------
def _base_mapping(study: Study) -> dict:
    """The keys the base files set (later files override earlier ones), in file order."""
    out: dict = {}
    for b in study.base:
        out.update(config_mod.load_yaml(b))
    return out


def run_specs(study: Study) -> list[dict]:
    """One {"stem", "variant", "seed", "fold", "keys"} per (variant, seed, fold), in study order."""
    base = _base_mapping(study)
    _check_distinct(study, base)
    specs = []
    for v, over in study.variants.items():
        keys = {**base, **study.overrides, **over}
        full = {**config_mod.DEFAULTS, **keys}  # every value already checked against the schema
        config_mod.check_relations(full, f"{study.file} (variant '{v}')")
        for seed in study.seeds or [full["seed"]]:
            for fold in study.folds or [full["val_fold"]]:
                stem = f"{study.name}.{v}"
                if seed != full["seed"]:
                    stem += f".s{seed}"
                if fold != full["val_fold"]:
                    stem += f".f{fold}"
                run_keys = dict(keys)
                if study.seeds is not None:
                    run_keys["seed"] = seed
                if study.folds is not None:
                    run_keys["val_fold"] = fold
                specs.append({"stem": stem, "variant": v, "seed": seed, "fold": fold, "keys": run_keys})
    return specs


def _check_distinct(study: Study, base: dict) -> None:
    """Two variants that resolve to the same config (run keys aside: workers, device, ...) would be
    compared with a difference of 0 by construction: refused, naming both (the baseline first)."""
    seen: dict[str, str] = {}
    order = [study.baseline, *(v for v in study.variants if v != study.baseline)]
    for v in order:
        full = {**config_mod.DEFAULTS, **base, **study.overrides, **study.variants[v]}
        key = json.dumps({k: full[k] for k in sorted(full) if config_mod.group(k) != "run"}, sort_keys=True,
                         default=str)
        if key in seen:
            other = seen[key]
            what = f"the baseline '{other}'" if other == study.baseline else f"variant '{other}'"
            _fail(study.file, f"variant '{v}' is identical to {what} (its keys {study.variants[v] or '{}'} "
                              f"change nothing): comparing them measures a difference of 0 by construction")
        seen[key] = v


def config_text(study: Study, spec: dict) -> str:
    import yaml

    head = (f"# generated from {study.file} (study '{study.name}', variant '{spec['variant']}'"
            f", seed {spec['seed']}, fold {spec['fold']}) by cxrlt/studies/spec.py at every make; do not edit\n")
    return head + yaml.safe_dump(spec["keys"], sort_keys=False)


def study_dir(state, name: str) -> Path:
    return Path(state) / "studies" / name


def expand(study_file, state) -> Study:
    """Write the study's configs and study.json under <state>/studies/<name>/ (each only when its
    content changes), delete configs of variants no longer in the study; -> the Study with runs."""
    study = load_study(study_file)
    out = study_dir(state, study.name)
    runs = []
    for spec in run_specs(study):
        cfg = out / f"{spec['stem']}.yaml"
        write_if_changed(cfg, config_text(study, spec))
        runs.append({"stem": spec["stem"], "variant": spec["variant"], "seed": spec["seed"],
                     "fold": spec["fold"], "config": str(cfg)})
    keep = {Path(r["config"]).name for r in runs}
    for old in out.glob("*.yaml"):
        if old.name not in keep:
            old.unlink()
    study.runs = runs
    write_if_changed(out / MANIFEST, stamp_text(manifest_of(study)))
    return study


def manifest_of(study: Study) -> dict:
    return {"name": study.name, "file": study.file, "baseline": study.baseline, "seeds": study.seeds,
            "folds": study.folds, "variants": [{"name": v, "overrides": o} for v, o in study.variants.items()],
            "runs": study.runs}


def read_manifest(path) -> dict:
    try:
        m = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(m, dict) or not {"name", "baseline", "variants", "runs"} <= set(m):
            raise ValueError("missing keys")
        return m
    except FileNotFoundError:
        raise InputError(f"{path}: study manifest not found (make study writes it)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a study manifest ({e})") from None
