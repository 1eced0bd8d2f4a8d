import pytest

from cxrlt.core import config
from cxrlt.core.errors import ConfigError

CONFIGS = ["paper_ldam_drw", "db_cas_csra", "bce", "asl", "demo"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_resolve(name):
    cfg = config.resolve([f"configs/{name}.yaml"])
    assert set(cfg) == set(config.SCHEMA)


def test_paper_config_is_the_paper_recipe():
    cfg = config.resolve(["configs/paper_ldam_drw.yaml"])
    assert cfg["model"].startswith("convnext_large") and cfg["loss"] == "ldam"
    assert cfg["lr"] == 1e-4 and cfg["weight_decay"] == 1e-5 and cfg["epochs"] == 15 and cfg["drw_epoch"] == 4  # the seed code's 1-based DRW_EPOCH=5
    # LDAM's s=30 needs cosine logits
    assert cfg["head"] == "cosine" and cfg["ldam_s"] == 30


def test_winner_config():
    cfg = config.resolve(["configs/db_cas_csra.yaml"])
    assert (cfg["loss"], cfg["sampler"], cfg["head"], cfg["ema"]) == ("db", "class_aware", "csra", True)


def test_later_files_and_cli_override(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("lr: 0.1\nepochs: 3\n")
    b.write_text("lr: 0.2\n")
    cfg = config.resolve([a, b], {"epochs": "7", "ema": "true"})
    assert cfg["lr"] == 0.2 and cfg["epochs"] == 7 and cfg["ema"] is True


def test_unknown_key_names_file_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown config key 'learning_rat'"):
        config.resolve([f])
    f.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        config.resolve([f])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        config.resolve(["configs/nope.yaml"])


def test_alias_hint_for_common_names(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        config.resolve([f])


def test_config_groups_split_train_post_and_run_keys():
    from cxrlt.core import config

    cfg = config.resolve(["configs/paper_ldam_drw.yaml"])
    key = config.train_key(cfg)
    # post-training and run keys never change the training fingerprint
    for k, v in [("tta", "none"), ("crt_lr", 0.5), ("normal_gating_alpha", 2.0), ("workers", 0),
                 ("device", "cpu"), ("compile", True), ("epochs", 99), ("patience", 3)]:
        assert config.train_key({**cfg, k: v}) == key, k
    # a training key does
    for k, v in [("lr", 3e-4), ("loss", "bce"), ("model", "test_resnet"), ("seed", 1)]:
        assert config.train_key({**cfg, k: v}) != key, k
    assert config.train_key({**cfg, "epochs": 99}, exclude=()) != config.train_key(cfg, exclude=())
    assert {config.group(k) for k in config.SCHEMA} == {"train", "post", "run"}


@pytest.mark.parametrize("key, value, expected", [
    ("select_on", "test", "not one of"), ("patient_context_weight", 1.5, "must be in \\[0, 1\\]"),
    ("normal_gating_alpha", 9, "must be in \\[-8, 8\\]"), ("proxy_require_finding", "maybe", "must be bool")])
def test_selection_keys_are_checked(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        config.resolve([], {key: value})


def test_selection_and_postprocessing_keys_are_post_keys():
    cfg = config.resolve([], {"select_on": "full", "proxy_require_finding": True, "normal_gating_alpha": -1,
                              "patient_context_weight": 0.3, "allow_patient_linking": True})
    assert cfg["select_on"] == "full" and cfg["proxy_require_finding"] is True
    for k in ("select_on", "proxy_require_finding", "patient_context_weight", "allow_patient_linking", "study_pool_weight"):
        assert config.group(k) == "post"
    assert config.train_key(cfg) == config.train_key(config.DEFAULTS)


LADDER_KEYS = {"img_size", "init_from", "grad_checkpointing", "batch_size", "accum_steps", "epochs", "lr",
               "warmup_epochs", "drw_epoch"}


@pytest.mark.parametrize("name,size,source", [("paper_ldam_drw_768", 768, "paper_ldam_drw"),
                                              ("paper_ldam_drw_1024", 1024, "paper_ldam_drw_768")])
def test_resolution_ladder_is_the_paper_recipe_at_a_larger_size(name, size, source):
    base, cfg = config.resolve(["configs/paper_ldam_drw.yaml"]), config.resolve([f"configs/{name}.yaml"])
    assert {k for k in cfg if cfg[k] != base[k]} == LADDER_KEYS  # nothing else drifts from the recipe
    assert (cfg["img_size"], cfg["init_from"], cfg["grad_checkpointing"]) == (size, source, "auto")
    assert cfg["batch_size"] * cfg["accum_steps"] == base["batch_size"]  # the same global batch
    assert cfg["lr"] < base["lr"] and cfg["epochs"] < base["epochs"]  # a short fine-tune


def test_config_flags_take_the_dash_and_the_key_spelling_and_list_the_dash_form():
    import argparse

    ap = argparse.ArgumentParser()
    config.add_config_flags(ap)
    for argv in (["--batch-size", "8", "--max-train-batches=2"], ["--batch_size", "8", "--max_train_batches", "2"]):
        assert config.overrides_from_args(ap.parse_args(argv)) == {"batch_size": "8", "max_train_batches": "2"}
    text = " ".join(ap.format_help().split())  # (unwrapped)
    assert "--batch-size INT" in text and "--batch_size" not in text and "--lr FLOAT" in text
    assert "one of: linear, cosine, csra" in text  # the choices, from config.CHOICES
    # a script's own flag of the dash name keeps it (predict.py's inference --batch-size)
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=64)
    config.add_config_flags(ap)
    ns = ap.parse_args(["--batch-size", "5", "--batch_size", "7"])
    assert ns.batch_size == 5 and config.overrides_from_args(ns) == {"batch_size": "7"}


def test_a_registry_and_config_choices_must_name_the_same_things():
    from cxrlt.post.inference import TTA_VIEWS
    from cxrlt.models.losses import LOSSES
    from cxrlt.models.model import HEADS
    from cxrlt.data.samplers import SAMPLERS

    for key, registry in (("head", HEADS), ("loss", LOSSES), ("sampler", SAMPLERS), ("tta", TTA_VIEWS)):
        config.check_registry(key, registry)
        with pytest.raises(RuntimeError, match=f"the {key} registry has .* name each choice in both"):
            config.check_registry(key, {**registry, "new": None})
    assert config.CHOICES["crt_loss"] == config.CHOICES["loss"]
    assert config.CHOICES["crt_sampler"] == config.CHOICES["sampler"]


def test_core_and_pipeline_import_neither_torch_nor_pandas():
    # Make runs cxrlt/pipeline/plan.py, which checks every config, on every make: it must stay fast.
    # Every module of core/ and pipeline/ is imported (and a config resolved) in a fresh interpreter.
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, cxrlt.core, cxrlt.pipeline\n"
            "for pkg in (cxrlt.core, cxrlt.pipeline):\n"
            "    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "from cxrlt.core import config\n"
            "config.resolve(['configs/demo.yaml'], {'head': 'csra'})\n"
            "print(sorted(m for m in ('torch', 'timm', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_key_table_in_the_docs_is_current():
    from cxrlt.core import keytable

    doc = keytable.DOC.read_text(encoding="utf-8")
    assert keytable.updated(doc) == doc, "run: python -m cxrlt.core.keytable"
    for key in config.SCHEMA:
        assert f"| `{key}` |" in doc
