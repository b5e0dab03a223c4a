"""FSDP2 (fully_shard) over the dp_shard x cp ranks, HSDP when dp_replicate > 1, mixed precision."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from feixing.distributed.mesh import DP_REPLICATE, DP_SHARD_CP, Meshes, ParallelDims


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], dims: ParallelDims, meshes: Meshes,
               dtype: str) -> None:
    """Shard each block, then the root (embeddings, final norm, head), in place.

    Parameters are sharded over dp_shard x cp: context-parallel ranks hold the same weights, so
    they share the shards (as torchtitan does). With dp_replicate > 1 the mesh is 2-D (HSDP):
    replicas all-reduce what the shard groups reduce-scatter. bf16 computes in bf16 with fp32
    master weights and fp32 gradient reduction.
    """
    if dims.dp_replicate > 1:
        mesh = meshes.root[(DP_REPLICATE, DP_SHARD_CP)]
    else:
        mesh = meshes.dp_shard_cp
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
        reduce_dtype=torch.float32,
    )
    for i, block in enumerate(blocks):
        # The last block's parameters are needed right away by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
