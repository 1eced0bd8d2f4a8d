"""Distributed data parallel helpers (torchrun + DDP; NCCL on GPU, gloo on CPU).

Launched by `torchrun --nproc_per_node=N train.py ...`, which sets RANK, WORLD_SIZE and
LOCAL_RANK. A plain `python train.py` is a world of one and never touches torch.distributed.
Several nodes need nothing more: `torchrun --nnodes=M --node_rank=K --rdzv_endpoint=HOST:PORT`
(or MASTER_ADDR/MASTER_PORT) on each node sets the same variables, RANK being global and
LOCAL_RANK the GPU on this node; the process group reads the rendezvous from the environment.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cxrlt.training.device import pick_device

DIST_TIMEOUT_MIN = 30  # minutes a collective may wait for the slowest rank


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device_name: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=pick_device(device_name))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # an explicit timeout (a rank stuck in a long checkpoint write or a dead node ends the run
        # in minutes, not the default's hours) and, on CUDA, the device id (NCCL binds its
        # communicator to this GPU at once instead of guessing on the first collective)
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=DIST_TIMEOUT_MIN), **kw)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank src's obj on every rank (obj itself in a world of one): a decision one rank makes."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_across(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if info.device.type == "cuda":
        t = t.to(info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world


def sum_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all ranks, in place (a no-op in a world of one)."""
    if info.enabled:
        dist.all_reduce(t)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def average_grads(params, info: DistInfo) -> None:
    """Average the gradients of `params` over all ranks in place, in one all-reduce (what DDP does
    for the parameters its forward saw; the trainer's head-only epochs bypass DDP)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not info.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
