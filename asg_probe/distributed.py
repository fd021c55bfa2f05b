"""The one place that talks to ``torch.distributed`` for the analyses (torchrun sharding).

Everything here is a no-op in a single process, so analysis code calls it
unconditionally. Two ways of merging state across processes, chosen by shape:

* fixed-shape running sums (ridge statistics, counters): :func:`all_reduce_sum`,
  one flat collective for a whole list of tensors, in place;
* state whose size differs between processes, or that a process may not have
  at all (it saw no batch): :func:`all_gather_object`, then merge in Python.

Examples
--------
>>> import torch
>>> rank_world()
(0, 1)
>>> t = [torch.ones(2), torch.zeros(1)]
>>> all_reduce_sum(t)[0].tolist()      # one process: unchanged
[1.0, 1.0]
>>> all_gather_object({"n": 3})
[{'n': 3}]
"""
from __future__ import annotations

import os

import torch

from .errors import UsageError

__all__ = ["is_distributed", "rank_world", "shard_indices", "all_reduce_sum", "all_gather_object",
           "launcher_environment"]

# what torchrun (and torch.distributed.launch) set for every process it starts
_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launcher_environment(environ=None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from a launcher's environment; ``(0, 1, 0)`` for one process.

    ``WORLD_SIZE`` > 1 without the other variables a launcher sets means no launcher started
    this process: joining a process group would wait for peers that never come, so it is a
    :class:`~asg_probe.errors.UsageError` (one line) instead of a hang.

    >>> launcher_environment({})
    (0, 1, 0)
    >>> launcher_environment({"WORLD_SIZE": "2"})
    Traceback (most recent call last):
    ...
    asg_probe.errors.UsageError: WORLD_SIZE=2 is set, but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not: start the command with torchrun --nproc_per_node=N, or unset WORLD_SIZE to run in one process
    """
    env = os.environ if environ is None else environ
    text = env.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={text!r} is not a whole number; unset it to run in one process") from None
    if world <= 1:
        return 0, 1, 0
    missing = [v for v in _LAUNCHER_VARIABLES if not env.get(v)]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} is set, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not: start the command with torchrun "
                         "--nproc_per_node=N, or unset WORLD_SIZE to run in one process")
    try:
        rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise UsageError(f"RANK={env['RANK']!r} / LOCAL_RANK={env['LOCAL_RANK']!r} are not whole numbers; "
                         "start the command with torchrun") from None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); start the command with torchrun")
    return rank, world, local_rank


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when not distributed."""
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def shard_indices(num: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Positions ``rank, rank + world_size, ...`` below ``num``: one process's share (disjoint, covering).

    Examples
    --------
    >>> shard_indices(5, rank=1, world_size=2)
    tensor([1, 3])
    """
    world_size, rank = int(world_size), int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
    return torch.arange(rank, int(num), world_size, dtype=torch.long)


def _collective_device(group=None):
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors, group=None):
    """Sum each tensor of ``tensors`` over all processes, in place; returns ``tensors``.

    The tensors are packed into one flat buffer per dtype (one collective instead of
    one per tensor), on the device the backend needs, and the sums copied back into
    the originals, wherever they live. Every process must pass tensors of the same
    shapes and dtypes in the same order.
    """
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    device = _collective_device(group)
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, same in by_dtype.items():
        flat = torch.cat([t.detach().reshape(-1).to(device=device) for t in same])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        offset = 0
        for t in same:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return tensors


def all_gather_object(obj, group=None) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    everyone = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(everyone, obj, group=group)
    return everyone
