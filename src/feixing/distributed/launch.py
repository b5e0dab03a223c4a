"""Start N local ranks through torchrun, or run as one rank of a job torchrun/srun already started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_needed(p) -> int:
    """World size a ParallelConfig fixes by itself (dp_shard_degree = -1 counts as 1)."""
    cp = p.cp_degree if p.cp_degree > 0 else p.cp_ulysses_degree * p.cp_ring_degree
    return p.dp_replicate_degree * max(1, p.dp_shard_degree) * cp * p.tp_degree


def launched() -> bool:
    """True inside a torchrun/srun job (this process is one rank of it)."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run `python -m feixing <argv>` as `nproc` local ranks via torch.distributed.run.

    CPU ranks get one OpenMP thread each (two cores shared by four ranks otherwise thrash).
    Returns torchrun's exit code; a failing rank fails the whole launch.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "feixing", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)
