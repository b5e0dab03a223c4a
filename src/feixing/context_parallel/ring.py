"""Ring attention over the ring dimension: KV blocks travel point-to-point (or are all-gathered), out/lse merge in fp32.

Each ring rank j holds queries and packed KV (B, 2L, 2*hk, d) of its slice [chunk j ; chunk
2R-1-j] (L = S / 2R). At step t (1..R-1) rank j receives the KV of rank j-t and sends its own
KV to rank j+t (a ring of shifts, so that a block nobody needs is simply never sent), with the
next step's transfer in flight while the current block is computed (double buffering via
`batch_isend_irecv`). Work is split into (query chunk, key chunk) pairs; pairs that the causal
mask, the window or the documents rule out entirely are skipped, and a rank pair with no
visible chunk pair exchanges nothing. Backward re-sends KV the same way, computes block
gradients with the global lse, and returns dK/dV in fp32 straight to the owner.

Everything happens inside one autograd Function per mode, so the backward collectives are
issued in one fixed order on every rank (see DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from feixing.context_parallel.accounting import CommCounter
from feixing.ops.attention import MaskSpec, block_backward, block_forward

Tensor = torch.Tensor


@dataclass(eq=False)
class RingPlan:
    """Everything a ring step needs besides the tensors; built once per attention call."""

    group: object  # ring process group (None when R == 1)
    ring: int
    j: int
    seq_len: int
    causal: bool
    window: tuple[int, int]
    scale: float
    backend: str
    counter: CommCounter
    docs: Tensor | None  # (B, S) global document ids, or None
    mode: str  # "ring" | "allgather"

    def __post_init__(self) -> None:
        self.L = self.seq_len // (2 * self.ring)
        n = 2 * self.ring
        self.state = [[self._pair_state(qc, kc) for kc in range(n)] for qc in range(n)]
        self.needs = [[any(self.state[qc][kc] != "none" for qc in self.chunks(d) for kc in self.chunks(s))
                       for s in range(self.ring)] for d in range(self.ring)]

    def chunks(self, r: int) -> tuple[int, int]:
        return r, 2 * self.ring - 1 - r

    def _pair_state(self, qc: int, kc: int) -> str:
        """'none' (nothing visible), 'full' (all visible, no mask), 'diag' or 'partial'."""
        L = self.L
        qlo, qhi, klo, khi = qc * L, qc * L + L - 1, kc * L, kc * L + L - 1
        full = True
        if self.causal:
            if klo > qhi:
                return "none"
            full &= khi <= qlo
        left, right = self.window
        if left >= 0:
            if khi < qlo - left:
                return "none"
            full &= klo >= qhi - left
        if right >= 0:
            if klo > qhi + right:
                return "none"
            full &= khi <= qlo + right
        if self.docs is not None:
            qd, kd = self.docs[:, qlo:qhi + 1], self.docs[:, klo:khi + 1]
            if not any(bool(torch.isin(kd[b], qd[b]).any()) for b in range(qd.shape[0])):
                return "none"
            return "partial"
        if full:
            return "full"
        if qc == kc and self.causal and self.window == (-1, -1):
            return "diag"
        return "partial"

    def mask(self, qc: int, kc: int, device) -> MaskSpec:
        st = self.state[qc][kc]
        if st == "full":
            return MaskSpec(full=True)
        L = self.L
        qi = torch.arange(qc * L, qc * L + L, device=device)
        ki = torch.arange(kc * L, kc * L + L, device=device)
        qd = None if self.docs is None else self.docs[:, qc * L:qc * L + L]
        kd = None if self.docs is None else self.docs[:, kc * L:kc * L + L]
        return MaskSpec(causal=self.causal, q_index=qi, k_index=ki, q_doc=qd, k_doc=kd, window=self.window)


def _merge(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """In place: acc (fp32) <- softmax-weighted union of acc and one block's (out, lse)."""
    new = torch.logaddexp(acc_lse, lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # rows nobody sees stay 0
    w_old = torch.exp(acc_lse - safe).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)
    acc_out.mul_(w_old).add_(out.to(acc_out.dtype) * w_new)
    acc_lse.copy_(new)


def _forward_block(plan, q, kv, src, acc_out, acc_lse, hk):
    L = plan.L
    for qh, qc in enumerate(plan.chunks(plan.j)):
        for kh, kc in enumerate(plan.chunks(src)):
            if plan.state[qc][kc] == "none":
                continue
            blk = kv[:, kh * L:(kh + 1) * L]
            o, o_lse = block_forward(q[:, qh * L:(qh + 1) * L], blk[:, :, :hk], blk[:, :, hk:],
                                 scale=plan.scale, mask=plan.mask(qc, kc, q.device), backend=plan.backend)
            _merge(acc_out[:, qh * L:(qh + 1) * L], acc_lse[:, :, qh * L:(qh + 1) * L], o, o_lse)


