"""Process-group setup: what train.py asks of torch.distributed (the real 2-process runs are in test_train.py)."""

import datetime

import torch.distributed as dist

from cxrlt.training import distributed


def test_process_group_gets_an_explicit_timeout(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    info = distributed.setup("cpu")
    assert (info.rank, info.world, info.device.type) == (1, 2, "cpu")
    assert seen["backend"] == "gloo" and "device_id" not in seen  # device_id is for NCCL only
    assert seen["timeout"] == datetime.timedelta(minutes=distributed.DIST_TIMEOUT_MIN)


def test_cuda_only_settings_leave_the_cpu_alone():
    import torch

    from cxrlt.training.device import enable_cuda_fast_paths, optimizer_kwargs

    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    enable_cuda_fast_paths(torch.device("cpu"))
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == before
    assert optimizer_kwargs(torch.device("cpu")) == {}
    assert optimizer_kwargs(torch.device("cuda", 0)) == {"fused": True}
