"""Training's side of ``torch.distributed``: join ``torchrun``'s process group, then a few collectives.

The collectives build on :mod:`asg_probe.distributed` (the one module that talks to
``torch.distributed`` for the analyses); joining and leaving the process group, and the
barriers around checkpoints, belong to training alone. Every function is a no-op in a
single process, so the loop calls them unconditionally.

Examples
--------
>>> ctx = init_distributed("cpu")           # no WORLD_SIZE in the environment: one process
>>> ctx.is_main, ctx.enabled
(True, False)
>>> all_reduce_sum([1.0, 2.0], "cpu")
[1.0, 2.0]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from asg_probe import distributed


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistContext:
    """Join the process group that ``torchrun`` describes (``RANK``/``WORLD_SIZE``), if any.

    NCCL on CUDA, gloo on CPU. Without ``WORLD_SIZE`` > 1 this is a no-op.
    """
    rank, world_size, local_rank = distributed.launcher_environment()  # no launcher: one line, not a hang
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few scalars over all processes, in float64 (identity without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return distributed.all_reduce_sum([t])[0].tolist()


def any_process(flag: bool, device) -> bool:
    """True if ``flag`` is true on any process: every rank must take the same branch."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def barrier():
    if distributed.is_distributed():
        dist.barrier()


def cleanup():
    if distributed.is_distributed():
        dist.destroy_process_group()