def _backward_block(plan, dout, q, out, lse, kv, src, dq, dkv, hk):
    L = plan.L
    for qh, qc in enumerate(plan.chunks(plan.j)):
        for kh, kc in enumerate(plan.chunks(src)):
            if plan.state[qc][kc] == "none":
                continue
            qs, ks = slice(qh * L, (qh + 1) * L), slice(kh * L, (kh + 1) * L)
            blk = kv[:, ks]
            dqb, dkb, dvb = block_backward(
                dout[:, qs], q[:, qs], blk[:, :, :hk], blk[:, :, hk:], out[:, qs], lse[:, :, qs],
                scale=plan.scale, mask=plan.mask(qc, kc, q.device), backend=plan.backend)
            dq[:, qs] += dqb
            dkv[:, ks, :hk] += dkb
            dkv[:, ks, hk:] += dvb


def _post(plan, ops_spec, phase, label):
    """Issue one batch of point-to-point ops; ops_spec = [(isend|irecv, tensor, peer, tag)]."""
    ops = []
    for op, t, peer, tag in ops_spec:
        ops.append(dist.P2POp(op, t, group=plan.group, group_peer=peer, tag=tag))
        if op is dist.isend:
            plan.counter.record("p2p", phase, t.numel() * t.element_size(), f"{label}->{peer}")
    plan.counter.log.append(("p2p_batch", phase, label))  # same entry on every rank, sent or not
    return dist.batch_isend_irecv(ops) if ops else []


def _post_kv(plan, kv, t, phase):
    """Step t: send own KV to j+t if it needs it, receive j-t's KV if we need it."""
    R, j = plan.ring, plan.j
    dst, src = (j + t) % R, (j - t) % R
    spec, buf = [], None
    if plan.needs[dst][j]:
        spec.append((dist.isend, kv, dst, t))
    if plan.needs[j][src]:
        buf = torch.empty_like(kv)
        spec.append((dist.irecv, buf, src, t))
    return _post(plan, spec, phase, f"kv{t}"), buf


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


def _accumulators(q):
    """Zeroed fp32 (fp64 for fp64 inputs) out (B, S, hq, d) and lse = -inf (B, hq, S) to merge into."""
    acc = torch.promote_types(q.dtype, torch.float32)
    acc_out = torch.zeros(q.shape, dtype=acc, device=q.device)
    acc_lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc, device=q.device)
    return acc_out, acc_lse


def _finish_forward(ctx, q, kv, plan, acc_out, acc_lse):
    """Cast the merged output, keep what backward needs, and mark lse as not differentiable."""
    out = acc_out.to(q.dtype)
    ctx.save_for_backward(q, kv, out, acc_lse)
    ctx.plan = plan
    ctx.mark_non_differentiable(acc_lse)
    return out, acc_lse


