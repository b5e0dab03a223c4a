"""The hybrid attention pipeline: Ulysses all-to-all -> ring (or all-gather) attention -> all-to-all back.

Shapes on a rank of a U x R group, local sequence s = S / P:
    q (B, s, H, d), k/v (B, s, Hkv, d)
 -> pack [q heads | k heads | v heads] destination-major, KV replicated to U heads if Hkv < U
 -> SeqToHead: (B, S/R, H/U + 2 hk, d) with hk = max(Hkv, U) / U
 -> RingAttention / AllGatherAttention / local: out (B, S/R, H/U, d), lse (B, H/U, S/R)
 -> HeadToSeq: out (B, s, H, d)
The chain is linear, so autograd runs the backward collectives in exactly the reverse order.
"""

from __future__ import annotations

import torch

from feixing.context_parallel.ring import (
    AllGatherAttention,
    RingAttention,
    RingPlan,
    local_attention,
)
from feixing.context_parallel.ulysses import HeadToSeq, SeqToHead, head_to_seq

Tensor = torch.Tensor


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, u: int) -> Tensor:
    """(B,s,H,d),(B,s,Hkv,d)x2 -> (B, s, U, H/U + 2*hk, d), rank u' owning slice [:, :, u'].

    When Hkv < U each KV head is repeated U/Hkv times so every rank gets the one it needs;
    that sends each destination exactly one KV head, the same bytes as sending it unreplicated.
    """
    b, s, h, d = q.shape
    hkv = k.shape[2]
    if hkv < u:
        rep = u // hkv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    hk = k.shape[2] // u
    return torch.cat([q.reshape(b, s, u, h // u, d), k.reshape(b, s, u, hk, d),
                      v.reshape(b, s, u, hk, d)], dim=3)


def run_attention(q, k, v, *, u: int, ulysses_group, plan: RingPlan, with_lse: bool):
    """The full pipeline on one rank; returns out (B, s, H, d) and, if asked, lse (B, H, s)."""
    b, s, h, d = q.shape
    hq = h // u
    if u > 1:
        x = SeqToHead.apply(pack_qkv(q, k, v, u), ulysses_group, plan.counter, "qkv")
        ql, kvl = x[:, :, :hq], x[:, :, hq:]
    else:
        ql, kvl = q, torch.cat([k, v], dim=2)
    kvl = kvl.contiguous()
    if plan.ring == 1:
        out, lse = local_attention(ql, kvl, plan)
    elif plan.mode == "allgather":
        out, lse = AllGatherAttention.apply(ql, kvl, plan)
    else:
        out, lse = RingAttention.apply(ql, kvl, plan)
    if u > 1:
        out = HeadToSeq.apply(out, u, ulysses_group, plan.counter, "out").reshape(b, s, h, d)
        if with_lse:  # only for parity checks; an extra all-to-all that attention() skips
            lse = head_to_seq(lse.transpose(1, 2).unsqueeze(-1).contiguous(), u, ulysses_group,
                              plan.counter, "lse", "lse").reshape(b, s, h).transpose(1, 2)
    return (out, lse) if with_lse else (out, None)
