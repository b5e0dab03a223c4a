"""Telemetry's cost measured directly: the same loop with telemetry switched on and off in short blocks.

The other overhead figures add up telemetry's own timed work (`tele_s`, phase timers measured
in a tight loop). That misses what those timers cannot see: right after a step's matmuls the
caches are cold, and the same Python and syscalls cost several times more than in a tight loop
(a CPU-time clock read ~10 us instead of 0.3). Here the evaluation loop
(`feixing.diagnose.sim`) runs with telemetry at its defaults switched on and off, on/off/off/on
(ABBA) in blocks of `--block` steps, every rank alike; each group of four blocks gives one
difference (mean step with telemetry - without), and alternating quickly cancels this VM's
drifts in speed, which last seconds to minutes. Telemetry numbers its own steps, so its
canaries, probes and online windows come at their default rates of the steps it sees.

- `--world 1` (default): one process, no data wait (its sleep is the noisiest part), blocks of
  one step: the cost on one rank, to within ~+-20 us.
- `--world 4`: the harness itself (4 gloo ranks on 2 cores, data waits, ~20 ms steps, blocks
  of 10): the cost as the harness's goal reads it, with a much wider interval.
- `--variants`: one rank as with `--world 1`, but telemetry off, at its defaults, and with one
  part left out at a time (the CPU-time clock of the compute phases, the read of
  /proc/self/schedstat, the canaries) or all three, each step one of them in a random order per
  group: what each part costs, and what the phase timers and step records alone cost.

    PYTHONPATH=src .venv/bin/python benchmarks/doctor_ab.py [--world 1|4] [--variants] [--steps N] [--runs 2]

Prints a table and writes benchmarks/results/doctor_ab_world{1,4}.json (doctor_ab_variants.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]

from benchmarks.doctor_eval import CKPT_EVERY, WORLD, keep_awake, phase_cost  # noqa: E402
from feixing.diagnose.sim import run_loop  # noqa: E402
from tests._dist import DistPool  # noqa: E402

AB_WARMUP = 400  # steps left out at the start (the first canaries, cold caches)
VARIANTS = ("off", "defaults", "no CPU-time clock", "no schedstat read", "no canaries",
            "timers and records only")


def quads(walls: list[float], on: list[bool], block: int) -> np.ndarray:
    """Mean step with telemetry minus without, one value per on/off/off/on group of blocks."""
    g = 4 * block
    n = len(walls) // g * g
    w, o = np.asarray(walls[:n]).reshape(-1, g), np.asarray(on[:n]).reshape(-1, g)
    return np.where(o, w, 0).sum(1) / o.sum(1) - np.where(o, 0, w).sum(1) / (~o).sum(1)


def boot_ci(d: np.ndarray, rng) -> tuple[float, float]:
    """Bootstrap 95% interval of the mean of `d`."""
    lo, hi = np.percentile(rng.choice(d, size=(2000, len(d))).mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def summarize(res: dict, block: int, seed: int, warmup: int) -> dict:
    """Rank 0's step walls after `warmup` steps (the all_reduce makes every rank wait for the
    slowest, so they include the other ranks' telemetry too); bootstrap 95% interval of the mean
    difference."""
    g = 4 * block
    skip = -(-warmup // g) * g
    walls, on = res["ab_walls"][skip:], res["ab_on"][skip:]
    d = quads(walls, on, block)
    w, o = np.asarray(walls), np.asarray(on)
    off_mean = float(w[~o].mean())
    lo, hi = boot_ci(d, np.random.default_rng(seed))
    return {"steps": len(walls), "groups": len(d), "step_off_ms": off_mean * 1e3, "step_sd_ms": float(w.std()) * 1e3,
            "step_on_ms": float(w[o].mean()) * 1e3,
            "diff_us": float(d.mean()) * 1e6, "ci95_us": [lo * 1e6, hi * 1e6],
            "frac": float(d.mean()) / off_mean, "ci95_frac": [lo / off_mean, hi / off_mean],
            "group_diff_median_us": float(np.median(d)) * 1e6,
            "tele_self_per_on_step_us": res["tele_total_s"] / max(sum(res["ab_on"]), 1) * 1e6,
            # telemetry's threads run through on and off steps alike, so the difference above
            # leaves them out: their CPU time per step of the whole run, rank 0 (the detector's)
            "background_cpu_per_step_us": res.get("tele_background_cpu_s", 0.0) / len(res["ab_walls"]) * 1e6}


def ab_run(pool, run_dir: str, steps: int, block: int, seed: int, warmup: int = AB_WARMUP) -> dict:
    """One A/B run: in this process without data waits (pool None), or on the pool's ranks."""
    if pool is None:
        res = run_loop(0, 1, run_dir, steps, None, {}, 3000 + seed, data_s=0.0, ckpt_every=CKPT_EVERY,
                       pin=True, ab_block=block)
    else:
        res = pool.run(run_loop, run_dir, steps, None, {}, 3000 + seed, ckpt_every=CKPT_EVERY, pin=True,
                       ab_block=block)[0]
    return summarize(res, block, seed, warmup)


