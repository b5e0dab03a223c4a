"""The test spawner itself: collectives run, results come back by rank, failures surface."""

import pytest
import torch
import torch.distributed as dist


def _allreduce(rank, world_size, base):
    t = torch.tensor([float(rank + base)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_pool_runs_collectives_and_reports_failures(pool2):
    assert pool2.run(_allreduce, 10) == [21.0, 21.0]
    with pytest.raises(AssertionError, match="(?s)rank 1 failed.*boom on rank 1"):
        pool2.run(_fail_on_one)
    # the pool restarts after a failure
    assert pool2.run(_allreduce, 0) == [1.0, 1.0]
