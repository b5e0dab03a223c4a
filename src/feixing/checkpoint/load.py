"""Read a committed checkpoint into live tensors, resharding DTensors to the current layout; no pickle.

Every rank's index (rank-NNNNN.json) says which chunk of which global tensor its safetensors file
holds. A rank loading a DTensor computes the region it owns on the *current* mesh and copies in
the overlapping parts of every saved chunk, reading only those bytes (safetensors slices).
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from feixing.checkpoint.commit import CheckpointError, rank_stem
from feixing.checkpoint.stage import decode

SHARDED, LOCAL = "sharded/", "local/"


def chunk_of(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """(local tensor, its global offset, whether this rank writes it) for a tensor to save.

    A DTensor replicated over some mesh dims is written only by the rank at coordinate 0 there.
    """
    if not isinstance(t, DTensor):
        return t, (0,) * t.dim(), True
    if any(p.is_partial() for p in t.placements):
        raise CheckpointError("cannot checkpoint a DTensor with Partial placement; reduce it first")
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not in the tensor's mesh
        return t._local_tensor, (0,) * t.dim(), False
    shape, offset = _shard_box(tuple(t.shape), mesh, tuple(t.placements))
    local = t._local_tensor
    assert tuple(local.shape) == tuple(shape), (local.shape, shape)
    writes = all(c == 0 for c, p in zip(coord, t.placements) if p.is_replicate())
    return local, tuple(offset), writes


@functools.lru_cache(maxsize=65536)
def _shard_box(shape: tuple[int, ...], mesh, placements: tuple) -> tuple:
    """(local shape, global offset) of this rank's shard; the same at every save, so computed once
    (torch's computation took most of a save's gathering time: ~0.3 ms per DTensor)."""
    return compute_local_shape_and_global_offset(shape, mesh, placements)


class Reader:
    """Reads one checkpoint folder (already verified against its manifest)."""

    def __init__(self, folder: str, manifest: dict):
        self.folder = folder
        self.manifest = manifest
        self.indices = []
        for r in range(manifest["world_size"]):
            with open(os.path.join(folder, rank_stem(r) + ".json"), "rb") as f:
                self.indices.append(json.loads(f.read()))
        self.chunks: dict[str, list[tuple[int, list[int], list[int]]]] = {}
        self.global_shapes: dict[str, list[int]] = {}
        for r, index in enumerate(self.indices):
            for path, c in index["chunks"].items():
                self.chunks.setdefault(path, []).append((r, c["offset"], c["shape"]))
                self.global_shapes[path] = c["global_shape"]
        self._files: dict[int, object] = {}

    def _file(self, rank: int):
        if rank not in self._files:
            path = os.path.join(self.folder, rank_stem(rank) + ".safetensors")
            self._files[rank] = safe_open(path, framework="pt", device="cpu")
        return self._files[rank]

    def sharded_skeleton(self) -> dict:
        return self.indices[0]["sharded"]

    def fill(self, path: str, target: torch.Tensor) -> None:
        """Copy the saved global tensor `path` into `target`'s region (DTensor: its local shard)."""
        if path not in self.global_shapes:
            raise CheckpointError(f"{self.folder}: no tensor {path!r} in the checkpoint "
                                  "(different model or optimizer than the one saved?)")
        gshape = tuple(target.shape)
        if tuple(self.global_shapes[path]) != gshape:
            raise CheckpointError(f"{self.folder}: {path!r} has shape {self.global_shapes[path]}, the "
                                  f"live tensor {list(gshape)} (different model flavor?)")
        if isinstance(target, DTensor):
            local = target._local_tensor
            lshape, goff = compute_local_shape_and_global_offset(gshape, target.device_mesh,
                                                                 target.placements)
        else:
            local, lshape, goff = target, gshape, (0,) * len(gshape)
        covered = 0
        with torch.no_grad():
            for rank, off, shape in self.chunks[path]:
                lo = [max(a, b) for a, b in zip(off, goff)]
                hi = [min(a + s, b + t) for a, s, b, t in zip(off, shape, goff, lshape)]
                if any(h <= lo_ for lo_, h in zip(lo, hi)):
                    continue
                f = self._file(rank)
                if list(lo) == list(off) and [h - lo_ for lo_, h in zip(lo, hi)] == list(shape):
                    data = f.get_tensor(SHARDED + path)
                else:
                    data = f.get_slice(SHARDED + path)[tuple(slice(a - o, b - o)
                                                             for a, b, o in zip(lo, hi, off))]
                dst = local[tuple(slice(a - g, b - g) for a, b, g in zip(lo, hi, goff))]
                dst.copy_(data)
                covered += math.prod(b - a for a, b in zip(lo, hi))
        if covered != math.prod(lshape):
            raise CheckpointError(f"{self.folder}: saved chunks of {path!r} cover {covered} of "
                                  f"{math.prod(lshape)} elements of this rank's shard (corrupt index)")

    def local_state(self, rank: int) -> dict:
        """The non-sharded entries (scheduler, loader, train state) as saved by `rank`."""
        f = self._file(rank)
        return decode(self.indices[rank]["local"], lambda key: f.get_tensor(LOCAL + key))

    def close(self) -> None:
        self._files.clear()
