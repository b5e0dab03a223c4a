"""Attention backends that return the log-sum-exp, and the dispatch the model calls.

PLACEHOLDER owned by the context-parallel work: for now every call goes to the reference.
The public, model-facing signature below is fixed.
"""

from __future__ import annotations

import torch

from feixing.ops import reference

Tensor = torch.Tensor


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    document_ids: Tensor | None = None,
    window: tuple[int, int] | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Single-device attention: q (B, S, H, D), k/v (B, S, Hkv, D) -> out (B, S, H, D).

    document_ids (B, S): tokens attend only within their document (packed sequences).
    window=(left, right) as in flash-attn; None = unbounded.
    """
    out, _ = reference.attention(
        q, k, v, causal=causal, softmax_scale=softmax_scale, q_doc=document_ids,
        k_doc=document_ids, window=window or (-1, -1),
    )
    return out