def make_variants(run_dir: str) -> dict:
    """The Telemetry objects of VARIANTS (call after torch.set_num_threads(1): the CPU-time clock
    is chosen by the thread count). The parts are switched off on the object, before its first
    phase, the way a build without them would run."""
    import torch

    from feixing.config.schema import TelemetryConfig
    from feixing.diagnose.telemetry import Telemetry

    torch.set_num_threads(1)
    out = {}
    for name in VARIANTS:
        if name == "off":
            out[name] = Telemetry(TelemetryConfig(enabled=False))
            continue
        bare = name == "timers and records only"
        quiet = {"canary_interval": 0, "probe_interval": 0} if bare or name == "no canaries" else {}
        t = Telemetry(TelemetryConfig(**quiet), run_dir=os.path.join(run_dir, str(len(out))), rank=0, world_size=1)
        if bare or name == "no CPU-time clock":
            t._cpu_clock = None
        if (bare or name == "no schedstat read") and t._sched_fd is not None:
            os.close(t._sched_fd)
            t._sched_fd = None
        out[name] = t
    return out


def variants_run(run_dir: str, steps: int, seed: int, warmup: int = AB_WARMUP) -> dict:
    """One run of every variant interleaved: per group of len(VARIANTS) steps, each variant's step
    minus the off step (and minus the defaults step), mean with a bootstrap 95% interval."""
    res = run_loop(0, 1, run_dir, steps, None, {}, 3000 + seed, data_s=0.0, ckpt_every=CKPT_EVERY,
                   pin=True, variants=make_variants(run_dir))
    k = len(VARIANTS)
    skip = -(-warmup // k) * k
    n = (len(res["ab_walls"]) - skip) // k * k
    w = np.asarray(res["ab_walls"][skip:skip + n]).reshape(-1, k)
    names = np.asarray(res["ab_on"][skip:skip + n]).reshape(-1, k)
    by = {v: w[names == v] for v in VARIANTS}  # one value per group, groups in order
    rng = np.random.default_rng(seed)

    def ci(d):
        return [x * 1e6 for x in boot_ci(d, rng)]

    out = {"groups": int(w.shape[0]), "step_off_ms": float(by["off"].mean()) * 1e3, "variants": {}}
    for v in VARIANTS[1:]:
        d, s = by[v] - by["off"], by["defaults"] - by[v]
        out["variants"][v] = {"vs_off_us": float(d.mean()) * 1e6, "vs_off_ci95_us": ci(d),
                              "saved_vs_defaults_us": float(s.mean()) * 1e6, "saved_ci95_us": ci(s)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=1, choices=(1, WORLD))
    ap.add_argument("--variants", action="store_true", help="one rank: each part of telemetry left out in turn")
    ap.add_argument("--steps", type=int, default=0, help="steps per run, half with telemetry "
                    "(default 16000 for --world 1, 8000 for --world 4)")
    ap.add_argument("--block", type=int, default=0, help="default 1 for --world 1, 10 for --world 4")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=AB_WARMUP, help="first steps left out (first canaries, caches)")
    ap.add_argument("--out", default="", help="default benchmarks/results/doctor_ab_world{N}.json")
    args = ap.parse_args()
    if args.variants:
        return main_variants(args)
    one = args.world == 1
    args.steps = args.steps or (16000 if one else 8000)
    args.block = args.block or (1 if one else 10)
    if args.steps % (4 * args.block):
        ap.error("--steps must be a multiple of 4 * --block")
    pool = None if one else DistPool(WORLD, timeout_s=3600)
    runs = []
    t0 = time.time()
    try:
        with keep_awake(True):
            for i in range(args.runs):
                runs.append(ab_run(pool, tempfile.mkdtemp(prefix="doctor_ab_"), args.steps, args.block, i,
                                   args.warmup))
                print(f"ran run {i}", flush=True)
    finally:
        if pool is not None:
            pool.close()
    timers = phase_cost()
    print(f"\n{'run':>4s} {'step off (ms)':>14s} {'on - off (us)':>14s} {'share':>8s} {'95% CI':>18s} "
          f"{'timed end_step (us)':>20s} {'threads CPU (us/step)':>22s}")
    for i, r in enumerate(runs):
        print(f"{i:4d} {r['step_off_ms']:14.2f} {r['diff_us']:+14.0f} {r['frac']:+8.2%} "
              f"{r['ci95_frac'][0]:+8.2%}..{r['ci95_frac'][1]:+.2%} {r['tele_self_per_on_step_us']:20.0f} "
              f"{r['background_cpu_per_step_us']:22.1f}")
    print(f"phase timers in a tight loop: {timers['per_step_us']:.1f} us per step ({timers['phases']} phases)")
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", f"doctor_ab_world{args.world}.json")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"runs": runs, "block": args.block, "world_size": args.world, "telemetry": "defaults",
                   "ckpt_every": CKPT_EVERY, "phase_timers": timers, "wall_s": time.time() - t0,
                   "mean_frac": statistics.mean(r["frac"] for r in runs),
                   "machine": "2-core CPU VM, no GPU"}, fh, indent=1)
    print(f"wrote {args.out}")


