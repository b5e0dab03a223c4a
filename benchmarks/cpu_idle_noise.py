"""Why the doctor harness keeps idle cores busy: per-step CPU time with and without keep-awake loops.

One process alternates a fixed MLP forward/backward (~3 ms of CPU) with a 5 ms sleep, as the
evaluation loop's ranks alternate compute with data waits, and records the CPU time of each
compute step. It reports the 10th percentile of each block of 25 steps relative to their
median: how far the machine's own speed moves. Run once alone and once next to
doctor_eval.keep_awake's SCHED_IDLE busy loops (one per core).

    PYTHONPATH=src .venv/bin/python benchmarks/cpu_idle_noise.py [--steps 600]

Prints both series and writes benchmarks/results/cpu_idle_noise.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]

from benchmarks.doctor_eval import keep_awake  # noqa: E402


def series(steps: int) -> np.ndarray:
    """Block q10 of per-step compute CPU time, relative to the median block (first 50 steps skipped)."""
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(192, 768, generator=g) / 14).requires_grad_()
    w2 = (torch.randn(768, 192, generator=g) / 28).requires_grad_()
    ts = []
    for _ in range(steps):
        x = torch.randn(128, 192, generator=g)
        c0 = time.process_time()
        (torch.relu(x @ w1) @ w2).pow(2).mean().backward()
        w1.grad = w2.grad = None
        ts.append(time.process_time() - c0)
        time.sleep(0.005)
    t = np.array(ts[50:])
    q = np.array([np.percentile(t[25 * i: 25 * i + 25], 10) for i in range(len(t) // 25)])
    return q / np.median(q) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_idle_noise.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for awake in (False, True):
        with keep_awake(awake):
            z = series(a.steps)
        name = "keep_awake" if awake else "alone"
        out[name] = {"block_q10_rel": z.tolist(), "min": float(z.min()), "max": float(z.max())}
        print(f"{name:10s} block q10 vs median: {z.min():+.1%} .. {z.max():+.1%}  "
              + " ".join(f"{v * 100:+.0f}" for v in z))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(dict(out, steps=a.steps, cpus=os.cpu_count()), fh, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
