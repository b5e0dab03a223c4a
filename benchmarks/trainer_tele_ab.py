"""Telemetry's cost in the real trainer, measured directly: telemetry on and off in alternate steps of one run.

`benchmarks/doctor_ab.py` does this for the evaluation loop (20 ms steps); this script does it
for `feixing train` itself: the demo config on 4 CPU processes (hybrid CP 2x2 + FSDP2), every
rank alike. Each rank's trainer gets a stand-in for `Telemetry` that holds one enabled instance
(the config's telemetry, defaults unless `--set telemetry...` says otherwise) and one disabled
one and hands the trainer either, on/off/off/on (ABBA) in blocks of `--block` steps. Telemetry
numbers the steps it sees, so its canaries, probes and online windows come at their configured
rates of the steps it is on for. Rank 0 records each step's wall time (from one `end_step` to
the next: the whole loop, metrics and telemetry's own work included); each group of four blocks
gives one difference (mean step with telemetry - without), and the 95% interval is a bootstrap
over the groups. The same is done for each rank's training-thread CPU time per step, which
waiting for other ranks does not blur; telemetry's own threads (watchdog, rank 0's online
detector) run through on and off steps alike, so their CPU time is reported separately. The
first `--warmup` steps are left out. Checkpoints are off (they are not telemetry). As in the
harness, one SCHED_IDLE busy loop per core keeps idle cores from sleeping.

    PYTHONPATH=src .venv/bin/python benchmarks/trainer_tele_ab.py [--steps 1200] [--block 1] [--set K=V ...]
    python3 benchmarks/trainer_tele_ab.py --config configs/gpu_1b.toml --nproc 1 --steps 160 --no-keep-awake  # one GPU
    PYTHONPATH=src .venv/bin/python benchmarks/trainer_tele_ab.py --from-walls /tmp/trainer_tele_ab_*.walls.json --out ...

Prints a line per run and writes benchmarks/results/trainer_tele_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]

from feixing.diagnose.sim import ab_on  # noqa: E402


class ABTelemetry:
    """What the trainer sees as `Telemetry`: on or off by block, the same on every rank."""

    def __init__(self, cfg, block: int, out: str, **kw):
        from feixing.config.schema import TelemetryConfig
        from feixing.diagnose.telemetry import Telemetry

        self.on = Telemetry(cfg, **kw)
        self.off = Telemetry(TelemetryConfig(enabled=False))
        self.block, self.out, self.rank = block, out, kw.get("rank", 0)
        self.n, self.seen, self.walls, self.cpus, self.states = 0, 0, [], [], []
        self.cur = self.on
        self.t_prev, self.c_prev = time.perf_counter(), time.thread_time()

    def phase(self, name: str):
        return self.cur.phase(name)

    def end_step(self, step: int) -> None:
        is_on = self.cur is self.on
        if is_on:
            self.seen += 1
            self.on.end_step(self.seen)
        now, cpu = time.perf_counter(), time.thread_time()
        self.walls.append(now - self.t_prev)
        self.cpus.append(cpu - self.c_prev)
        self.states.append(is_on)
        self.t_prev, self.c_prev = now, cpu
        self.n += 1
        self.cur = self.on if ab_on(self.n, self.block) else self.off

    def close(self) -> None:
        self.on.close()
        self.off.close()
        with open(f"{self.out}.{self.rank}", "w") as fh:
            json.dump({"ab_walls": self.walls, "ab_cpus": self.cpus, "ab_on": self.states,
                       "tele_total_s": self.on._tele_total, "tele_background_cpu_s": self.on.background_cpu_s}, fh)


def worker(args) -> None:
    """One rank under torchrun: the trainer with ABTelemetry in place of Telemetry."""
    import feixing.diagnose
    from feixing import config
    from feixing.train.trainer import train

    def make(cfg, **kw):
        return ABTelemetry(cfg, args.block, args.walls, **kw)

    feixing.diagnose.Telemetry = make  # the trainer imports it from here when it starts
    train(config.load(args.config, args.set), resume="none")


def summarize_run(walls: str, nproc: int, block: int, seed: int, warmup: int) -> dict:
    """Wall time from rank 0's steps (every rank waits for the slowest), and the CPU time of each
    rank's training thread, which waiting for the other ranks does not blur."""
    from benchmarks.doctor_ab import summarize

    ranks = []
    for rank in range(nproc):
        with open(f"{walls}.{rank}") as fh:
            ranks.append(json.load(fh))
    r = summarize(ranks[0], block, seed, warmup)
    r["walls"] = walls
    r["cpu"] = [summarize({**x, "ab_walls": x["ab_cpus"]}, block, seed, warmup) for x in ranks]
    # the ranks' mean: their noise is only partly shared, so its interval is narrower
    mean_cpu = [sum(c) / len(c) for c in zip(*(x["ab_cpus"] for x in ranks))]
    r["cpu_mean_of_ranks"] = summarize({**ranks[0], "ab_walls": mean_cpu}, block, seed, warmup)
    return r


