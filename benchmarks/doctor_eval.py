"""Does `feixing doctor` find injected faults (right rank, layer, quickly) without false alarms, and at what cost?

Runs a training-like loop (feixing.diagnose.sim: real matmul forward/backward, a real gloo
all_reduce of the gradients, a real data-wait sleep, an in-memory torch.save checkpoint) on 4
gloo ranks through the real Telemetry + fault code, for every fault kind at several magnitudes
and onsets with 5 seeds each, plus clean runs. Each run's telemetry is diagnosed offline
(diagnose_run) and by two re-implemented baselines on the same records:

- Megatron-style: every 10 steps, the min/max rank of compute time; alarm when max/min > 1.1.
- NVRx-style: every 10 steps, per section (data, compute) score = best peer's time / own time;
  alarm when a rank's score < 0.75.

Overhead: (a) telemetry's own time in end_step + phase timers, as a fraction of the step;
(b) its real cost: runs that switch telemetry on and off in blocks of 10 steps
(benchmarks/doctor_ab.py), which comes out 2-3x (a).

    PYTHONPATH=src .venv/bin/python benchmarks/doctor_eval.py [--seeds 5] [--clean-runs 10] [--quick] [--keep DIR]
    PYTHONPATH=src .venv/bin/python benchmarks/doctor_eval.py --rediagnose DIR   # re-score kept runs

Prints a table and writes benchmarks/results/doctor_eval.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]

from feixing.diagnose.faults import EXPECTED_LAYER
from feixing.diagnose.report import diagnose, load_run
from feixing.diagnose.sim import run_loop
from tests._dist import DistPool

WORLD = 4
# Telemetry at its defaults (canaries every 50 steps, collective probes every 500, online windows
# of 50), so the detection results and the overhead below are for the same settings; only the
# hang timeout is short. Slow-link runs probe every 50 steps so that the 3-probe rule can fire
# within a short run (at the default 500 it needs 1500 steps after the onset).
TELE = {"hang_timeout_s": 2.0}
TELE_LINK = {**TELE, "probe_interval": 50}
CKPT_EVERY = 25
# issue goals: a slow rank within 20 steps of onset, a drift within 300 steps of crossing 1%
# (slow links: 3 probes at probe_interval = 50 steps; the issue sets no number)
GOAL_STEPS = {"dispatch_ramp": 300, "slow_link": 150}
AB_STEPS, AB_BLOCK = 8000, 10  # telemetry's direct cost (see benchmarks/doctor_ab.py)


def grid(seeds: int, quick: bool) -> list[dict]:
    """(kind, magnitude, onset, seed, ranks, steps) for every fault run."""
    onsets = [40, 100] if not quick else [40]
    spec = {  # kind: (magnitudes, steps after onset)
        "slow_rank": ([0.1, 0.2], 60), "slow_data": ([0.1, 0.2], 60), "gc_storm": ([0.1, 0.3], 60),
        "checkpoint_stall": ([2.0, 5.0], 60), "slow_link": ([0.1, 0.3], 200),
        "dispatch_ramp": ([0.005, 0.01], None), "hang": ([4.0], 20)}
    runs = []
    for kind, (mags, after) in spec.items():
        for mag in mags if not quick else mags[:1]:
            for onset in onsets:
                for seed in range(seeds):
                    ranks = [] if kind == "dispatch_ramp" else [(seed + onset) % WORLD]
                    if kind == "dispatch_ramp":
                        after = int(100 * 0.01 / mag) + 350  # 1% crossing + the 300-step goal + margin
                    runs.append({"kind": kind, "magnitude": mag, "onset": onset, "seed": seed,
                                 "ranks": ranks, "steps": onset + after})
    return runs


def baselines(data, onset: int | None) -> dict:
    """Megatron-style min/max and NVRx-style score<0.75 on the same records: every alarm of each.

    Both report every 10 steps with no persistence rule, as published; an alarm names a rank
    (Megatron: the max rank of compute time; NVRx: each rank whose section score is < 0.75)."""
    out = {"megatron": [], "nvrx": []}
    steps = data.steps
    for b in range(len(steps) // 10):
        sl = slice(10 * b, 10 * b + 10)
        at = int(steps[sl][-1])
        comp = np.nanmedian(data.sig["compute"][:, sl], axis=1)
        if comp.min() > 0 and comp.max() / comp.min() > 1.1:
            out["megatron"].append({"step": at, "ranks": [int(np.argmax(comp))], "layer": "compute"})
        for layer in ("data", "compute"):
            t = np.nanmedian(data.sig[layer][:, sl], axis=1)
            score = t.min() / np.maximum(t, 1e-12)
            if (score < 0.75).any():
                out["nvrx"].append({"step": at, "ranks": [int(r) for r in np.flatnonzero(score < 0.75)],
                                    "layer": layer})
    return out


def judge(run: dict, findings: list, base: dict) -> dict:
    kind, onset = run["kind"], run["onset"]
    layer = EXPECTED_LAYER[kind]
    ref = onset + int(100 * 0.01 / run["magnitude"]) if kind == "dispatch_ramp" else onset

    def right(ranks, lay):
        if lay != layer:
            return False
        return (ranks == []) if not run["ranks"] else set(run["ranks"]) <= set(ranks) and len(ranks) < WORLD

    early = [f for f in findings if (f.detected_step or 0) < onset]
    after = [f for f in findings if (f.detected_step or 0) >= onset]
    good = [f for f in after if right(f.ranks, f.layer)]
    res = {**run, "findings": [f.summary for f in findings], "found": bool(good),
           "delay": (good[0].detected_step - ref) if good else None,
           "first_right": bool(after) and right(after[0].ranks, after[0].layer),
           "wrong_after": sum(1 for f in after if not right(f.ranks, f.layer) and f.kind != "spike"),
           "wrong_spikes": sum(1 for f in after if not right(f.ranks, f.layer) and f.kind == "spike"),
           "before_onset": len([f for f in early if f.kind != "spike"]),
           "labels": sorted({f"{f.kind}/{f.layer}" for f in findings})}
    for name, alarms in base.items():
        hits = [a for a in alarms if a["step"] >= onset and right(a["ranks"], a["layer"])]
        res[name] = {"found": bool(hits), "delay": (hits[0]["step"] - ref) if hits else None,
                     "before_onset": sum(1 for a in alarms if a["step"] < onset),
                     "wrong_after": sum(1 for a in alarms if a["step"] >= onset and not right(a["ranks"], a["layer"]))}
    return res


KEEP_AWAKE = ("import os\n"
              "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
              "parent = os.getppid()\n"
              "while os.getppid() == parent:\n    pass\n")  # ends with the harness, even if it is killed


@contextlib.contextmanager
def keep_awake(on: bool):
    """One SCHED_IDLE busy loop per core while the runs go, like an HPC node with deep C-states off.

    On this VM a vCPU that idles (the loop's data-wait sleeps) comes back slower for a while:
    a process alternating 3 ms of compute with 5 ms sleeps saw its per-step CPU time move by
    up to +43% for minutes, against -3..+5.5% with these loops running
    (benchmarks/cpu_idle_noise.py). SCHED_IDLE tasks run only
    when nothing else in their scheduling group wants the core, and the ranks preempt them at
    once, so they take no time from the ranks."""
    cores = sorted(os.sched_getaffinity(0))
    procs = [subprocess.Popen(["taskset", "-c", str(c), sys.executable, "-c", KEEP_AWAKE]) for c in cores] if on else []
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def one(pool, d: str, run: dict | None, seed: int, steps: int):
    shutil.rmtree(d, ignore_errors=True)
    tele = TELE_LINK if run is not None and run["kind"] == "slow_link" else TELE
    faults = [] if run is None else [{"kind": run["kind"], "ranks": run["ranks"], "start_step": run["onset"],
                                      "magnitude": run["magnitude"]}]
    return pool.run(run_loop, d, steps, faults, tele, seed, ckpt_every=CKPT_EVERY, pin=True)


def online_replay(data, interval: int = 50) -> list[tuple[int, str]]:
    """The warnings rank 0's online detector would log: what each rank pushes every `interval`
    steps (window medians of telemetry.ONLINE_SIGNALS and per-step rows of detect.ONLINE_ROWS),
    fed to OnlineDetector from the records."""
    from feixing.diagnose.detect import ONLINE_ROWS, OnlineDetector
    from feixing.diagnose.telemetry import ONLINE_SIGNALS
    det, out = OnlineDetector(data.world_size), []
    zero = np.zeros_like(data.sig["step"])
    cpu = "cpu_forward" in data.sig
    for end in range(interval, len(data.steps) + 1, interval):
        w = slice(end - interval, end)
        m = np.stack([np.nanmedian(data.sig.get(n, zero)[:, w], axis=1) for n in ONLINE_SIGNALS], axis=1)
        rows = {r: np.stack([data.steps[w].astype(float)] + [data.sig.get(n, zero)[r, w] for n in ONLINE_ROWS[1:]],
                            axis=1) for r in range(data.world_size)}
        out += [(int(data.steps[end - 1]), msg) for msg in det.update(int(data.steps[end - 1]), m, rows, cpu)]
    return out


def online_hit(run: dict, msgs: list) -> int | None:
    """Step of the first online warning that names the fault (rank and layer, or every rank)."""
    layer = {"dispatch_ramp": "compute"}.get(run["kind"], EXPECTED_LAYER[run["kind"]])
    for step, msg in msgs:
        if step < run["onset"]:
            continue
        if run["ranks"] and msg.startswith(f"rank {run['ranks'][0]} is a straggler in {layer}"):
            return step
        if not run["ranks"] and msg.startswith(f"{layer} on every rank drifted"):
            return step
    return None


def evaluate(manifest: dict, keep: str) -> tuple[list, list, list]:
    """Diagnose every stored run (offline, so detector changes can be re-scored without re-running)."""
    results, clean, over = [], [], []
    for rec in manifest["runs"]:
        data = load_run(os.path.join(keep, rec["name"]))
        f = diagnose(data)
        if rec["run"] is None:
            b = baselines(data, None)
            clean.append({"steps": len(data.steps), "findings": [x.summary for x in f],
                          "online": [m for _, m in online_replay(data)],
                          "alarms": [x.summary for x in f if x.kind != "spike"],
                          "spikes": [f"{x.layer}: {x.summary}" for x in f if x.kind == "spike"],
                          "megatron": len(b["megatron"]), "nvrx": len(b["nvrx"])})
            over.append(_overhead(data, rec["res"]))
            print(f"{rec['name']}: {[f'{x.kind}/{x.layer}: {x.summary}' for x in f]}", flush=True)
        else:
            run = rec["run"]
            r = judge(run, f, baselines(data, run["onset"]))
            r["online_step"] = online_hit(run, online_replay(data))
            results.append(r)
            print(f"{run['kind']:16s} mag {run['magnitude']:<6g} onset {run['onset']:3d} seed {run['seed']} "
                  f"ranks {run['ranks']}: found={r['found']} delay={r['delay']} labels={r['labels']}", flush=True)
    return results, clean, over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--clean-runs", type=int, default=10)
    ap.add_argument("--clean-steps", type=int, default=1000)
    ap.add_argument("--ab-pairs", type=int, default=1, help="runs that switch telemetry on and off in "
                    f"blocks of {AB_BLOCK} steps ({AB_STEPS} steps each; benchmarks/doctor_ab.py)")
    ap.add_argument("--quick", action="store_true", help="one magnitude and onset per kind (for a smoke run)")
    ap.add_argument("--kinds", default="", help="comma-separated subset of fault kinds")
    ap.add_argument("--keep", default="", help="keep every run's telemetry in this folder (default: a temp dir)")
    ap.add_argument("--rediagnose", default="", help="re-score the runs kept in this folder; run nothing")
    ap.add_argument("--no-keep-awake", action="store_true", help="let idle cores sleep (see keep_awake)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "doctor_eval.json"))
    args = ap.parse_args()
    if args.rediagnose:
        with open(os.path.join(args.rediagnose, "manifest.json")) as fh:
            manifest = json.load(fh)
        results, clean, over = evaluate(manifest, args.rediagnose)
        finish(args.out, results, clean, over, manifest["ab"], manifest["wall_s"])
        return
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `finally`: close the worker pool
    runs = grid(args.seeds, args.quick)
    if args.kinds:
        runs = [r for r in runs if r["kind"] in args.kinds.split(",")]
    keep = args.keep or tempfile.mkdtemp(prefix="doctor_eval_")
    os.makedirs(keep, exist_ok=True)
    pool = DistPool(WORLD, timeout_s=600)
    t_start = time.time()
    manifest = {"runs": [], "ab": [], "wall_s": 0.0, "keep_awake": not args.no_keep_awake}
    with keep_awake(not args.no_keep_awake):
        try:
            todo = [(f"clean{i}", None, 1000 + i, args.clean_steps) for i in range(args.clean_runs)]
            todo += [(f"{r['kind']}-{r['magnitude']}-{r['onset']}-{r['seed']}", r, r["seed"], r["steps"])
                     for r in runs]
            for name, run, seed, steps in todo:
                res = one(pool, os.path.join(keep, name), run, seed, steps)
                manifest["runs"].append({"name": name, "run": run, "res": res})
                print(f"ran {name}", flush=True)
            if args.ab_pairs:  # telemetry's cost: on/off in blocks of 10 steps inside each run
                from benchmarks.doctor_ab import ab_run
                for i in range(args.ab_pairs):
                    manifest["ab"].append(ab_run(pool, os.path.join(keep, f"ab{i}"), AB_STEPS, AB_BLOCK, i))
                    print(f"ran ab{i}", flush=True)
        finally:
            pool.close()
            manifest["wall_s"] = time.time() - t_start
            with open(os.path.join(keep, "manifest.json"), "w") as fh:
                json.dump(manifest, fh)
    results, clean, over = evaluate(manifest, keep)
    finish(args.out, results, clean, over, manifest["ab"], manifest["wall_s"])
    if not args.keep:
        shutil.rmtree(keep, ignore_errors=True)


def phase_cost(n: int = 20000) -> dict:
    """Phase-timer cost in this process: 6 timed phases vs 6 empty `with`s per step (end_step's own
    time is in the records' tele_s, so it is not counted here)."""
    from feixing.config.schema import TelemetryConfig
    from feixing.diagnose.telemetry import Telemetry

    phases = ("data", "forward", "backward", "comm", "optimizer", "checkpoint")
    d = tempfile.mkdtemp(prefix="doctor_cost_")
    tele = Telemetry(TelemetryConfig(canary_interval=0, probe_interval=0, online_detect=False,
                                     hang_timeout_s=600), run_dir=d)
    null = contextlib.nullcontext()
    best_on = best_off = float("inf")
    for _ in range(3):  # best of 3: the machine is shared
        t0 = time.perf_counter()
        for _s in range(n):
            for p in phases:
                with tele.phase(p):
                    pass
        best_on = min(best_on, (time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        for _s in range(n):
            for _p in phases:
                with null:
                    pass
        best_off = min(best_off, (time.perf_counter() - t0) / n)
    tele.close()
    shutil.rmtree(d, ignore_errors=True)
    return {"per_step_us": (best_on - best_off) * 1e6, "phases": len(phases)}


def finish(out, results, clean, over, ab, wall) -> None:
    hot = phase_cost()
    for o in over:
        o["frac"] = (o["tele_per_step_s"] + hot["per_step_us"] * 1e-6) / o["step_s"]
    summary = summarize(results, clean, over, ab, wall)
    summary["hot_path"] = hot
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"summary": summary, "runs": results, "clean": clean, "telemetry": TELE,
                   "machine": "2-core CPU shared with other users, no GPU", "world_size": WORLD}, fh, indent=1)
    print_table(summary)
    print(f"\nwrote {out}")


def _overhead(data, res) -> dict:
    """Telemetry's own time per step from the records (end_step: canaries, probes, online push,
    record keeping; `frac` adds the phase timers' cost in finish())."""
    step = float(np.nanmean(data.sig["step"]))
    tele = float(np.mean([r["tele_total_s"] / r["steps"] for r in res]))
    return {"step_s": step, "tele_per_step_s": tele}


def summarize(results, clean, over, ab, wall) -> dict:
    by = {}
    for r in results:
        by.setdefault((r["kind"], r["magnitude"]), []).append(r)
    rows = []
    for (kind, mag), rs in by.items():
        d = [r["delay"] for r in rs if r["delay"] is not None]
        row = {"kind": kind, "magnitude": mag, "runs": len(rs), "found": sum(r["found"] for r in rs),
               "first_right": sum(r["first_right"] for r in rs),
               "delay_median": statistics.median(d) if d else None, "delay_max": max(d) if d else None,
               "goal_steps": GOAL_STEPS.get(kind, 20),
               "within_goal": sum(1 for x in d if x <= GOAL_STEPS.get(kind, 20)),
               "wrong_findings": sum(r["wrong_after"] for r in rs), "wrong_spikes": sum(r["wrong_spikes"] for r in rs),
               "before_onset": sum(r["before_onset"] for r in rs),
               "online_found": sum(r["online_step"] is not None for r in rs)}
        for b in ("megatron", "nvrx"):
            bd = [r[b]["delay"] for r in rs if r[b]["found"]]
            row[b] = {"found": sum(r[b]["found"] for r in rs), "delay_median": statistics.median(bd) if bd else None,
                      "before_onset": sum(r[b]["before_onset"] for r in rs),
                      "wrong_after": sum(r[b]["wrong_after"] for r in rs)}
        rows.append(row)
    clean_steps = sum(c["steps"] for c in clean)
    fa = sum(len(c["alarms"]) for c in clean)  # straggler, drift, hang
    spikes = sum(len(c["spikes"]) for c in clean)  # event spikes labelled with their cause
    return {"rows": rows, "clean_steps": clean_steps, "false_alarms": fa,
            "false_alarms_per_10k": fa / clean_steps * 1e4 if clean_steps else None,
            "clean_spike_findings": spikes,
            "online_clean_warnings_per_10k": sum(len(c["online"]) for c in clean) / max(clean_steps, 1) * 1e4,
            "megatron_clean_alarms_per_10k": sum(c["megatron"] for c in clean) / max(clean_steps, 1) * 1e4,
            "nvrx_clean_alarms_per_10k": sum(c["nvrx"] for c in clean) / max(clean_steps, 1) * 1e4,
            "clean_runs": len(clean),
            "overhead_internal": statistics.median([o["frac"] for o in over]) if over else None,
            "tele_per_step_ms": statistics.median([o["tele_per_step_s"] for o in over]) * 1e3 if over else None,
            "step_ms": statistics.median([o["step_s"] for o in over]) * 1e3 if over else None,
            # older manifests hold whole-run wall ratios (floats), newer ones doctor_ab summaries
            "overhead_ab": ab, "overhead_ab_mean": statistics.mean(a["frac"] if isinstance(a, dict) else a
                                                               for a in ab) if ab else None,
            "harness_wall_s": wall}


def print_table(s: dict) -> None:
    print(f"\n{'fault':17s} {'mag':>6s} {'runs':>4s} {'found':>5s} {'in goal':>7s} {'1st ok':>6s} "
          f"{'delay med/max':>13s} "
          f"{'wrong':>5s} {'early':>5s} | {'megatron found/delay':>20s} | {'nvrx found/delay':>16s}")
    for r in s["rows"]:
        dm = f"{r['delay_median']}/{r['delay_max']}" if r["delay_median"] is not None else "-"
        mg, nv = r["megatron"], r["nvrx"]
        print(f"{r['kind']:17s} {r['magnitude']:6g} {r['runs']:4d} {r['found']:5d} {r['within_goal']:7d} "
              f"{r['first_right']:6d} {dm:>13s} "
              f"{r['wrong_findings']:5d} {r['before_onset']:5d} | {mg['found']:>9d} / {mg['delay_median']!s:>8s} | "
              f"{nv['found']:>7d} / {nv['delay_median']!s:>6s}")
    hits = ", ".join(f"{r['kind']} {r['magnitude']:g}: {r['online_found']}/{r['runs']}" for r in s["rows"])
    print(f"online (rank 0's warnings, replayed from the records): {s['online_clean_warnings_per_10k']:.1f} "
          f"warnings per 10,000 clean steps; runs with a warning naming the fault: {hits}")
    if not s["clean_runs"]:  # false alarms and overhead come from the clean runs
        print("no clean runs: no false-alarm rate or timed overhead")
    else:
        print(f"\nclean: {s['false_alarms']} false alarms (straggler/drift/hang) in {s['clean_steps']} steps = "
              f"{s['false_alarms_per_10k']:.2f} per 10,000 steps; {s['clean_spike_findings']} event-spike findings "
              f"(checkpoint/gc/data, labelled); baselines on the same clean runs: "
              f"megatron {s['megatron_clean_alarms_per_10k']:.0f}, "
              f"nvrx {s['nvrx_clean_alarms_per_10k']:.0f} alarms per 10,000 steps")
        print(f"timed overhead (the real cost is 2-3x this: benchmarks/doctor_ab.py): end_step's own time "
              f"{s['tele_per_step_ms']:.3f} ms + phase timers "
              f"{s['hot_path']['per_step_us'] / 1e3:.3f} ms per {s['step_ms']:.1f} ms step = "
              f"{s['overhead_internal']:.2%} (settings {TELE})")
    for a in s["overhead_ab"]:
        if isinstance(a, dict):
            print(f"direct cost, telemetry on/off in blocks of {AB_BLOCK} steps (defaults): {a['diff_us']:+.0f} us "
                  f"per {a['step_off_ms']:.1f} ms step = {a['frac']:+.2%} (95% CI {a['ci95_frac'][0]:+.2%} .. "
                  f"{a['ci95_frac'][1]:+.2%})")
    print(f"harness wall time (running the loops) {s['harness_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
