"""The context-parallel cost model and `auto` choice: head rules, link placement, and the choices it documents."""

from __future__ import annotations

import pytest

from feixing.plan.cp_cost import (
    Cluster,
    Workload,
    candidates,
    choose,
    layer_time,
    shortlist,
    valid_degrees,
)


def test_valid_degrees_follow_the_head_rules():
    w = Workload(seq_len=131072, n_heads=32, n_kv_heads=8)
    ok = valid_degrees(w, 64)
    assert (16, 4) in ok and (32, 2) in ok  # Hkv < U is fine when U is a multiple of Hkv
    assert all(u != 64 for u, _ in ok)  # 32 heads cannot split 64 ways
    w2 = Workload(seq_len=4096, n_heads=12, n_kv_heads=3)
    assert valid_degrees(w2, 8) == [(1, 8)]  # U=2: 3 % 2; U=4: 4 % 3; U=8: 12 % 8
    with pytest.raises(ValueError, match="no \\(ulysses, ring\\) split"):
        candidates(Workload(seq_len=100, n_heads=4, n_kv_heads=4), Cluster(cp_degree=8))


def test_ulysses_across_nodes_pays_the_slow_link():
    w = Workload(seq_len=131072, n_heads=32, n_kv_heads=8)
    c = Cluster(cp_degree=64, devices_per_node=8)
    inside, across = layer_time(w, c, 8, 8), layer_time(w, c, 16, 4)
    # per-rank a2a bytes grow only by (U-1)/U, but the link is 6x slower across nodes
    assert across["ulysses_comm_s"] > 4 * inside["ulysses_comm_s"]


def test_auto_fills_the_node_with_ulysses_on_a_cluster():
    w = Workload(seq_len=262144, n_heads=32, n_kv_heads=8)
    assert choose(w, Cluster(cp_degree=64, devices_per_node=8)) == (8, 8, "ring")


def test_auto_picks_pure_ring_when_heads_forbid_ulysses():
    w = Workload(seq_len=65536, n_heads=12, n_kv_heads=3)
    assert choose(w, Cluster(cp_degree=8)) [:2] == (1, 8)


def test_candidates_are_sorted_and_complete():
    w = Workload(seq_len=32768, n_heads=8, n_kv_heads=2)
    rows = candidates(w, Cluster(cp_degree=4, devices_per_node=4))
    assert [r["total_s"] for r in rows] == sorted(r["total_s"] for r in rows)
    assert {(r["U"], r["R"], r["mode"]) for r in rows} == {
        (1, 4, "ring"), (1, 4, "allgather"), (2, 2, "ring"), (2, 2, "allgather"), (4, 1, "ring")}


def test_shortlist_keeps_layouts_within_the_margin_fastest_first():
    w = Workload(seq_len=32768, n_heads=8, n_kv_heads=2)
    c = Cluster(cp_degree=8, devices_per_node=8)
    rows = candidates(w, c)
    assert shortlist(w, c, 0.0) == rows[:1]  # margin 0: the model's choice alone
    short = shortlist(w, c, 0.5)
    assert short == [r for r in rows if r["total_s"] <= 1.5 * rows[0]["total_s"]]
    assert shortlist(w, c, 1e9) == rows  # a huge margin times every layout


def test_measured_link_speeds_override_the_placement_rule():
    w = Workload(seq_len=65536, n_heads=8, n_kv_heads=8)
    c = Cluster(cp_degree=8, devices_per_node=8)  # intra-node: 150 GB/s both ways by placement
    slow = Cluster(cp_degree=8, devices_per_node=8, ulysses_gbps=1.5, ring_gbps=1.5)
    for u, r in ((8, 1), (1, 8)):
        base, meas = layer_time(w, c, u, r), layer_time(w, slow, u, r)
        comm = "ulysses_comm_s" if r == 1 else "ring_comm_exposed_s"
        assert meas[comm] > 50 * base[comm]  # 100x slower links; latency is the same
        assert meas["compute_s"] == base["compute_s"]
