"""Zigzag layout math: shards partition the sequence, balance causal work, and unshard inverts shard."""

from __future__ import annotations

import pytest
import torch

from feixing.context_parallel import layout
from feixing.context_parallel.accounting import CommCounter


@pytest.mark.parametrize("U,R", [(1, 1), (1, 4), (2, 2), (4, 1), (2, 4)])
def test_shards_partition_and_unshard_inverts(U, R):
    S = 2 * U * R * 3
    x = torch.arange(S).view(1, S) * 10
    shards = [[layout.shard(x, 1, U, R, u, j) for u in range(U)] for j in range(R)]
    idx = torch.cat([layout.shard_index(S, U, R, u, j) for j in range(R) for u in range(U)])
    assert torch.equal(idx.sort().values, torch.arange(S))  # every token exactly once
    assert torch.equal(shards[1 % R][U - 1][0], layout.shard_index(S, U, R, U - 1, 1 % R) * 10)
    assert torch.equal(layout.unshard(shards, 1, U, R), x)
    # after the all-to-all a ring rank holds its Ulysses group's tokens, chunk-major
    for j in range(R):
        group = torch.cat([layout.shard_index(S, U, R, u, j) for u in range(U)])
        ring = layout.ring_slice_index(S, R, j)
        assert torch.equal(group.sort().values, ring.sort().values)
        assert torch.equal(ring[: S // (2 * R)], torch.arange(j * S // (2 * R), (j + 1) * S // (2 * R)))


def test_zigzag_balances_causal_work():
    S, R = 64, 4
    work = []
    for j in range(R):
        qi = layout.ring_slice_index(S, R, j)
        work.append(int((qi + 1).sum()))  # keys visible under a causal mask
    assert len(set(work)) == 1


def test_rank_coords_both_orders():
    assert [layout.rank_coords(p, 2, 2, True) for p in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [layout.rank_coords(p, 2, 2, False) for p in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_bad_sequence_length_names_the_fix():
    with pytest.raises(ValueError, match=r"not divisible by 2 \* cp_degree .* multiple of 8"):
        layout.shard(torch.zeros(1, 12), 1, 2, 2, 0, 0)


def test_counter_totals_and_summary():
    c = CommCounter()
    c.record("p2p", "fwd", 10, "kv1")
    c.record("p2p", "bwd", 5)
    c.record("all_to_all", "fwd", 7)
    assert c.total() == 22 and c.total("fwd") == 17 and c.total(kind="p2p") == 15
    assert c.summary() == {"all_to_all/fwd": 7, "p2p/bwd": 5, "p2p/fwd": 10}
    assert [e[0] for e in c.log] == ["p2p", "p2p", "all_to_all"]


def test_ring_plan_skips_masked_pairs_and_balances_work():
    from feixing.context_parallel.ring import RingPlan

    R = 4
    plan = RingPlan(group=None, ring=R, j=0, seq_len=64, causal=True, window=(-1, -1), scale=1.0,
                    backend="reference", counter=CommCounter(), docs=None, mode="ring")
    weight = {"none": 0.0, "diag": 0.5, "full": 1.0, "partial": 1.0}
    work = [sum(weight[plan.state[qc][kc]] for qc in plan.chunks(j) for kc in range(2 * R))
            for j in range(R)]
    assert len(set(work)) == 1  # zigzag: every ring rank does the same causal work
    assert plan.state[0][1] == "none" and plan.state[1][0] == "full" and plan.state[2][2] == "diag"
    win = RingPlan(group=None, ring=R, j=0, seq_len=64, causal=True, window=(3, 0), scale=1.0,
                   backend="reference", counter=CommCounter(), docs=None, mode="ring")
    assert win.state[5][3] == "none" and win.state[5][4] == "partial"  # 8-token chunks
    assert not win.needs[0][2]  # ring rank 0 needs nothing from rank 2 under this window
