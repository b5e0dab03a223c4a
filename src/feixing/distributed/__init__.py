"""Process groups, the named DeviceMesh (ParallelDims), FSDP2 and launching."""

from feixing.distributed.env import Env, init, shutdown
from feixing.distributed.mesh import Meshes, ParallelDims

__all__ = ["Env", "Meshes", "ParallelDims", "init", "shutdown"]
