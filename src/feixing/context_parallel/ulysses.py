"""Ulysses all-to-all: sequence-sharded (B, S/P, ...) <-> head-sharded (B, S/R, h, ...) inside one Ulysses group.

Conventions (see layout.py): before the exchange rank u holds tokens [chunk j piece u ;
chunk 2R-1-j piece u] with heads arranged destination-major as (B, s, U, h, d), where slice
[:, :, u'] are the heads rank u' will own. After it, rank u holds its head slice for the whole
ring slice in the order [chunk j ; chunk 2R-1-j] (pieces 0..U-1 of each chunk, in order).
One `all_to_all_single` per direction on one contiguous buffer (q, k and v travel together).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from feixing.context_parallel.accounting import CommCounter

Tensor = torch.Tensor


def _a2a(send: Tensor, group, counter: CommCounter, phase: str, label: str) -> Tensor:
    """all_to_all_single along dim 0 (= peer); counts the (U-1)/U of the buffer that leaves."""
    n = send.shape[0]
    recv = torch.empty_like(send)
    counter.record("all_to_all", phase, send.numel() * send.element_size() * (n - 1) // n, label)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def seq_to_head(x: Tensor, group, counter: CommCounter, phase: str, label: str) -> Tensor:
    """(B, s, U, h, d) -> (B, U*s, h, d) in ring-slice order [chunk j ; chunk 2R-1-j]."""
    b, s, u, h, d = x.shape
    send = x.permute(2, 0, 1, 3, 4).contiguous()  # (U dest, B, s, h, d)
    recv = _a2a(send, group, counter, phase, label)  # (U src, B, s, h, d)
    # src u' sent [chunk j piece u' ; chunk 2R-1-j piece u']: regroup as chunk-major, piece-minor.
    return recv.view(u, b, 2, s // 2, h, d).permute(1, 2, 0, 3, 4, 5).reshape(b, u * s, h, d)


def head_to_seq(y: Tensor, u: int, group, counter: CommCounter, phase: str, label: str) -> Tensor:
    """Inverse of seq_to_head: (B, U*s, h, d) -> (B, s, U, h, d)."""
    b, su, h, d = y.shape
    s = su // u
    send = y.reshape(b, 2, u, s // 2, h, d).permute(2, 0, 1, 3, 4, 5).contiguous()  # (U dest, B, 2, s/2, h, d)
    recv = _a2a(send, group, counter, phase, label)  # (U src = head slice, B, 2, s/2, h, d)
    return recv.view(u, b, s, h, d).permute(1, 2, 0, 3, 4)


class SeqToHead(torch.autograd.Function):
    """Forward: seq_to_head (one all-to-all). Backward: head_to_seq of the gradient (one all-to-all)."""

    @staticmethod
    def forward(ctx, x, group, counter, label):
        ctx.cfg = (x.shape[2], group, counter, label)
        return seq_to_head(x, group, counter, "fwd", label)

    @staticmethod
    def backward(ctx, g):
        u, group, counter, label = ctx.cfg
        return head_to_seq(g.contiguous(), u, group, counter, "bwd", label), None, None, None


class HeadToSeq(torch.autograd.Function):
    """Forward: head_to_seq (one all-to-all). Backward: seq_to_head of the gradient (one all-to-all)."""

    @staticmethod
    def forward(ctx, y, u, group, counter, label):
        ctx.cfg = (group, counter, label)
        return head_to_seq(y, u, group, counter, "fwd", label)

    @staticmethod
    def backward(ctx, g):
        group, counter, label = ctx.cfg
        return seq_to_head(g.contiguous(), group, counter, "bwd", label), None, None, None, None
