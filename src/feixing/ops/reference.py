"""The readable specification of every operator; fused and device kernels are tested against it.

Layouts follow flash-attn: activations are (batch, seq, heads, head_dim). All functions are
plain PyTorch and differentiable by autograd; `attention_backward` is also given in closed
form because context parallelism needs block gradients computed with the *global* lse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- norms / MLP
def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- rotary
def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) (the HF "rotate_half" convention).

    x: (B, S, H, D); cos, sin: (B, S, D/2) or (S, D/2), fp32. Returns x.dtype.
    """
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- loss
def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed token cross-entropy in fp32 and the number of counted tokens.

    logits: (..., V); labels: (...). Returns (loss_sum, n_tokens) so callers can average
    correctly across micro-batches and ranks (sum of sums / sum of counts).
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    lab = labels.reshape(-1)
    loss_sum = F.cross_entropy(flat, lab, ignore_index=ignore_index, reduction="sum")
    return loss_sum, (lab != ignore_index).sum()


# ----------------------------------------------------------------------------- attention
def attention_mask(
    q_index: Tensor,
    k_index: Tensor,
    *,
    causal: bool,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
    window: tuple[int, int] = (-1, -1),
) -> Tensor:
    """Boolean visibility mask (B, Sq, Sk): True where query i may attend key j.

    q_index/k_index: global token positions in the sequence, (Sq,)/(Sk,) or (B, Sq)/(B, Sk).
    Key j is visible to query i iff j <= i when causal, i - left <= j <= i + right for
    window=(left, right) (-1 = unbounded, as in flash-attn), and both lie in the same document.
    """
    if q_index.dim() == 1:
        q_index = q_index.unsqueeze(0)
    if k_index.dim() == 1:
        k_index = k_index.unsqueeze(0)
    qi = q_index.unsqueeze(-1)  # (B, Sq, 1)
    kj = k_index.unsqueeze(-2)  # (B, 1, Sk)
    vis = torch.ones(torch.broadcast_shapes(qi.shape, kj.shape), dtype=torch.bool, device=qi.device)
    if causal:
        vis &= kj <= qi
    left, right = window
    if left >= 0:
        vis &= kj >= qi - left
    if right >= 0:
        vis &= kj <= qi + right
    if q_doc is not None or k_doc is not None:
        assert q_doc is not None and k_doc is not None, "document ids are needed for q and k"
        vis = vis & (q_doc.unsqueeze(-1) == k_doc.unsqueeze(-2))
    return vis


def _expand_kv(x: Tensor, n_heads: int) -> Tensor:
    """(B, S, Hkv, D) -> (B, S, H, D) by repeating each KV head H/Hkv times (GQA)."""
    rep = n_heads // x.shape[2]
    return x if rep == 1 else x.repeat_interleave(rep, dim=2)


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulate in fp32 at least (fp64 inputs stay fp64, which tests use for exactness)."""
    return torch.promote_types(x.dtype, torch.float32)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    q_index: Tensor | None = None,
    k_index: Tensor | None = None,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
    window: tuple[int, int] = (-1, -1),
) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns the log-sum-exp.

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0 (GQA).
    Returns out (B, Sq, H, D) in q.dtype and lse (B, H, Sq) in fp32 (fp64 for fp64 inputs). A query that sees no key
    gets out = 0 and lse = -inf (so partial results merge correctly).
    q_index/k_index default to arange(Sq)/arange(Sk): with causal and Sq == Sk this is the
    usual lower-triangular mask.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if H % k.shape[2] != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k.shape[2]})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    dev = q.device
    q_index = torch.arange(Sq, device=dev) if q_index is None else q_index
    k_index = torch.arange(Sk, device=dev) if k_index is None else k_index
    vis = attention_mask(q_index, k_index, causal=causal, q_doc=q_doc, k_doc=k_doc, window=window)
    acc = _acc_dtype(q)
    kf, vf = _expand_kv(k, H).to(acc), _expand_kv(v, H).to(acc)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), kf) * scale
    scores = scores.masked_fill(~vis.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq); -inf for fully masked rows
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(scores - safe_lse.unsqueeze(-1))  # exp(-inf) = 0 on masked entries
    out = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    return out.to(q.dtype), lse


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    q_index: Tensor | None = None,
    k_index: Tensor | None = None,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
    window: tuple[int, int] = (-1, -1),
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form gradients of `attention` w.r.t. q, k, v (fp32 results, fp64 for fp64 inputs).

    `out` and `lse` may be the *final* merged values of a sharded computation: then
    P = exp(S - lse) is this block's share of the global softmax and the returned block
    gradients sum (over blocks) to the exact global gradients. GQA: dk, dv are summed over
    the query heads that share a KV head, shape (B, Sk, Hkv, D).
    """
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    dev = q.device
    q_index = torch.arange(Sq, device=dev) if q_index is None else q_index
    k_index = torch.arange(Sk, device=dev) if k_index is None else k_index
    vis = attention_mask(q_index, k_index, causal=causal, q_doc=q_doc, k_doc=k_doc, window=window)
    acc = _acc_dtype(q)
    qf, dof, of = q.to(acc), dout.to(acc), out.to(acc)
    kf, vf = _expand_kv(k, H).to(acc), _expand_kv(v, H).to(acc)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    safe_lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    p = torch.exp(scores - safe_lse.unsqueeze(-1)).masked_fill(~vis.unsqueeze(1), 0.0)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dof)
    dp = torch.einsum("bqhd,bkhd->bhqk", dof, vf)
    delta = (dof * of).sum(-1).transpose(1, 2)  # (B, H, Sq) = rowsum(dout * out)
    ds = p * (dp - delta.unsqueeze(-1)) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, qf)
    rep = H // Hkv
    if rep > 1:
        dk = dk.view(B, Sk, Hkv, rep, D).sum(3)
        dv = dv.view(B, Sk, Hkv, rep, D).sum(3)
    return dq, dk, dv
