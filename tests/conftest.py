import os

import pytest
import torch

# Two cores on CI: intra-op threads beyond that only add contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def hook_count():
    """``count(model)``: the forward and forward-pre hooks attached anywhere in ``model``.

    Tests compare it before and after a run to show that nothing stays attached.
    """
    def count(model):
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return count


def _gloo_rank(rank, fn, store, args):
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on two shared cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def two_ranks(tmp_path):
    """``run(fn, *args)``: call ``fn(rank, *args)`` in two spawned processes joined by gloo.

    ``fn`` must be a module-level function (the processes import it); each process has the
    default process group initialised around the call and destroyed after it, even on error.
    """
    def run(fn, *args):
        import torch.multiprocessing as mp

        mp.spawn(_gloo_rank, args=(fn, str(tmp_path / "gloo-store"), args), nprocs=2)
    return run
