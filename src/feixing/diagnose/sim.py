"""A lightweight training-like loop driven through Telemetry + faults, for tests and the evaluation harness.

The real trainer is too slow on a 2-core CPU to run hundreds of evaluation runs, so the tests
and `benchmarks/doctor_eval.py` use this loop instead. Everything in it is real work, only
small: a data wait (sleep, as a loader that is not ready), a two-layer MLP forward and
backward with autograd, a gloo all_reduce of the gradients (the exposed communication wait),
an SGD update, and every `ckpt_every` steps a torch.save of the weights into memory. It runs
the same Telemetry and fault code the trainer uses.
"""

from __future__ import annotations

import io
import os
import random
import time

import torch
import torch.distributed as dist

from feixing.config.schema import FaultConfig, TelemetryConfig
from feixing.diagnose.faults import wait
from feixing.diagnose.telemetry import Telemetry


def ab_on(i: int, block: int) -> bool:
    """Whether step i (from 0) of an A/B run has telemetry on: on, off, off, on in blocks of `block`
    steps, so that each group of four blocks cancels a drift in the machine's speed."""
    return (i // block) % 4 in (0, 3)


def run_loop(rank: int, world_size: int, run_dir: str, steps: int, faults: list[dict] | None = None,
             telemetry: dict | None = None, seed: int = 0, hidden: int = 192, batch: int = 128,
             data_s: float = 0.003, ckpt_every: int = 50, enabled: bool = True, pin: bool = False,
             ab_block: int = 0, variants: dict[str, Telemetry] | None = None) -> dict:
    """Run `steps` training-like steps; returns timing totals (and the telemetry's own cost).

    pin: bind rank r to core r % cores, as a launcher's CPU affinity would (an even, fixed
    placement; otherwise where the scheduler puts the ranks changes their speed).
    ab_block: switch telemetry on and off in blocks of this many steps (on, off, off, on, ...;
    every rank alike) and return each step's wall time and state, for a direct measurement of
    telemetry's cost in the same run. Telemetry numbers its own steps, so its canaries, probes
    and online windows come at their configured rates of the steps it sees.
    variants: {name: Telemetry} built by the caller (one process only): every group of
    len(variants) steps runs each once, in a random order; returns each step's wall time and
    variant name, to compare telemetry settings with each other in the same run."""
    torch.set_num_threads(1)
    if pin and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    cfg = TelemetryConfig(**{"enabled": enabled, **(telemetry or {})})
    fcfg = [FaultConfig(**f) for f in (faults or [])]
    tele_off = Telemetry(TelemetryConfig(enabled=False))
    tele = tele_off if variants else Telemetry(cfg, faults=fcfg, run_dir=run_dir, rank=rank, world_size=world_size)
    teles = variants or {True: tele, False: tele_off}  # ab_block: on / off
    walls, state, order, seen = [], [], [], dict.fromkeys(teles, 0)
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(hidden, 4 * hidden, generator=g) / hidden**0.5).requires_grad_()
    w2 = (torch.randn(4 * hidden, hidden, generator=g) / (4 * hidden) ** 0.5).requires_grad_()
    params = [w1, w2]
    flat = torch.zeros(sum(p.numel() for p in params))
    rng = random.Random(seed * 1000 + rank)
    xg = torch.Generator().manual_seed(seed * 1000 + rank)
    t_start = t_prev = time.perf_counter()
    for step in range(1, steps + 1):
        if variants:
            if not order:
                order = rng.sample(list(teles), len(teles))
            name = order.pop()
        else:
            name = not ab_block or ab_on(step - 1, ab_block)
        t = teles[name]
        with t.phase("data"):
            wait(data_s * (0.8 + 0.4 * rng.random()))  # sleep, then spin the last ms: wakes on time
            x = torch.randn(batch, hidden, generator=xg)
        with t.phase("forward"):
            loss = (torch.relu(x @ w1) @ w2).pow(2).mean()
        with t.phase("backward"):
            loss.backward()
        with t.phase("comm"):
            torch.cat([p.grad.reshape(-1) for p in params], out=flat)
            if world_size > 1:
                dist.all_reduce(flat)
        with t.phase("optimizer"), torch.no_grad():
            off = 0
            for p in params:
                n = p.numel()
                p -= 1e-3 / world_size * flat[off:off + n].view_as(p)
                p.grad = None
                off += n
        if ckpt_every and step % ckpt_every == 0:
            with t.phase("checkpoint"):
                torch.save({"w1": w1.detach(), "w2": w2.detach()}, io.BytesIO())
        seen[name] += 1
        t.end_step(seen[name])  # each numbers the steps it sees (a no-op where disabled)
        if ab_block or variants:
            now = time.perf_counter()
            walls.append(now - t_prev)
            state.append(name)
            t_prev = now
    wall = time.perf_counter() - t_start
    for t in teles.values():
        t.close()  # rank 0's online detection finishes the windows it has
    out = {"wall_s": wall, "steps": steps}
    if ab_block or variants:
        out["ab_walls"], out["ab_on"] = walls, state
    if variants:
        return out
    if enabled:
        out["tele_overhead"] = tele.overhead()
        out["tele_total_s"] = tele._tele_total
        out["tele_background_cpu_s"] = tele.background_cpu_s
        if tele.online is not None and tele.online.detector is not None:
            out["online_messages"] = tele.online.messages
    return out
