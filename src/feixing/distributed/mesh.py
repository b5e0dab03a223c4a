"""ParallelDims: the one object that owns parallel degrees and the named DeviceMesh built from them."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from feixing.config.schema import ParallelConfig

# Mesh axis names, defined once. Order = outer to inner: the innermost axes get consecutive
# ranks, so Ulysses groups (all-to-all, bandwidth-hungry) sit inside a node by default.
DP_REPLICATE = "dp_replicate"
DP_SHARD = "dp_shard"
CP_RING = "cp_ring"
CP_ULYSSES = "cp_ulysses"
TP = "tp"
AXES = (DP_REPLICATE, DP_SHARD, CP_RING, CP_ULYSSES, TP)
# Flattened views: data-parallel ranks (see different samples), FSDP's shard group (dp_shard and
# cp ranks hold the same parameters, so parameters are sharded over both), and the CP group.
DP = "dp"
DP_SHARD_CP = "dp_shard_cp"
CP = "cp"


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp_ulysses: int
    cp_ring: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """Resolve dp_shard = -1 to the remaining ranks and validate the product."""
        others = cfg.dp_replicate_degree * cfg.cp_ulysses_degree * cfg.cp_ring_degree * cfg.tp_degree
        for name in ("dp_replicate_degree", "cp_ulysses_degree", "cp_ring_degree", "tp_degree"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"parallel.{name} = {getattr(cfg, name)} must be >= 1")
        dp_shard = cfg.dp_shard_degree
        if dp_shard == -1:
            if world_size % others:
                raise ValueError(
                    f"world size {world_size} is not divisible by dp_replicate x cp_ulysses x "
                    f"cp_ring x tp = {others}; change the degrees or the number of processes")
            dp_shard = world_size // others
        if dp_shard < 1:
            raise ValueError(f"parallel.dp_shard_degree = {dp_shard} must be >= 1 or -1 (auto)")
        dims = cls(cfg.dp_replicate_degree, dp_shard, cfg.cp_ulysses_degree, cfg.cp_ring_degree,
                   cfg.tp_degree, world_size)
        if dims.product != world_size:
            raise ValueError(
                f"parallel degrees multiply to {dims.product} (dp_replicate {dims.dp_replicate} x "
                f"dp_shard {dims.dp_shard} x cp_ulysses {dims.cp_ulysses} x cp_ring {dims.cp_ring} "
                f"x tp {dims.tp}) but the world size is {world_size}; set parallel.dp_shard_degree "
                f"= -1 to fill the rest, or launch {dims.product} processes")
        return dims

    @property
    def product(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp_ulysses * self.cp_ring * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks see different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def cp(self) -> int:
        return self.cp_ulysses * self.cp_ring

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.dp_replicate, self.dp_shard, self.cp_ring, self.cp_ulysses, self.tp)

    def build_mesh(self, device_type: str) -> Meshes:
        """The 5-D named mesh plus its flattened `dp`, `dp_shard_cp` and `cp` views."""
        root = init_device_mesh(device_type, self.sizes, mesh_dim_names=AXES)
        return Meshes(
            root=root,
            dp=root[(DP_REPLICATE, DP_SHARD)]._flatten(DP),
            dp_shard_cp=root[(DP_SHARD, CP_RING, CP_ULYSSES)]._flatten(DP_SHARD_CP),
            cp=root[(CP_RING, CP_ULYSSES)]._flatten(CP),
        )

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate on each axis (row-major over AXES), without building a mesh."""
        out = {}
        for name, size in reversed(list(zip(AXES, self.sizes))):
            out[name] = rank % size
            rank //= size
        return out

    def dp_rank(self, rank: int) -> int:
        c = self.coords(rank)
        return c[DP_REPLICATE] * self.dp_shard + c[DP_SHARD]

    def describe(self) -> str:
        return (f"dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x cp_ring "
                f"{self.cp_ring} x cp_ulysses {self.cp_ulysses} x tp {self.tp} = {self.world_size}")

    @property
    def is_cp(self) -> bool:
        return self.cp > 1


@dataclass(frozen=True)
class Meshes:
    """The root mesh and the flattened views we keep ourselves (slicing flattened dims from the
    root is deprecated in PyTorch). `meshes["cp_ulysses"]` slices a named axis of the root."""

    root: DeviceMesh
    dp: DeviceMesh
    dp_shard_cp: DeviceMesh
    cp: DeviceMesh

    def __getitem__(self, name: str | tuple[str, ...]) -> DeviceMesh:
        return self.root[name]
