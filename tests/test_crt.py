"""cxrlt.post.retrain_head and cxrlt.post.features pieces on small tensors: head re-initialisation, tau, the feature cache choice, the config."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cxrlt.core import config
from cxrlt.post.features import CachedInputs, choose_feature_cache
from cxrlt.post.retrain_head import check_tau_applies, head_distance, starting_head, tau_normalise, train_head
from cxrlt.core.errors import InputError
from cxrlt.evaluation.metrics import average_precision_per_label
from cxrlt.models.model import build_head
from cxrlt.data.rowfile import RowWriter

F, C = 12, 5
# csra on raw scores (csra_normalize false): the form tau-normalisation can change
HEADS = {"linear": {}, "cosine": {}, "csra": {"csra_lambda": 1.0, "csra_temperature": 2.0, "csra_normalize": False}}


def _cfg(head, **kw):
    return config.resolve([], {"head": head, **HEADS[head], "crt_epochs": 2, "crt_batch_size": 8, "seed": 7,
                               "crt_sampler": "instance", **kw})


def _trained_head(name):
    """A head whose every parameter (biases included) is far from any initialisation."""
    head = build_head(_cfg(name), F, C)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3 + 1)
    return head


def _inputs(name, tmp_path, n, seed):
    shape = (n, F, 3, 3) if name == "csra" else (n, F)
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    y = (np.random.default_rng(seed + 1).random((n, C)) < 0.4).astype(np.float32)
    y[:2] = 1  # every label has a positive
    y[2:4] = 0
    path = tmp_path / f"f{seed}.npy"
    with RowWriter(path, shape, np.float32) as w:
        w.write(0, x)
    return CachedInputs(path), y


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", list(HEADS))
def test_reinit_resets_every_parameter_of_each_head_from_the_seed(name):
    trained = _trained_head(name)
    start = starting_head(trained, reinit=True, seed=7)
    for k, p in start.state_dict().items():
        assert not torch.allclose(p, trained.state_dict()[k]), k  # biases too
    fresh = build_head(_cfg(name), F, C)
    torch.manual_seed(7)
    fresh.reset_parameters()
    assert _same(start, fresh)  # exactly the head's own initialisation, from the seed
    assert not _same(starting_head(trained, reinit=True, seed=8), start)
    assert _same(starting_head(trained, reinit=False, seed=7), trained)
    assert all(p.requires_grad for p in start.parameters())
    assert _same(trained, _trained_head(name))  # the source head itself is left alone


@pytest.mark.parametrize("name", list(HEADS))
def test_crt_trains_from_the_fresh_head_or_from_the_trained_one(name, tmp_path):
    trained = _trained_head(name)
    model = SimpleNamespace(head=trained)
    tr, y_tr = _inputs(name, tmp_path, 32, 0)
    va, y_va = _inputs(name, tmp_path, 16, 5)
    fresh = starting_head(trained, reinit=True, seed=7)
    for reinit, begins_at in ((True, fresh), (False, trained)):
        # lr 0 (set past the config's check, which wants > 0): the head never moves, so the last
        # head is the head training started from
        cfg = {**_cfg(name, crt_reinit=reinit), "crt_lr": 0.0}
        _, last, info = train_head(model, tr, y_tr, va, y_va, cfg, torch.device("cpu"), tmp_path, log=lambda *_: None)
        assert _same(last, begins_at), reinit
        assert info["reinit"] is reinit
        d = info["head_distance"]
        assert (d["start_to_trained"] > 0.5) if reinit else (d["start_to_trained"] == 0.0)
        assert d["end_to_start"] == 0.0
    cfg = _cfg(name, crt_reinit=True, crt_lr=0.05, crt_epochs=3)
    _, last, info = train_head(model, tr, y_tr, va, y_va, cfg, torch.device("cpu"), tmp_path, log=lambda *_: None)
    assert info["head_distance"]["end_to_start"] > 0  # and with a learning rate it does train
    assert info["head_distance"]["end_to_trained"] == pytest.approx(head_distance(last, trained))


def test_tau_normalise_divides_each_class_weight_by_its_norm_to_the_tau():
    head = build_head(_cfg("linear"), 2, 3)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]))  # norms 5, 2, 1
        head.fc.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    for tau in (0.0, 0.5, 1.0, 2.0):
        w = tau_normalise(head, tau).fc.weight
        expected = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]) / torch.tensor([5.0, 2.0, 1.0])[:, None] ** tau
        assert torch.allclose(w, expected), tau
        assert torch.equal(tau_normalise(head, tau).fc.bias, head.fc.bias)
    assert torch.allclose(tau_normalise(head, 1.0).fc.weight.norm(dim=1), torch.ones(3))
    assert torch.equal(head.fc.weight[0], torch.tensor([3.0, 4.0]))  # a copy: the head is unchanged


def test_tau_moves_the_per_label_ap_only_through_csra_attention():
    rng = np.random.default_rng(0)
    y = (rng.random((64, C)) < 0.3).astype(np.float32)
    y[0] = 1

    def ap_per_tau(name, x):
        head = _trained_head(name)
        with torch.no_grad():
            w = next(p for p in head.parameters() if p.ndim >= 2)
            w.mul_(torch.linspace(0.2, 5.0, C).view(-1, *[1] * (w.ndim - 1)))  # very different norms
            # AP ranks the scores: the logits themselves (a float32 sigmoid of these would saturate into ties)
            return [average_precision_per_label(y, tau_normalise(head, t).classify(x).double().numpy())
                    for t in (0.0, 1.0, 2.0)]

    lin = ap_per_tau("linear", torch.from_numpy(rng.normal(size=(64, F)).astype(np.float32)))
    assert all(np.allclose(a, lin[0]) for a in lin)  # a positive factor per label: same ranking
    csra = ap_per_tau("csra", torch.from_numpy(rng.normal(size=(64, F, 3, 3)).astype(np.float32)))
    assert not np.allclose(csra[0], csra[2])


@pytest.mark.parametrize("head, extra, refused", [
    ("cosine", {}, "the cosine head normalises every class weight"),
    ("linear", {}, "on a linear head"),
    ("seed_linear", {}, "on the seed_linear head"),
    ("bn_attention", {}, "on the bn_attention head"),
    ("ml_decoder", {}, "the ml_decoder head has no single class weight"),
    ("csra", {}, "csra_normalize divides each class's scores"),  # the default: normalised scores
    ("csra", {"csra_temperature": 99.0, "csra_normalize": False}, "csra_temperature >= 99"),
    ("csra", {"csra_temperature": 1.0, "csra_normalize": False}, None),
])
def test_tau_is_refused_where_it_cannot_change_the_map(head, extra, refused):
    cfg = config.resolve([], {"head": head, **extra})
    if refused is None:
        check_tau_applies(cfg)
        return
    with pytest.raises(InputError, match=refused) as e:
        check_tau_applies(cfg)
    assert "--method crt" in str(e.value) and "\n" not in str(e.value)


GB = 10 ** 9


@pytest.mark.parametrize("setting, shape, free, mode", [
    ("auto", (1536,), 100 * GB, "float32"),  # pooled: exact
    ("auto", (1024, 16, 16), 100 * GB, "float16"),  # maps: half the disk
    ("auto", (1024, 16, 16), 2 * GB, "off"),  # no room: the backbone every epoch
    ("auto", (1536,), 1 * GB, "off"),
    ("float32", (1024, 16, 16), 100 * GB, "float32"),
    ("off", (1536,), 100 * GB, "off"),
])
def test_feature_cache_choice(setting, shape, free, mode):
    need = {"float32": 10 * GB, "float16": 5 * GB}
    got, why = choose_feature_cache(setting, shape, need, free, "runs/x/crt")
    assert got == mode and ("x".join(map(str, shape))) in why
    if mode != "off":
        assert f"{need[mode] / GB:.2f} GB" in why


def test_feature_cache_dtype_without_room_says_how_much_is_needed():
    with pytest.raises(InputError) as e:
        choose_feature_cache("float16", (1024, 16, 16), {"float32": 10 * GB, "float16": 5 * GB}, 3 * GB, "runs/x/crt")
    assert str(e.value).startswith("runs/x/crt: crt_feature_cache float16 needs 5.00 GB of disk")
    assert "3.00 GB is free" in str(e.value) and "off" in str(e.value)


def test_stage_config_takes_post_and_run_keys_from_the_current_config(tmp_path):
    run_cfg = config.resolve([], {"head": "csra", "lr": 1e-3, "crt_epochs": 4, "seed": 1, "workers": 3})
    f = tmp_path / "c.yaml"
    f.write_text("head: linear\nlr: 0.5\ncrt_epochs: 9\ncrt_lr: 0.25\nseed: 5\n")
    said = []
    cfg = config.stage_config(run_cfg, [f], {"workers": 0, "epochs": 2}, log=said.append, stage="cRT")
    assert (cfg["crt_epochs"], cfg["crt_lr"], cfg["seed"], cfg["workers"]) == (9, 0.25, 5, 0)  # current config
    assert (cfg["head"], cfg["lr"]) == ("csra", 1e-3)  # the run's: they define its weights
    assert said == ["cRT: ignoring train keys given on the command line (the run's values apply): epochs"]
    cfg = config.stage_config(run_cfg, [], {"crt_lr": 0.5, "lr": 9.0}, log=said.append, stage="cRT")
    assert (cfg["crt_epochs"], cfg["crt_lr"], cfg["lr"]) == (4, 0.5, 1e-3)  # no file: the run's copy + flags


# ---- the head kept: chosen on the selection set, with the honest number ---------------------------

def _paired_val(n_studies=20, seed=0):
    """A val fold of PA + lateral pairs (two studies per patient) as an IndexCache, and its labels."""
    import pandas as pd

    from conftest import IndexCache

    labels = [f"l{j}" for j in range(C)]
    y = (np.random.default_rng(seed).random((2 * n_studies, C)) < 0.35).astype(np.float32)
    y[:2 * C:2, :] = np.eye(C)  # every label has frontal positives
    y[1:2 * C:2, :] = np.eye(C)
    df = pd.DataFrame(y, columns=labels)
    df["ImageID"] = [f"s{i // 2}_{'pa' if i % 2 == 0 else 'l'}" for i in range(len(y))]
    df["study"] = [f"s{i // 2}" for i in range(len(y))]
    df["patient"] = [f"p{i // 4}" for i in range(len(y))]
    df["projection"] = ["PA" if i % 2 == 0 else "L" for i in range(len(y))]
    df["split"], df["fold"] = "train", 0
    return IndexCache(df, labels), y


class ScriptedVal:
    """Val head inputs whose probabilities are scripted per call (call 0: the original head, then
    one call per candidate), whatever the head."""

    def __init__(self, preds):
        self.preds, self.calls = preds, 0

    def __len__(self):
        return len(self.preds[0])

    def probs(self, head, device):
        self.calls += 1
        return self.preds[self.calls - 1]


def _frontal_vs_lateral(y, frontal, n_after):
    """Candidate 0 ranks the frontal images well and the laterals at random; the later candidates
    rank the laterals well and the frontals worse, the last one best of them on the full set."""
    rng = np.random.default_rng(1)
    good, f = lambda w: w * y + (1 - w) * rng.random(y.shape), frontal[:, None]
    first = np.where(f, good(0.8), rng.random(y.shape))
    later = [np.where(f, good(0.3), good(0.4 + 0.4 * k / max(1, n_after - 1))) for k in range(n_after)]
    return [p.astype(np.float32) for p in [first, *later]]


@pytest.mark.parametrize("select_on", ["auto", "full"])
def test_crt_keeps_the_head_the_selection_set_prefers(select_on, tmp_path):
    from cxrlt.evaluation import selection as V

    cache, y_va = _paired_val()
    rows = cache.rows("train")
    sets = V.val_sets(cache, rows, {"select_on": select_on})
    preds = _frontal_vs_lateral(y_va, cache.frontal(rows), 2)
    table = [V.score_row(y_va, sets, lambda idx, p=p: p[idx]) for p in preds]
    assert np.argmax([t["proxy"] for t in table]) == 0 and np.argmax([t["full"] for t in table]) == 2  # premise
    trained = _trained_head("linear")
    tr, y_tr = _inputs("linear", tmp_path, 32, 0)
    cfg = _cfg("linear", crt_epochs=2, crt_lr=0.05)
    kept, last, info = train_head(SimpleNamespace(head=trained), tr, y_tr, ScriptedVal(preds), y_va, cfg,
                                  torch.device("cpu"), tmp_path, log=lambda *_: None, sets=sets)
    want = {"auto": (-1, "original head", trained, "proxy"), "full": (1, "cRT", last, "full")}[select_on]
    assert (info["best"]["epoch"], info["best"]["source"], info["select_on"]) == (want[0], want[1], want[3])
    assert _same(kept, want[2])
    assert info["best"]["val_mAP"] == pytest.approx(table[want[0] + 1]["full"])
    assert info["original"]["val_proxy_mAP"] == pytest.approx(table[0]["proxy"])
    assert info["val_honest_mAP"] == pytest.approx(V.choose(table, want[3])["honest"])
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["best"] for r in recs] == ([-1, -1] if select_on == "auto" else [0, 1])
    assert [r["val_proxy_mAP"] for r in recs] == pytest.approx([t["proxy"] for t in table[1:]])
    assert recs[-1]["val_honest_mAP"] == pytest.approx(info["val_honest_mAP"])


def test_tau_is_kept_on_the_selection_set(tmp_path):
    from cxrlt.evaluation import selection as V
    from cxrlt.post.retrain_head import TAU_GRID, _tau_search

    cache, y_va = _paired_val()
    rows = cache.rows("train")
    sets = V.val_sets(cache, rows, {"select_on": "auto"})
    # tau 0 (the original head) mediocre everywhere, tau 0.25 the best frontals, the larger taus the
    # best laterals
    preds = _frontal_vs_lateral(y_va, cache.frontal(rows), len(TAU_GRID) - 1)
    rng = np.random.default_rng(2)
    preds.insert(0, (0.2 * y_va + 0.8 * rng.random(y_va.shape)).astype(np.float32))
    preds.pop()
    table = [V.score_row(y_va, sets, lambda idx, p=p: p[idx]) for p in preds]
    head = build_head(_cfg("csra"), F, C)
    kept, info = _tau_search(SimpleNamespace(head=head), ScriptedVal(preds), y_va, torch.device("cpu"),
                             lambda *_: None, sets)
    assert info["best"]["tau"] == TAU_GRID[int(np.argmax([t["proxy"] for t in table]))] == 0.25
    assert TAU_GRID[int(np.argmax([t["full"] for t in table]))] != 0.25  # the full fold would keep another
    assert _same(kept, tau_normalise(head, 0.25))
    assert [g["val_select_mAP"] for g in info["grid"]] == pytest.approx([t["proxy"] for t in table])
    assert info["val_honest_mAP"] == pytest.approx(V.choose(table, "proxy")["honest"])
    assert len(info["half_choices"]) == 2 and info["sets"]["proxy"] == 20