def main_variants(args) -> None:
    steps = args.steps or 6 * 4000
    runs, t0 = [], time.time()
    with keep_awake(True):
        for i in range(args.runs):
            runs.append(variants_run(tempfile.mkdtemp(prefix="doctor_variants_"), steps, i, args.warmup))
            print(f"ran run {i}", flush=True)
    print(f"\n{'variant':24s} " + " ".join(f"{'run ' + str(i) + ': vs off (us)':>30s} {'saved vs defaults':>22s}"
                                          for i in range(len(runs))))
    for v in VARIANTS[1:]:
        cells = []
        for r in runs:
            x = r["variants"][v]
            cells.append(f"{x['vs_off_us']:+8.0f} ({x['vs_off_ci95_us'][0]:+.0f}..{x['vs_off_ci95_us'][1]:+.0f})"
                         f"{'':>8s} {x['saved_vs_defaults_us']:+7.0f} ({x['saved_ci95_us'][0]:+.0f}..{x['saved_ci95_us'][1]:+.0f})")
        print(f"{v:24s} " + " ".join(cells))
    print("step without telemetry: " + ", ".join(f"{r['step_off_ms']:.2f} ms" for r in runs))
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "doctor_ab_variants.json")
    with open(out, "w") as fh:
        json.dump({"runs": runs, "steps": steps, "variants": VARIANTS, "wall_s": time.time() - t0,
                   "machine": "2-core CPU VM, no GPU"}, fh, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
