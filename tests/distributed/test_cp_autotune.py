"""Measured `auto` (plan/auto.py): calibration and the timed tie-break pick the same valid layout on every rank."""

from __future__ import annotations

import math

from feixing.plan.auto import AUTOTUNE_MIN_GAIN
from feixing.plan.cp_cost import Workload, valid_degrees


def _choose(rank, world_size, cp_degree, per_node):
    from feixing.plan.auto import _cp_group, choose_on_group

    w = Workload(seq_len=64, n_heads=4, n_kv_heads=2, head_dim=8, dtype_bytes=4)
    choice, rep = choose_on_group(w, _cp_group(cp_degree), devices_per_node=per_node, reps=2)
    return choice, rep


def test_autotune_choice_is_identical_on_every_rank_and_valid(pool4):
    w = Workload(seq_len=64, n_heads=4, n_kv_heads=2, head_dim=8, dtype_bytes=4)
    # (4, 4): one group in one "node"; (2, 2): two CP groups (data-parallel 2) measuring at
    # the same time; (4, 2): one group spanning two "nodes" (node-local all-to-all measured)
    for cp_degree, per_node in ((4, 4), (2, 2), (4, 2)):
        res = pool4.run(_choose, cp_degree, per_node)
        choices = [c for c, _ in res]
        assert all(c == choices[0] for c in choices), choices
        u, r, mode = choices[0]
        assert (u, r) in valid_degrees(w, cp_degree) and mode in ("ring", "allgather")
        reports = [rep for _, rep in res]
        # the calibrated constants and timings are world-reduced, so identical bit for bit
        assert all(rep["cluster"] == reports[0]["cluster"] for rep in reports)
        rep = reports[0]
        links = ("intra_gbps", "inter_gbps") if cp_degree > per_node else ("ulysses_gbps", "ring_gbps")
        assert all(math.isfinite(rep["cluster"][k]) and rep["cluster"][k] > 0
                   for k in ("tflops", *links))
        if cp_degree > per_node:  # measured intra/inter speeds, placement rule applies
            assert rep["cluster"]["ulysses_gbps"] == rep["cluster"]["ring_gbps"] == 0.0
            assert rep["cluster"]["intra_gbps"] != 150.0  # not the default any more
        assert 0.0 <= rep["cluster"]["overlap"] <= 1.0
        layouts = [tuple(m["layout"]) for m in rep["model"]]
        assert (u, r, mode) in layouts
        if len(layouts) > 1:  # timed: the model's pick stays unless another is >= 5% faster
            ratios = rep["ratio_to_model_pick"]
            assert len(ratios) == len(layouts) and ratios[0] == 1.0
            i = layouts.index((u, r, mode))
            if i:
                assert ratios[i] == min(ratios) and ratios[i] < 1.0 - AUTOTUNE_MIN_GAIN
            else:
                assert min(ratios) >= 1.0 - AUTOTUNE_MIN_GAIN


def _resolve(rank, world_size, overrides):
    from feixing import config
    from feixing.plan.auto import resolve_auto_cp

    cfg = config.load("configs/demo.toml", overrides)
    out = resolve_auto_cp(cfg, measure=True).parallel
    return out.cp_ulysses_degree, out.cp_ring_degree, out.cp_mode, out.cp_degree


def test_trainer_path_resolves_cp_degree_by_measurement(pool4, tmp_path):
    base = [f"data.path={tmp_path}", "parallel.cp_ulysses_degree=1", "parallel.cp_ring_degree=1",
            "parallel.dp_shard_degree=1", "parallel.cp_degree=4", "data.seq_len=64"]
    res = pool4.run(_resolve, base)
    assert all(x == res[0] for x in res), res
    u, r, mode, left = res[0]
    assert u * r == 4 and left == 0 and mode in ("ring", "allgather")
