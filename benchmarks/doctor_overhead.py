"""Telemetry overhead in the real trainer, amortized at given canary / probe / online intervals.

Runs `feixing train` (the demo config, 4 CPU processes: hybrid CP 2x2 + FSDP2) with telemetry
intervals short enough that every periodic item happens several times in a short run, reads
each rank's records, and amortizes the measured cost of each item at the intervals asked for
(default: the shipped defaults):

    per step = end_step's own time on plain steps (record keeping)
             + dispatch/memory canary cost / canary_interval
             + collective probe cost (less the canary) / probe_interval
             + online push cost / detect_interval
             + phase timers (measured in-process: 6 timed vs 6 empty `with`s)

and divides by the median step time (timed work only: the loop with telemetry on against off,
benchmarks/doctor_ab.py, shows the real cost is 2-3x this). Telemetry's own times exclude the wait in the barrier
that opens the probes (the ranks' arrival skew, which the next collective would absorb).

    PYTHONPATH=src .venv/bin/python benchmarks/doctor_overhead.py [--steps 60] [--nproc 4]

Prints a table and writes benchmarks/results/doctor_overhead.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]

from benchmarks.doctor_eval import phase_cost  # noqa: E402
from feixing.config.schema import TelemetryConfig  # noqa: E402

MEASURE = {"canary_interval": 10, "probe_interval": 20, "detect_interval": 10}


def costs(run_dir: str) -> dict:
    """Median cost of each telemetry item over all ranks' records."""
    plain, canary, probe, online, step = [], [], [], [], []
    for path in glob.glob(os.path.join(run_dir, "telemetry", "rank-*.jsonl")):
        recs = [json.loads(line) for line in open(path)]
        periodic = {r["step"] for r in recs if r["type"] in ("canary", "online")}
        steps = [r for r in recs if r["type"] == "step"]
        # a step record's tele_s is the cost of the previous end_step
        plain += [b["tele_s"] for a, b in zip(steps, steps[1:]) if a["step"] not in periodic and a["step"] > 2]
        step += [r["step_s"] for r in steps if r["step"] > 2]
        canary += [r["cost_s"] for r in recs if r["type"] == "canary" and "link_lat_s" not in r]
        probe += [r["cost_s"] for r in recs if r["type"] == "canary" and "link_lat_s" in r]
        online += [r["cost_s"] for r in recs if r["type"] == "online"]
    med = statistics.median
    c = med(canary)
    return {"step_s": med(step), "plain_s": med(plain), "canary_s": c, "probe_s": max(med(probe) - c, 0.0),
            "online_s": med(online), "n": {"steps": len(step), "canary": len(canary), "probe": len(probe),
                                           "online": len(online)}}


def main() -> None:
    d = TelemetryConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--canary-interval", type=int, default=d.canary_interval)
    ap.add_argument("--probe-interval", type=int, default=d.probe_interval)
    ap.add_argument("--detect-interval", type=int, default=d.detect_interval)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "doctor_overhead.json"))
    args = ap.parse_args()
    run_dir = tempfile.mkdtemp(prefix="doctor_overhead_")
    cmd = [sys.executable, "-m", "feixing", "train", "--config", os.path.join(ROOT, "configs", "demo.toml"),
           "--nproc", str(args.nproc), "--set", f"train.steps={args.steps}", "--set", f"run.dir={run_dir}",
           "--set", "checkpoint.interval=0"] + [x for k, v in MEASURE.items() for x in ("--set", f"telemetry.{k}={v}")]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    c = costs(run_dir)
    timers = phase_cost()["per_step_us"] * 1e-6
    parts = {"end_step (records)": c["plain_s"], "canary / canary_interval": c["canary_s"] / args.canary_interval,
             "probes / probe_interval": c["probe_s"] / args.probe_interval,
             "online push / detect_interval": c["online_s"] / args.detect_interval, "phase timers": timers}
    total = sum(parts.values())
    print(f"\nreal trainer, demo config, {args.nproc} processes, median step {c['step_s'] * 1e3:.0f} ms "
          f"(samples: {c['n']})")
    print(f"measured: canary {c['canary_s'] * 1e3:.2f} ms, probes {c['probe_s'] * 1e3:.2f} ms, "
          f"online push {c['online_s'] * 1e3:.2f} ms, plain end_step {c['plain_s'] * 1e6:.0f} us")
    print(f"{'item':32s} {'us per step':>12s} {'% of step':>10s}")
    for k, v in parts.items():
        print(f"{k:32s} {v * 1e6:12.1f} {v / c['step_s']:10.4%}")
    print(f"{'total':32s} {total * 1e6:12.1f} {total / c['step_s']:10.4%}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"intervals": {"canary": args.canary_interval, "probe": args.probe_interval,
                                 "detect": args.detect_interval}, "measured_with": MEASURE, "nproc": args.nproc,
                   "costs": c, "per_step_s": parts, "total_per_step_s": total, "frac": total / c["step_s"]},
                  fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
