"""Automatic context parallelism: resolve `parallel.cp_degree` into (U, R, mode), from the cost model or measured.

Two levels, both documented in docs/parallelism.md ("Cost model and auto"):

* `resolve_auto_cp(cfg)` (no communication): the cost model with its default constants.
  Used by `config.check` and wherever no process group exists.
* `resolve_auto_cp(cfg, measure=True)` with `parallel.cp_autotune` (the trainer's call):
  `choose_on_group` fits the model's constants on the real CP group (plan/measure.py), takes
  the layouts whose modelled time is within `AUTOTUNE_MARGIN` of the best, times each one's
  attention fwd + bwd at the real shape for a few round-robin rounds, and replaces the model's
  choice by the fastest only if that one is faster by AUTOTUNE_MIN_GAIN (paired by round). The
  timings are slowest-rank values reduced over the world, and rank 0's pick is broadcast, so
  every rank runs the same layout.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics

import torch
import torch.distributed as dist

from feixing.config.schema import Config
from feixing.plan.cp_cost import Cluster, Workload, choose, shortlist

log = logging.getLogger("feixing")

AUTOTUNE_MARGIN = 1.0  # time every layout modelled within 2x of the best: the fitted model
# misranks layouts by more than that only rarely (docs/BENCHMARKS.md), and each timing costs
# only a few attention calls, once per run
AUTOTUNE_REPS = 5  # timed rounds per layout (after one warm-up), median of the slowest rank;
# single timings on the shared 2-core CPU vary by tens of percent (docs/BENCHMARKS.md)
AUTOTUNE_MIN_GAIN = 0.05  # a measured layout must beat the model's choice by 5% (paired
# median) to replace it: differences below that are within the goal anyway, and on a noisy
# host a smaller edge is more often noise than a real gain


def choose_on_group(w: Workload, group=None, devices_per_node: int = 8, autotune: bool = True,
                    backend: str = "auto", device=None, margin: float = AUTOTUNE_MARGIN,
                    reps: int = AUTOTUNE_REPS) -> tuple[tuple[int, int, str], dict]:
    """(U, R, mode) for `w` on `group`, and a report (constants, shortlist, timings).

    Collective over the whole world: every rank calls it with the same arguments; `group` is
    this rank's CP group (None = the world). Without `autotune` only the fitted model decides.
    """
    from feixing.plan.measure import calibrate, time_layouts

    cluster, raw = calibrate(w, group, devices_per_node, backend, device)
    short = shortlist(w, cluster, margin if autotune else 0.0)
    layouts = [(r["U"], r["R"], r["mode"]) for r in short]
    report = dict(cluster=vars(cluster), raw=raw,
                  model=[dict(layout=x, model_s=r["total_s"]) for x, r in zip(layouts, short)])
    if autotune and len(layouts) > 1:
        times = time_layouts(w, layouts, group, backend, device, reps)
        # paired by round against the model's choice (drift cancels): a layout replaces it
        # only when its median per-round time ratio shows a gain of at least AUTOTUNE_MIN_GAIN
        ratios = [statistics.median(a / b for a, b in zip(t, times[0])) for t in times]
        best = min(range(len(layouts)), key=lambda i: (ratios[i], i))
        pick = best if ratios[best] < 1.0 - AUTOTUNE_MIN_GAIN else 0
        report["measured_s"] = [statistics.median(t) for t in times]
        report["rounds_s"], report["ratio_to_model_pick"] = times, ratios
    else:
        pick = 0
    idx = torch.tensor([pick], dtype=torch.int64, device=device)  # NCCL/HCCL: device tensors
    dist.broadcast(idx, src=0)  # identical already (world-reduced timings); this makes it certain
    choice = layouts[int(idx.item())]
    report["choice"] = choice
    return choice, report


def _cp_group(p: int):
    """This rank's CP group: P consecutive ranks (CP axes are the mesh's innermost, tp = 1)."""
    world = dist.get_world_size()
    if world == p:
        return None
    mine = None
    for start in range(0, world, p):  # every rank creates every group, in the same order
        g = dist.new_group(list(range(start, start + p)))
        mine = g if start <= dist.get_rank() < start + p else mine
    return mine


def resolve_auto_cp(cfg: Config, measure: bool = False, device=None) -> Config:
    """A copy of cfg with cp_ulysses/cp_ring/cp_mode chosen automatically when cp_degree > 0.

    measure=False: the cost model with default constants; depends only on the model's heads,
    KV heads and head dim, the sequence length, the dtype and the ranks per node, so every
    rank makes the same choice. measure=True (and parallel.cp_autotune, process group up):
    `choose_on_group` on `device`, collective over the world. Explicit degrees next to cp_degree are a
    config error (reported by config.check), not silently overridden.
    """
    p = cfg.parallel
    if p.cp_degree <= 0 or p.cp_ulysses_degree != 1 or p.cp_ring_degree != 1:
        return cfg
    from feixing import models
    from feixing.distributed.mesh import ParallelDims

    args = models.resolve_args(cfg.model)
    per_node = p.cp_devices_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or 8
    work = Workload(seq_len=cfg.data.seq_len, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                    head_dim=args.head_dim, dtype_bytes=2 if cfg.train.dtype == "bf16" else 4)
    how = "cost model, default constants"
    if measure and p.cp_autotune and dist.is_available() and dist.is_initialized():
        ring_only = copy.copy(p)  # any split of cp_degree gives the same data-parallel degree
        ring_only.cp_degree, ring_only.cp_ring_degree = 0, p.cp_degree
        dp = ParallelDims.from_config(ring_only, dist.get_world_size()).dp
        work.batch = max(1, cfg.data.batch_size // (dp * max(1, cfg.data.grad_accum_steps)))
        group = _cp_group(p.cp_degree)
        (u, r, mode), rep = choose_on_group(work, group, per_node,
                                            backend=cfg.model.attention_backend, device=device)
        if group is not None:  # only for measuring: the trainer's mesh builds its own CP groups
            dist.destroy_process_group(group)
        how = f"measured on the group, {len(rep['model'])} layouts timed"
    else:
        u, r, mode = choose(work, Cluster(cp_degree=p.cp_degree, devices_per_node=per_node))
    out = copy.deepcopy(cfg)
    out.parallel.cp_ulysses_degree, out.parallel.cp_ring_degree, out.parallel.cp_mode = u, r, mode
    out.parallel.cp_degree = 0  # the resolved config states the layout it ran with
    log.info("parallel.cp_degree = %d (auto, %s): cp_ulysses %d x cp_ring %d, mode %s "
             "(%d ranks per node assumed)", p.cp_degree, how, u, r, mode, per_node)
    return out

