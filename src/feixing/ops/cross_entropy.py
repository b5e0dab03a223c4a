"""Cross-entropy dispatch: summed fp32 loss and token count, so callers average across ranks."""

from __future__ import annotations

import torch

from feixing.ops import reference

BACKENDS = ("auto", "reference")


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n_tokens) over logits (..., V) and labels (...) (see reference.cross_entropy).

    Average as sum(loss_sum) / sum(n_tokens) over micro-batches and ranks, never as a mean of
    means: packed batches hold different numbers of counted tokens.
    """
    if backend not in BACKENDS:
        raise ValueError(f"cross_entropy backend {backend!r} is unknown; choose one of {BACKENDS}")
    return reference.cross_entropy(logits, labels, ignore_index)
