"""Process-group setup for cuda/nccl, npu/hccl and cpu/gloo: device choice, seeds, timeouts."""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from feixing.config.schema import DistributedConfig

log = logging.getLogger("feixing")

_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return torch.npu.is_available()


def pick_device_type(requested: str) -> str:
    """auto -> cuda if present, else npu (torch_npu), else cpu; an explicit choice must exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "npu" if npu_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("distributed.device = 'cuda' but no CUDA device is visible; "
                           "set distributed.device = 'auto' or 'cpu'")
    if requested == "npu" and not npu_available():
        raise RuntimeError("distributed.device = 'npu' but torch_npu is not installed or sees no "
                           "NPU; `pip install feixing[npu]` on an Ascend host, or use 'auto'")
    if requested not in _BACKENDS:
        raise ValueError(f"distributed.device = {requested!r}: use auto, cuda, npu or cpu")
    return requested


def seed_everything(seed: int) -> None:
    """Same seed on every rank: parameters are initialised identically before sharding."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_flight_recorder(entries: int = 2000) -> None:
    """Keep torch's record of the last `entries` collectives per process (its flight recorder; a
    ring buffer, as torchtitan keeps by default), unless the user chose a size: the hang watchdog
    reads it to name the rank that did not reach a collective. Must run before the process group
    is created."""
    if "TORCH_FR_BUFFER_SIZE" not in os.environ and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:
        os.environ["TORCH_FR_BUFFER_SIZE"] = str(entries)


def init(cfg: DistributedConfig, seed: int = 0) -> Env:
    """Join the job started by torchrun/srun (RANK, WORLD_SIZE, ...), or run as a world of one.

    Idempotent: an already initialised default group (tests, notebooks) is reused.
    """
    device_type = pick_device_type(cfg.device)
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun without torchrun
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env.get("SLURM_NTASKS", "1"))
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "RANK" not in env:  # a plain `python -m feixing train`: a world of one
        from feixing.distributed.launch import free_port

        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if device_type == "cpu":
        torch.set_num_threads(max(1, cfg.threads_per_rank))
        device = torch.device("cpu")
    else:
        device = torch.device(device_type, local_rank)
        getattr(torch, device_type).set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else _BACKENDS[device_type]
    if not dist.is_initialized():
        enable_flight_recorder()
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                device_id=device if device_type != "cpu" else None)
    seed_everything(seed)
    return Env(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