class RingAttention(torch.autograd.Function):
    """q (B, 2L, hq, d), kv (B, 2L, 2hk, d) -> out (B, 2L, hq, d), lse (B, hq, 2L) fp32.

    Forward: R-1 p2p steps of KV. Backward: R-1 p2p steps of KV plus R-1 steps returning
    fp32 dK/dV to their owners, always in the order kv(t+1), dkv(t)."""

    @staticmethod
    def forward(ctx, q, kv, plan: RingPlan):
        hk = kv.shape[2] // 2
        acc_out, acc_lse = _accumulators(q)
        R, j = plan.ring, plan.j
        pending = _post_kv(plan, kv, 1, "fwd") if R > 1 else None
        _forward_block(plan, q, kv, j, acc_out, acc_lse, hk)
        for t in range(1, R):
            reqs, buf = pending
            _wait(reqs)
            if t + 1 < R:
                pending = _post_kv(plan, kv, t + 1, "fwd")
            if buf is not None:
                _forward_block(plan, q, buf, (j - t) % R, acc_out, acc_lse, hk)
        return _finish_forward(ctx, q, kv, plan, acc_out, acc_lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, out, lse = ctx.saved_tensors
        plan = ctx.plan
        hk, R, j = kv.shape[2] // 2, plan.ring, plan.j
        acc = lse.dtype
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        pending = _post_kv(plan, kv, 1, "bwd") if R > 1 else None
        _backward_block(plan, dout, q, out, lse, kv, j, dq, dkv, hk)
        inflight = []  # (reqs, recv buffer, send buffer kept alive until its send completes)
        for t in range(1, R):
            reqs, buf = pending
            _wait(reqs)
            if t + 1 < R:
                pending = _post_kv(plan, kv, t + 1, "bwd")
            src, back = (j - t) % R, (j + t) % R
            spec, blk, recv = [], None, None
            if buf is not None:
                blk = torch.zeros(kv.shape, dtype=acc, device=q.device)
                _backward_block(plan, dout, q, out, lse, buf, src, dq, blk, hk)
                spec.append((dist.isend, blk, src, R + t))
            if plan.needs[back][j]:
                recv = torch.empty(kv.shape, dtype=acc, device=q.device)
                spec.append((dist.irecv, recv, back, R + t))
            inflight.append((_post(plan, spec, "bwd", f"dkv{t}"), recv, blk))
            if len(inflight) > 1:  # keep at most two dK/dV transfers in flight
                r, rb, _ = inflight.pop(0)
                _wait(r)
                if rb is not None:
                    dkv += rb
        for r, rb, _ in inflight:
            _wait(r)
            if rb is not None:
                dkv += rb
        return dq.to(q.dtype), dkv.to(kv.dtype), None


class AllGatherAttention(torch.autograd.Function):
    """Llama-3 style: all-gather the ring group's KV, attend locally, reduce-scatter dK/dV.

    Same shapes as RingAttention. Forward: one all_gather. Backward: one all_gather (KV is
    gathered again instead of kept, to hold only one copy per layer) and one reduce-scatter
    (all_reduce + slice on gloo, which has no reduce_scatter)."""

    @staticmethod
    def _gather(plan, kv, phase):
        parts = [torch.empty_like(kv) for _ in range(plan.ring)]
        plan.counter.record("all_gather", phase, kv.numel() * kv.element_size() * (plan.ring - 1), "kv")
        dist.all_gather(parts, kv.contiguous(), group=plan.group)
        return parts

    @staticmethod
    def forward(ctx, q, kv, plan: RingPlan):
        hk = kv.shape[2] // 2
        acc_out, acc_lse = _accumulators(q)
        parts = AllGatherAttention._gather(plan, kv, "fwd")
        for t in range(plan.ring):  # same source order as the ring, so rounding matches it
            src = (plan.j - t) % plan.ring
            if plan.needs[plan.j][src]:
                _forward_block(plan, q, parts[src], src, acc_out, acc_lse, hk)
        return _finish_forward(ctx, q, kv, plan, acc_out, acc_lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, out, lse = ctx.saved_tensors
        plan = ctx.plan
        hk, R, j = kv.shape[2] // 2, plan.ring, plan.j
        parts = AllGatherAttention._gather(plan, kv, "bwd")
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        dkv_all = torch.zeros((R, *kv.shape), dtype=lse.dtype, device=q.device)
        for t in range(R):
            src = (j - t) % R
            if plan.needs[j][src]:
                _backward_block(plan, dout, q, out, lse, parts[src], src, dq, dkv_all[src], hk)
        nbytes = dkv_all.numel() * dkv_all.element_size()
        if dist.get_backend(plan.group) == "gloo":
            plan.counter.record("all_reduce", "bwd", 2 * nbytes * (R - 1) // R, "dkv")
            dist.all_reduce(dkv_all, group=plan.group)
            dkv = dkv_all[j]
        else:
            plan.counter.record("reduce_scatter", "bwd", nbytes * (R - 1) // R, "dkv")
            dkv = torch.empty(kv.shape, dtype=lse.dtype, device=q.device)
            dist.reduce_scatter_tensor(dkv, dkv_all, group=plan.group)
        return dq.to(q.dtype), dkv.to(kv.dtype), None


def local_attention(q, kv, plan: RingPlan):
    """R == 1: no communication; the same block loop on the local slice, differentiable."""
    return _Local.apply(q, kv, plan)


class _Local(torch.autograd.Function):
    """R == 1 (pure Ulysses or P == 1): q (B,S,hq,d), kv (B,S,2hk,d) -> out, lse. No communication."""

    @staticmethod
    def forward(ctx, q, kv, plan):
        hk = kv.shape[2] // 2
        acc_out, acc_lse = _accumulators(q)
        _forward_block(plan, q, kv, 0, acc_out, acc_lse, hk)
        return _finish_forward(ctx, q, kv, plan, acc_out, acc_lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, out, lse = ctx.saved_tensors
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=lse.dtype, device=q.device)
        _backward_block(ctx.plan, dout.contiguous(), q, out, lse, kv, 0, dq, dkv, kv.shape[2] // 2)
        return dq.to(q.dtype), dkv.to(kv.dtype), None
