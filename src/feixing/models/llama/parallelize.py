"""Apply parallelism to a single-device Llama from outside: CP attention -> act. ckpt -> compile -> FSDP2."""

from __future__ import annotations

import logging

from torch import nn

from feixing.config.schema import ParallelConfig
from feixing.distributed.fsdp import apply_fsdp
from feixing.distributed.mesh import CP_RING, CP_ULYSSES, Meshes, ParallelDims

log = logging.getLogger("feixing")


def parallelize(model: nn.Module, dims: ParallelDims, meshes: Meshes, cfg: ParallelConfig,
                dtype: str, attention_backend: str = "auto"):
    """Parallelise `model` in place in the fixed order; returns the ContextParallel or None.

    The caller shards every (batch, seq) input with `cp.shard(x, seq_dim=1)` when CP is on.
    """
    cp = None
    if dims.cp > 1:
        from feixing.context_parallel import ContextParallel

        cp = ContextParallel.from_mesh(meshes.root[(CP_RING, CP_ULYSSES)], mode=cfg.cp_mode,
                                       backend=attention_backend)
        for block in model.layers.values():
            block.attention.core = cp.attention
        log.info("context parallel: ulysses %d x ring %d (%s)", dims.cp_ulysses, dims.cp_ring,
                 cfg.cp_mode)
    blocks = list(model.layers.values())
    if cfg.activation_checkpoint == "full":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for name, block in list(model.layers.items()):
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
        blocks = list(model.layers.values())
    if cfg.compile:
        for block in blocks:
            block.compile()
    apply_fsdp(model, blocks, dims, meshes, dtype)
    return cp
