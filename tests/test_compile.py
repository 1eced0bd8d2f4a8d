"""torch.compile: the config key (auto | true | false, old booleans kept), the eager fallback, and
compile + DDP + no_sync accumulation on the CPU (gloo, 2 processes) giving the eager gradients."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_cfg
from cxrlt.core.config import coerce
from cxrlt.core.errors import ConfigError
from cxrlt.training.device import CompiledOrEager, compile_on


def test_compile_and_grad_checkpointing_take_auto_and_the_old_booleans():
    for key in ("compile", "grad_checkpointing"):
        assert [coerce(key, v, "x") for v in (True, False, "true", "no", "auto")] == \
            ["true", "false", "true", "false", "auto"]
        with pytest.raises(ConfigError, match="is not one of"):
            coerce(key, "sometimes", "x")
    assert tiny_cfg()["compile"] == "auto" and tiny_cfg()["grad_checkpointing"] == "false"
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [compile_on(v, cpu) for v in ("auto", "true", "false")] == [False, True, False]
    assert [compile_on(v, gpu) for v in ("auto", "true", "false")] == [True, True, False]


def test_a_compile_failure_runs_eagerly_with_one_warning():
    def broken_backend(gm, inputs):
        raise RuntimeError("no compiler here")

    lin = torch.nn.Linear(3, 2)
    said = []
    m = CompiledOrEager(lin, "test model", said.append, backend=broken_backend)
    x = torch.randn(4, 3)
    assert torch.equal(m(x), lin(x)) and torch.equal(m(x), lin(x))  # twice: the second call is eager already
    assert len(said) == 1 and said[0].startswith("warning: torch.compile failed for the test model")
    assert m.weight is lin.weight and list(m.state_dict()) == ["weight", "bias"]  # the eager module's


@pytest.mark.slow
def test_compiled_ddp_with_no_sync_accumulation_gives_the_eager_gradients(demo_cache, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CXRLT_COMPILE_BACKEND="aot_eager")  # dynamo + AOT autograd, no C++
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "tests" / "ddp_compile_worker.py"), str(demo_cache), str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "torch.compile failed" not in p.stderr  # compiled for real, not the fallback
    ranks = [torch.load(tmp_path / f"grads_{r}.pt") for r in (0, 1)]
    for res in ranks:
        assert res["graphs"] > 0
        eager, compiled = res["false"], res["true"]
        assert len(eager) == len(compiled) == 1  # one optimizer step of 2 micro-batches
        assert set(eager[0]) == set(compiled[0]) and len(eager[0]) > 10
        for name, g in eager[0].items():
            assert torch.allclose(g, compiled[0][name], rtol=1e-4, atol=1e-6), name
    for name, g in ranks[0]["true"][0].items():  # all-reduced: every rank holds the same mean gradient
        assert torch.allclose(g, ranks[1]["true"][0][name], atol=1e-7), name


def test_grad_checkpointing_auto_is_on_exactly_when_the_step_does_not_fit():
    from cxrlt.training.device import CHECKPOINT_HEADROOM, choose_grad_checkpointing, step_memory_bytes

    gpu, gb = torch.device("cuda", 0), 1e9
    probe = lambda: (2 * gb, 1 * gb)  # noqa: E731 - 2 GB fixed + 1 GB per image
    need = step_memory_bytes(2 * gb, 1 * gb, 16, n_params=200_000_000, ema=True)
    assert need == pytest.approx((2 + 16 + 1.6 + 0.8) * gb)
    on, why = choose_grad_checkpointing("auto", gpu, probe, 16, 200_000_000, True, free_bytes=need / CHECKPOINT_HEADROOM * 1.01)
    assert not on and "within 90%" in why and "batch 16" in why
    on, why = choose_grad_checkpointing("auto", gpu, probe, 16, 200_000_000, True, free_bytes=need / CHECKPOINT_HEADROOM * 0.99)
    assert on and "more than 90%" in why
    assert choose_grad_checkpointing("true", gpu, probe) == (True, "set in the config")
    assert choose_grad_checkpointing("false", gpu, probe) == (False, "set in the config")
    assert choose_grad_checkpointing("auto", torch.device("cpu"), probe)[0] is False


def test_trainer_says_what_it_chose(demo_cache, tmp_path):
    from cxrlt.training.trainer import Trainer

    tr = Trainer(tiny_cfg(grad_checkpointing="auto", compile="auto"), str(demo_cache), str(tmp_path / "run"))
    assert tr.grad_checkpointing is False and tr.compiled is False and tr.forward is tr.ddp_model
    text = (tmp_path / "run" / "train.log").read_text()
    assert "grad_checkpointing off (auto: off on the CPU" in text and "torch.compile off (compile: auto, cpu)" in text
    tr = Trainer(tiny_cfg(grad_checkpointing=True), str(demo_cache), str(tmp_path / "run2"))
    assert tr.grad_checkpointing and all(s.grad_checkpointing for s in tr.model.backbone.stages)
