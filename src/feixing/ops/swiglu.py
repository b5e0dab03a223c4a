"""SwiGLU dispatch: silu(gate) * up; implementations keep the reference's signature."""

from __future__ import annotations

import torch

from feixing.ops import reference

BACKENDS = ("auto", "reference")


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up (see reference.swiglu). Only the reference exists today; `auto` picks it."""
    if backend not in BACKENDS:
        raise ValueError(f"swiglu backend {backend!r} is unknown; choose one of {BACKENDS}")
    return reference.swiglu(gate, up)
