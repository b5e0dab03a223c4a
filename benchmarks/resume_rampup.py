"""Do the first steps after a resume run at steady-state speed? (with and without the warm-up pass)

For each setting: train the demo (or `--config`/`--nproc`/`--data`: e.g. the 1B model on one GPU)
for 30 steps with a checkpoint at step 20, resume to step 50,
then compare the mean step time of the first 10 steps after the resume (21-30) with steady
state (steps 41-50 of the same resumed process). `--runs N` repeats each setting and reports the
median and the range of the ratios. Prints a table, writes benchmarks/results/resume_rampup.json.
`--compile` turns torch.compile on and resumes once with the compile cache the first process
left in the run dir (`kept`, what feixing does) and once with it deleted (`cleared`: a resume on
a node that does not have it); it also reports how long the resumed process took to start its
first step (its warm-up pass, where compilation happens) and in all. Run from the repository root:

    PYTHONPATH=src python benchmarks/resume_rampup.py --runs 3 --warmup-pass on
    PYTHONPATH=src python benchmarks/resume_rampup.py --warmup-pass on --compile --out benchmarks/results/resume_compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(a, run: Path, steps: int, warmup: bool, resume: str, interval: int = 20, compile_: bool = False) -> dict:
    """Run the CLI; returns its wall time and rank 0's warm-up pass time (None without one)."""
    cmd = [sys.executable, "-m", "feixing", "train", "--config", a.config, "--nproc", str(a.nproc),
           "--set", f"run.dir={run}", "--set", f"data.path={a.data}", "--set", f"train.steps={steps}",
           "--set", "metrics.log_interval=1", "--set", f"checkpoint.interval={interval}",
           "--set", f"train.warmup_pass={str(warmup).lower()}", "--set", f"parallel.compile={str(compile_).lower()}",
           "--resume", resume]
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    warm = re.findall(r"warm-up pass \(.*?\): ([0-9.]+) s", out.stdout + out.stderr)
    return {"wall_s": time.perf_counter() - t0, "warmup_s": float(warm[0]) if warm else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="repetitions of each setting")
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--data", default=str(ROOT / "data" / "demo"))
    ap.add_argument("--resumed-interval", type=int, default=20,
                    help="checkpoint interval of the resumed process (0: no save overlaps steps 41-50)")
    ap.add_argument("--warmup-pass", choices=("both", "on", "off"), default="both")
    ap.add_argument("--compile", action="store_true", help="torch.compile on; resume with the compile "
                    "cache kept with the run and with it cleared")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "resume_rampup.json"))
    a = ap.parse_args()
    if not (Path(a.data) / "meta.json").is_file():
        raise SystemExit("run `make prepare-demo` first")
    caches = ("kept", "cleared") if a.compile else ("",)
    settings = [(w, c) for w in {"both": (False, True), "on": (True,), "off": (False,)}[a.warmup_pass]
                for c in caches]
    rows = []
    for warmup, cache in [s for s in settings for _ in range(a.runs)]:
        run = Path(tempfile.mkdtemp(prefix="rampup-"))
        first_run = _train(a, run, 30, warmup, "none", compile_=a.compile)
        shutil.rmtree(run / "checkpoints" / "step-00000030", ignore_errors=True)  # resume at 20
        if cache == "cleared":
            shutil.rmtree(run / "compile_cache")
        resumed_run = _train(a, run, 50, warmup, "auto", a.resumed_interval, a.compile)
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        resumed = [r for r in recs[30:]]  # records written by the resumed process
        first = [r["step_time_s"] for r in resumed if 21 <= r["step"] <= 30]
        steady = [r["step_time_s"] for r in resumed if 41 <= r["step"] <= 50]
        first_step = resumed[0]["step_time_s"]
        rows.append({"warmup_pass": warmup, "compile_cache": cache, "loadavg": os.getloadavg(),
                     "first_process": first_run, "resumed_process": resumed_run, "first_step_s": first_step,
                     "first10_mean_s": sum(first) / len(first), "steady_mean_s": sum(steady) / len(steady),
                     "first_step_ratio": first_step / (sum(steady) / len(steady)),
                     "first10_ratio": sum(first) / len(first) / (sum(steady) / len(steady))})
        shutil.rmtree(run, ignore_errors=True)
    print(f"{'warm-up pass':<13} {'compile cache':<13} {'1st step s':>10} {'steps 21-30 s':>13} "
          f"{'steps 41-50 s':>13} {'1st/steady':>10} {'21-30/steady':>12} {'resumed: warm-up s':>18} {'in all s':>8}")
    for r in rows:
        w = r["resumed_process"]["warmup_s"]
        print(f"{str(r['warmup_pass']):<13} {r['compile_cache'] or '-':<13} {r['first_step_s']:>10.3f} "
              f"{r['first10_mean_s']:>13.3f} {r['steady_mean_s']:>13.3f} {r['first_step_ratio']:>10.2f} "
              f"{r['first10_ratio']:>12.2f} {w if w is not None else float('nan'):>18.2f} "
              f"{r['resumed_process']['wall_s']:>8.1f}")
    summary = []
    for warmup, cache in settings:
        mine = [r for r in rows if r["warmup_pass"] == warmup and r["compile_cache"] == cache]
        row = {"warmup_pass": warmup, "compile_cache": cache, "runs": len(mine)}
        for key in ("first_step_ratio", "first10_ratio"):
            vals = [r[key] for r in mine]
            row[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        summary.append(row)
        print(f"warm-up pass {warmup}{', compile cache ' + cache if cache else ''}: {len(mine)} runs; 1st/steady median "
              f"{row['first_step_ratio']['median']:.2f} (range {row['first_step_ratio']['min']:.2f}-"
              f"{row['first_step_ratio']['max']:.2f}), 21-30/steady median "
              f"{row['first10_ratio']['median']:.2f} (range {row['first10_ratio']['min']:.2f}-"
              f"{row['first10_ratio']['max']:.2f})")
    Path(a.out).write_text(json.dumps({"machine": os.uname().nodename, "argv": sys.argv[1:],
                                       "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
