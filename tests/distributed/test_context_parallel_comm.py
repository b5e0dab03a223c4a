"""CP on 4 ranks: bytes match DESIGN.md's formulas, collective order is the same on every rank,
errors come before any communication, shard/gather round-trip."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from feixing.context_parallel import ContextParallel
from feixing.ops import reference
from tests.distributed.cp_cases import get_cp, run_case

F32 = 4  # bytes per fp32 element


def _bytes(rank, world_size, cases):
    return [run_case(c)["bytes"] for c in cases]


@pytest.mark.parametrize("U,R,Hkv", [(2, 2, 2), (4, 1, 2), (1, 4, 2), (4, 1, 4), (2, 2, 1)])
def test_bytes_match_design_formulas(pool4, U, R, Hkv):
    B, S, H, D = 2, 32, 4, 8
    case = dict(U=U, R=R, B=B, S=S, H=H, Hkv=Hkv, D=D, causal=True)
    per_rank = pool4.run(_bytes, [case, dict(case, mode="allgather")])
    P = U * R
    kvh = max(Hkv, U)  # KV heads after replication to at least one per Ulysses rank
    # DESIGN.md: Ulysses (S/P)(2H + 2Hkv) d (U-1)/U per rank per layer (Hkv -> max(Hkv, U)).
    a2a = B * (S // P) * (2 * H + 2 * kvh) * D * (U - 1) // U * F32
    # DESIGN.md: ring ~2 S max(Hkv,U) d / U; exactly steps of this rank's KV slice.
    ring = B * 2 * (S // R) * kvh * D // U * (R - 1) * F32
    for ring_bytes, ag_bytes in per_rank:
        assert ring_bytes.get("all_to_all/fwd", 0) == a2a
        assert ring_bytes.get("all_to_all/bwd", 0) == a2a  # backward is the mirror image
        assert ring_bytes.get("p2p/fwd", 0) == ring
        # backward: KV again, plus fp32 dK/dV of the same size back to the owners
        assert ring_bytes.get("p2p/bwd", 0) == 2 * ring
        # all-gather KV sends the same bytes as the ring in forward (R-1 copies of the slice)
        assert ag_bytes.get("all_gather/fwd", 0) == ring
        assert ag_bytes.get("all_to_all/fwd", 0) == a2a


def _window_bytes(rank, world_size):
    res = run_case(dict(U=1, R=4, B=1, S=32, H=2, Hkv=2, D=8, causal=True, window=(2, 0)))
    return res["bytes"].get("p2p/fwd", 0)


def test_sliding_window_blocks_are_not_sent(pool4):
    """With L = 4-token chunks and window 2, chunk c only needs chunks c and c-1, so each ring
    rank needs at most its two ring neighbours: the shift by 2 is never sent."""
    sent = pool4.run(_window_bytes)
    S, R, L, kv_bytes = 32, 4, 4, 1 * (32 // 4) * 2 * 2 * 8 * F32
    vis = reference.attention_mask(torch.arange(S), torch.arange(S), causal=True, window=(2, 0))[0]
    owner = lambda c: c if c < R else 2 * R - 1 - c
    needed = {(owner(qc), owner(kc)) for qc in range(2 * R) for kc in range(2 * R)
              if vis[qc * L:(qc + 1) * L, kc * L:(kc + 1) * L].any() and owner(qc) != owner(kc)}
    for j in range(R):
        assert sent[j] == kv_bytes * sum(1 for (d, s) in needed if s == j)
    assert sum(sent) < R * (R - 1) * kv_bytes


def _order(rank, world_size, cases):
    return [run_case(c)["log"] for c in cases]


def test_collectives_issued_in_the_same_order_on_every_rank(pool4):
    base = dict(B=1, S=32, H=4, Hkv=2, D=8)
    cases = [dict(base, U=2, R=2, causal=True, docs=True, window=(6, 0)),
             dict(base, U=1, R=4, causal=False, window=(3, 2)),
             dict(base, U=2, R=2, mode="allgather", causal=True)]
    logs = pool4.run(_order, cases)
    for i in range(len(cases)):
        bwd = [[e for e in logs[r][i] if e[1] == "bwd"] for r in range(4)]
        assert bwd[0], "the backward issued no collectives"
        assert all(b == bwd[0] for b in bwd), f"case {cases[i]}: {bwd}"
        assert [e for e in logs[0][i] if e[1] == "fwd"] == [e for e in logs[3][i] if e[1] == "fwd"]


def _errors(rank, world_size):
    msgs = []

    def expect(fn, needle):
        try:
            fn()
        except ValueError as e:
            assert needle in str(e), f"{needle!r} not in {e}"
            msgs.append(str(e))
            return
        raise AssertionError(f"no ValueError for {needle!r}")

    expect(lambda: ContextParallel(3, 1), "product is the group size")
    expect(lambda: ContextParallel(0, 4), "ulysses_degree must be an integer")
    expect(lambda: ContextParallel(2, 2, mode="stripe"), "mode must be one of")
    expect(lambda: ContextParallel(2, 2, backend="cuda").attention(
        *([torch.zeros(1, 4, 4, 8)] * 3)), "runs on cuda tensors")
    cp = get_cp(2, 2)
    cp.counter.reset()
    z = lambda s, h: torch.zeros(1, s, h, 8)
    expect(lambda: cp.shard(torch.zeros(1, 12, 4, 8)), "not divisible by 2 * cp_degree")
    expect(lambda: cp.attention(z(3, 4), z(3, 4), z(3, 4)), "not divisible by 2")
    expect(lambda: cp.attention(z(4, 3), z(4, 3), z(4, 3)), "not divisible by cp_ulysses_degree")
    expect(lambda: cp.attention(z(4, 6), z(4, 3), z(4, 3)), "key/value heads 3 are not divisible")
    expect(lambda: cp.attention(z(4, 4), z(4, 4), z(4, 4), document_ids=torch.zeros(1, 5, dtype=torch.long)),
           "document_ids must be")
    expect(lambda: cp.attention(z(4, 4), z(4, 4), z(4, 4), window=(2,)), "window must be")
    expect(lambda: cp.attention(z(4, 4), z(4, 2), z(4, 4)), "must share")
    cp4 = get_cp(4, 1)
    cp4.counter.reset()
    expect(lambda: cp4.attention(z(4, 12), z(4, 3), z(4, 3)), "not a multiple of it")
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("cp",))
    expect(lambda: ContextParallel.from_mesh(mesh), "'cp_ulysses' and 'cp_ring'")
    no_comm = not cp.counter.log and not cp4.counter.log
    # every rank raised before communicating, so the group is still in step:
    t = torch.ones(1)
    dist.all_reduce(t)
    return msgs, no_comm, t.item()


def test_every_error_path_raises_before_communicating(pool4):
    for msgs, no_comm, total in pool4.run(_errors):
        assert len(msgs) == 13 and no_comm and total == 4.0


def _roundtrip(rank, world_size):
    out = []
    for U, R, uf in [(2, 2, True), (2, 2, False), (1, 4, True), (4, 1, True)]:
        cp = get_cp(U, R, ulysses_first=uf)
        x = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3) + 1
        xs = cp.shard(x, seq_dim=1).requires_grad_()
        full = cp.gather(xs, seq_dim=1)
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        (full * w).sum().backward()
        pos_ok = torch.equal(cp.positions(16), cp.shard(torch.arange(16), seq_dim=0))
        ids = cp.shard(torch.arange(16)[None, :, None].expand(2, 16, 1), seq_dim=1)[0, :, 0]
        out.append((torch.equal(full, x), torch.equal(xs.grad, world_size * cp.shard(w, 1)),
                    pos_ok, torch.equal(ids, cp.positions(16))))
    return out


def test_shard_then_gather_is_identity(pool4):
    for per_rank in pool4.run(_roundtrip):
        for ident, grad, pos, ids in per_rank:
            assert ident and grad and pos and ids


def _mesh_case(rank, world_size):
    a = run_case(dict(U=2, R=2, B=1, S=16, H=4, Hkv=2, D=8, causal=True, from_mesh=True))
    b = get_cp(2, 2)
    return a, (b.u, b.j)


def test_from_mesh_matches_constructor_and_reference(pool4):
    for res, coords in pool4.run(_mesh_case):
        assert res["coords"] == coords
        assert max(res[k] for k in ("out", "lse", "dq", "dk", "dv")) < 2e-5  # fp32, 16 keys


def _compiled_block_with_cp(rank, world_size):
    """A block compiled around CP attention: same output and gradients as eager, and no recompile
    over calls (the attention's Python state once made a compiled block recompile at every call)."""
    import torch._dynamo

    cp = get_cp(2, 2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=g)
    x = cp.shard(torch.randn(1, 16, 2, 8, generator=g))  # (B, S/P, H, D) on this rank

    def block(x, w):
        q = x @ w
        return (cp.attention(q, x, x) @ w).sin()

    compiled = torch.compile(block, backend="eager")  # Dynamo's capture alone: what guards and recompiles
    torch._dynamo.reset()
    outs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for fn in (block, compiled, compiled, compiled):
            wi = w.clone().requires_grad_()
            y = fn(x, wi)
            y.sum().backward()
            outs.append((y.detach(), wi.grad))
    (y0, g0), rest = outs[0], outs[1:]  # the eager backend runs the same ops: exactly equal
    return all(torch.equal(y, y0) and torch.equal(g, g0) for y, g in rest)


def test_compiled_block_around_cp_attention_matches_eager_without_recompiling(pool4):
    assert pool4.run(_compiled_block_with_cp) == [True] * 4
