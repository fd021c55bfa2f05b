"""asg_probe.distributed: known sums and gathers across two gloo processes; no-ops in one."""
import torch

from asg_probe.distributed import all_gather_object, all_reduce_sum, rank_world, shard_indices


def test_single_process_is_a_no_op():
    values = [torch.tensor([1.5, 2.5]), torch.tensor(3)]
    assert all_reduce_sum(values)[0].tolist() == [1.5, 2.5] and int(values[1]) == 3
    assert rank_world() == (0, 1) and all_gather_object("x") == ["x"]


def _worker(rank, store, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        floats = torch.full((2, 2), float(rank + 1), dtype=torch.float64)
        counts = torch.tensor([rank, 10 * rank], dtype=torch.long)   # another dtype: its own collective
        all_reduce_sum([floats, counts])
        gathered = all_gather_object({"rank": rank, "ids": list(shard_indices(5, *rank_world()).tolist())})
        torch.save((rank_world(), floats, counts, gathered), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_sum_in_place_and_gather_in_rank_order(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        (r, world), floats, counts, gathered = torch.load(f"{tmp_path / 'out'}.{rank}")
        assert (r, world) == (rank, 2)
        assert floats.dtype == torch.float64 and floats.tolist() == [[3.0, 3.0], [3.0, 3.0]]
        assert counts.dtype == torch.long and counts.tolist() == [1, 10]
        assert gathered == [{"rank": 0, "ids": [0, 2, 4]}, {"rank": 1, "ids": [1, 3]}]
