"""Run under torchrun (2 processes, gloo): the gradients that reach the optimizer in one
accumulated step (accum_steps 2, the first micro-batch under DDP no_sync), with compile false
and with compile true, through the Trainer's own step. Rank r writes them to <out>/grads_r.pt.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_compile_worker.py CACHE OUT
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrlt.core import config  # noqa: E402
from cxrlt.training.trainer import Trainer  # noqa: E402


def grads_of_one_step(cache: str, out: Path, compile_value: str) -> list[dict]:
    cfg = config.resolve([], dict(model="test_convnext", pretrained=False, head="linear", loss="bce", epochs=1,
                                  batch_size=4, accum_steps=2, max_train_batches=2, lr=1e-3, warmup_epochs=0,
                                  workers=0, device="cpu", drop_path=0.0, aug_rotate=3.0, compile=compile_value))
    tr = Trainer(cfg, cache, str(out / compile_value))
    seen, step = [], tr.optimizer.step

    def spy(*a, **k):
        seen.append({n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    tr.optimizer.step = spy
    tr.train_epoch(0)
    return seen


def main() -> None:
    cache, out = sys.argv[1], Path(sys.argv[2])
    res = {c: grads_of_one_step(cache, out, c) for c in ("false", "true")}
    from torch._dynamo.utils import counters

    res["graphs"] = int(counters["stats"]["unique_graphs"])  # > 0: dynamo compiled the model
    rank = torch.distributed.get_rank()
    torch.save(res, out / f"grads_{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
