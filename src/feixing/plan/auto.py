"""Resolve `parallel.cp_degree` (automatic context parallelism) into explicit degrees and mode."""

from __future__ import annotations

import copy
import logging
import os

from feixing.config.schema import Config
from feixing.plan.cp_cost import Cluster, Workload, choose

log = logging.getLogger("feixing")


def resolve_auto_cp(cfg: Config) -> Config:
    """A copy of cfg with cp_ulysses/cp_ring/cp_mode chosen by the cost model when cp_degree > 0.

    The choice depends only on the model's heads, KV heads and head dim, the sequence length,
    the dtype and the ranks per node, so every rank makes the same one. Explicit degrees next
    to cp_degree are a config error (reported by config.check), not silently overridden.
    """
    p = cfg.parallel
    if p.cp_degree <= 0 or p.cp_ulysses_degree != 1 or p.cp_ring_degree != 1:
        return cfg
    from feixing import models

    args = models.resolve_args(cfg.model)
    per_node = p.cp_devices_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or 8
    work = Workload(seq_len=cfg.data.seq_len, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                    head_dim=args.head_dim, dtype_bytes=2 if cfg.train.dtype == "bf16" else 4)
    u, r, mode = choose(work, Cluster(cp_degree=p.cp_degree, devices_per_node=per_node))
    out = copy.deepcopy(cfg)
    out.parallel.cp_ulysses_degree, out.parallel.cp_ring_degree, out.parallel.cp_mode = u, r, mode
    out.parallel.cp_degree = 0  # the resolved config states the layout it ran with
    log.info("parallel.cp_degree = %d (auto): cp_ulysses %d x cp_ring %d, mode %s "
             "(%d ranks per node assumed)", p.cp_degree, u, r, mode, per_node)
    return out
