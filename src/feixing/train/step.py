"""One optimizer step: micro-batches forward/backward, exact loss averaging, clipping, NaN guard."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from feixing.ops.cross_entropy import cross_entropy

IGNORE_INDEX = -100


@dataclass
class StepResult:
    loss: float
    """Mean token loss over the whole global batch (all micro-batches, DP and CP ranks)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Tokens (labels counted in the loss) in the global batch."""
    skipped: bool
    """True when the loss or gradient norm was not finite and the update was dropped."""


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (sharded DTensors included); clip in place if max_norm > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=False)
    if isinstance(norm, DTensor):  # partial norms of shards -> one replicated value
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm, foreach=False)
    return norm


def _no_phase(name: str):
    return contextlib.nullcontext()


def train_step(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]],
               grad_ranks: int, max_norm: float, group=None,
               phase: Callable = _no_phase) -> tuple[StepResult, bool]:
    """Forward/backward every micro-batch, then compute the clipped gradient norm.

    The loss is sum(token losses) / (tokens in the global batch): the same average whatever the
    split over micro-batches, data-parallel and context-parallel ranks. FSDP2 *averages*
    gradients over the `grad_ranks` ranks it reduces across, so each rank's backward uses
    loss * grad_ranks to turn that average back into the sum. Returns (result, finite);
    the caller steps the optimizer only when finite. `phase(name)` is a context manager that
    times "forward", "backward" and the exposed "comm" waits (telemetry).
    """
    local_tokens = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
    device = micro_batches[0]["tokens"].device
    counts = torch.tensor([float(local_tokens)], device=device, dtype=torch.float64)
    with phase("comm"):
        dist.all_reduce(counts, group=group)
    global_tokens = max(1.0, counts.item())
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for mb in micro_batches:
        with phase("forward"):
            logits = model(mb["tokens"], positions=mb.get("positions"),
                           document_ids=mb.get("document_ids"))
            mb_loss, _ = cross_entropy(logits, mb["labels"], ignore_index=IGNORE_INDEX)
        with phase("backward"):
            (mb_loss * (grad_ranks / global_tokens)).backward()
        loss_sum += mb_loss.detach().double()
    with phase("comm"):
        dist.all_reduce(loss_sum, group=group)
        loss = (loss_sum / global_tokens).item()
        norm = grad_norm_and_clip([p for p in model.parameters() if p.requires_grad], max_norm).item()
    finite = math.isfinite(loss) and math.isfinite(norm)
    return StepResult(loss, norm, int(global_tokens), not finite), finite
