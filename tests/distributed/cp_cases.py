"""Case runner for the context-parallel tests: build inputs, run CP and the reference, return errors."""

from __future__ import annotations

import torch

from feixing.context_parallel import ContextParallel
from feixing.ops import reference

_CP: dict = {}


def get_cp(U, R, mode="ring", ulysses_first=True, backend="auto", from_mesh=False, subgroup=False):
    """One ContextParallel per configuration per process (building one creates process groups).

    subgroup=True: the world is split into consecutive CP groups of U*R ranks (as with data
    parallelism outside CP) and this rank's group is passed explicitly.
    """
    key = (U, R, mode, ulysses_first, backend, from_mesh, subgroup)
    if key not in _CP:
        if subgroup:
            import torch.distributed as dist

            world, p = dist.get_world_size(), U * R
            groups = [dist.new_group(list(range(i, i + p))) for i in range(0, world, p)]
            mine = groups[dist.get_rank() // p]
            _CP[key] = ContextParallel(U, R, group=mine, mode=mode, ulysses_first=ulysses_first,
                                       backend=backend)
        elif from_mesh:  # ring outer, Ulysses inner: the same rank order as ulysses_first=True
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh("cpu", (R, U), mesh_dim_names=("cp_ring", "cp_ulysses"))
            _CP[key] = ContextParallel.from_mesh(mesh, mode=mode, backend=backend)
        else:
            _CP[key] = ContextParallel(U, R, mode=mode, ulysses_first=ulysses_first, backend=backend)
    return _CP[key]


def make_docs(B, S, seed):
    """Packed documents with random lengths, so boundaries fall inside chunks and ranks."""
    g = torch.Generator().manual_seed(seed)
    docs = torch.empty(B, S, dtype=torch.long)
    for b in range(B):
        pos, d = 0, 0
        while pos < S:
            n = int(torch.randint(1, max(2, S // 3), (1,), generator=g))
            docs[b, pos:pos + n] = d
            pos, d = pos + n, d + 1
    return docs


def run_case(case: dict) -> dict:
    """Max abs errors of CP (out, lse, dq, dk, dv) against the fp64 single-process reference.

    Also returns the error of single-device attention in the same dtype/backend (`base`) so a
    test can check that CP adds no error that grows with R.
    """
    U, R = case["U"], case["R"]
    B, S, H, Hkv, D = case["B"], case["S"], case["H"], case["Hkv"], case["D"]
    dtype = case.get("dtype", torch.float32)
    cp = get_cp(U, R, case.get("mode", "ring"), case.get("ulysses_first", True), case.get("backend", "auto"),
                case.get("from_mesh", False), case.get("subgroup", False))
    g = torch.Generator().manual_seed(case.get("seed", 0))
    q = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, Hkv, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    docs = make_docs(B, S, case.get("seed", 0)) if case.get("docs") else None
    causal, window = case.get("causal", True), case.get("window")
    kw = dict(causal=causal, q_doc=docs, k_doc=docs, window=window or (-1, -1))
    ro, rl = reference.attention(q, k, v, **kw)
    rdq, rdk, rdv = reference.attention_backward(do, q, k, v, ro, rl, **kw)

    def shard(x):
        return cp.shard(x, seq_dim=1)

    qs, ks, vs = (shard(x).to(dtype).requires_grad_() for x in (q, k, v))
    cp.counter.reset()
    out, lse = cp.attention_with_lse(qs, ks, vs, causal=causal, window=window,
                                     document_ids=None if docs is None else shard(docs))
    (out.to(torch.float64) * shard(do)).sum().backward()
    fin = lambda a, b: (a.double() - b).abs().nan_to_num(0.0).max().item()
    pos = cp.positions(S)
    lse_ref = rl[:, :, pos]
    same_inf = bool(torch.equal(torch.isinf(lse), torch.isinf(lse_ref)))
    err = dict(coords=(cp.u, cp.j), bytes=cp.counter.summary(), out=fin(out, shard(ro)), lse=fin(lse, lse_ref), dq=fin(qs.grad, shard(rdq)),
               dk=fin(ks.grad, shard(rdk)), dv=fin(vs.grad, shard(rdv)), lse_inf_match=same_inf,
               log=[e for e in cp.counter.log if e[0] != "p2p"])
    # single-device baseline in the same dtype and backend
    from feixing.ops.attention import attention_with_lse
    qb, kb, vb = (x.to(dtype).requires_grad_() for x in (q, k, v))
    bo, _ = attention_with_lse(qb, kb, vb, causal=causal, document_ids=docs, window=window,
                                backend=case.get("backend", "auto"))
    (bo.double() * do).sum().backward()
    err["base"] = max(fin(bo, ro), fin(qb.grad, rdq), fin(kb.grad, rdk), fin(vb.grad, rdv))
    return err