def report(i: int, r: dict) -> None:
    print(f"run {i}: step off {r['step_off_ms']:.1f} ms; wall on - off {r['diff_us']:+.0f} us "
          f"({r['frac']:+.3%}, 95% interval {r['ci95_frac'][0]:+.3%} .. {r['ci95_frac'][1]:+.3%}); "
          f"telemetry's timed work {r['tele_self_per_on_step_us']:.0f} us per on step", flush=True)
    for rank, c in enumerate(r["cpu"]):
        print(f"  rank {rank}: training thread CPU {c['step_off_ms']:.1f} ms per step off, on - off "
              f"{c['diff_us']:+.0f} us (95% interval {c['ci95_us'][0]:+.0f} .. {c['ci95_us'][1]:+.0f}) = "
              f"{c['diff_us'] / 1e3 / r['step_off_ms']:+.3%} of the step; telemetry's threads "
              f"{c['background_cpu_per_step_us']:.0f} us per step", flush=True)
    c = r["cpu_mean_of_ranks"]
    print(f"  mean of the ranks: on - off {c['diff_us']:+.0f} us (95% interval {c['ci95_us'][0]:+.0f} .. "
          f"{c['ci95_us'][1]:+.0f}) = {c['diff_us'] / 1e3 / r['step_off_ms']:+.3%} of the step "
          f"(upper bound {c['ci95_us'][1] / 1e3 / r['step_off_ms']:+.3%})", flush=True)


def one_run(args, i: int) -> dict:
    """One training run under torchrun with ABTelemetry; its summary."""
    run_dir = os.path.join("/tmp", f"trainer_tele_ab_{os.getpid()}_{i}")
    walls = run_dir + ".walls.json"
    sets = args.set + [f"train.steps={args.steps}", f"run.dir={run_dir}", "checkpoint.interval=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           os.path.abspath(__file__), "--worker", "--config", args.config, "--block", str(args.block),
           "--walls", walls] + [x for s in sets for x in ("--set", s)]
    print("running:", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + ROOT, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return summarize_run(walls, args.nproc, args.block, i, args.warmup)


def machine() -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} CPUs{gpu}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.toml"))
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--block", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=40, help="first steps left out")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--from-walls", nargs="+", default=[], metavar="PREFIX",
                    help="summarize stored runs (their per-rank PREFIX.N files) instead of running")
    ap.add_argument("--no-keep-awake", action="store_true", help="let idle cores sleep (doctor_eval.keep_awake)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "trainer_tele_ab.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--walls", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.steps % (4 * args.block):
        ap.error("--steps must be a multiple of 4 * --block")
    from benchmarks.doctor_eval import keep_awake

    runs, t0 = [], time.time()
    if args.from_walls:
        for i, walls in enumerate(args.from_walls):
            runs.append(summarize_run(walls, args.nproc, args.block, i, args.warmup))
            report(i, runs[-1])
    else:
        with keep_awake(not args.no_keep_awake):
            for i in range(args.runs):
                runs.append(one_run(args, i))
                report(i, runs[-1])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"runs": runs, "steps": args.steps, "block": args.block, "nproc": args.nproc,
                   "config": os.path.relpath(args.config, ROOT), "set": args.set, "wall_s": time.time() - t0,
                   "machine": machine()}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
