"""RMSNorm dispatch: the model calls this; implementations keep the reference's signature."""

from __future__ import annotations

import torch

from feixing.ops import reference

BACKENDS = ("auto", "reference")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto"
) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight in fp32, returned in x.dtype (see reference.rms_norm).

    Only the reference exists today; `auto` picks it. A fused kernel joins `BACKENDS` once a test
    compares it with the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"rms_norm backend {backend!r} is unknown; choose one of {BACKENDS}")
    return reference.rms_norm(x, weight, eps)
