"""CP attention == the single-process fp64 reference (out, lse, dq, dk, dv) for every U x R, U*R in {2, 4, 8}."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.cp_cases import run_case

# fp32 CP vs fp64 reference: each output sums <= 32 keys of O(1) terms, so rounding is
# ~32 * 6e-8 * |values| (|values| < ~10) ~ 2e-5 at worst; observed <= 2e-6.
ATOL = 2e-5
# "error does not grow with R": CP may not be worse than 3x the single-device fp32 error of
# the same backend (+1e-6 for cases where that error happens to be tiny).
GROWTH = 3.0


def _cases(P: int) -> list[dict]:
    base = dict(B=2, S=32, D=24)  # head_dim 24: not a power of two
    out = []
    for U in (1, 2, 4, 8):
        if P % U:
            continue
        R = P // U
        mha = dict(base, H=8, Hkv=8) if U == 8 else dict(base, H=4, Hkv=4)
        gqa = dict(base, H=8, Hkv=2)  # Hkv < U for U in (4, 8): replicated KV heads
        one_kv = dict(base, H=8, Hkv=1)  # MQA: a single KV head
        cfg = dict(U=U, R=R)
        out += [
            dict(mha, **cfg, causal=True),
            dict(gqa, **cfg, causal=False),
            dict(one_kv, **cfg, causal=True, docs=True, seed=1),  # packed docs across ranks
            dict(gqa, **cfg, causal=True, window=(5, 0), seed=2),  # causal sliding window
            dict(gqa, **cfg, causal=False, window=(3, 2), docs=True, seed=3),  # two-sided window + docs
        ]
        if R > 1:  # the all-gather-KV alternative to the ring, and the other rank order
            out += [dict(gqa, **cfg, mode="allgather", causal=True, docs=True, seed=4),
                    dict(gqa, **cfg, mode="allgather", causal=False, window=(4, 1), seed=5)]
        if U > 1 and R > 1:
            out += [dict(gqa, **cfg, ulysses_first=False, causal=True, seed=6)]
    out += [dict(base, H=4, Hkv=2, U=min(P, 4), R=1 if P <= 4 else P // 4,
                 backend="reference", causal=True, docs=True, seed=7)]
    return [c for c in out if c["H"] % c["U"] == 0]


def _run_all(rank, world_size, cases):
    return [run_case(c) for c in cases]


def _check(pool, P):
    cases = _cases(P)
    results = pool.run(_run_all, cases)
    for i, case in enumerate(cases):
        for rank, res in enumerate(r[i] for r in results):
            tag = f"rank {rank} case {case}"
            assert res["lse_inf_match"], tag
            for key in ("out", "lse", "dq", "dk", "dv"):
                assert res[key] < ATOL, f"{key} error {res[key]:.2e} {tag}"
                assert res[key] <= GROWTH * res["base"] + 1e-6, f"{key} grows: {res[key]:.2e} vs base {res['base']:.2e} {tag}"


def test_parity_two_ranks(pool2):
    _check(pool2, 2)


def test_parity_four_ranks(pool4):
    _check(pool4, 4)


@pytest.mark.slow
def test_parity_eight_ranks(pool8):
    _check(pool8, 8)


def test_cases_cover_the_required_grid():
    seen = {(c["U"], c["R"]) for P in (2, 4, 8) for c in _cases(P)}
    assert seen >= {(1, 2), (2, 1), (1, 4), (2, 2), (4, 1), (1, 8), (2, 4), (4, 2), (8, 1)}
    assert any(c["Hkv"] < c["U"] for c in _cases(8)) and any(c["D"] & (c["D"] - 1) for c in _cases(2))
    assert torch.float32 == torch.float32  # parity runs in fp32 (run_case default)
