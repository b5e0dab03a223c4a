"""What rank 0's online detector and the offline straggler rule cost, with numpy's nanmedian and with the detectors' own.

Rank 0's online detection runs in a thread of the training process: its CPU time comes off the
core it shares with training, and while it runs Python it holds the GIL. This times, on
synthetic telemetry (4 ranks, windows of 50 steps, the detector keeps 200), one
`OnlineDetector.update` per window and one offline `find_stragglers` over a 1,000-step run,
first with `detect.nanmedian` replaced by numpy's `np.nanmedian` (what the detectors used
before: numpy takes a masked-array path for small arrays) and then with the detectors' own
sort-based one; both give the same values (tests/unit/test_doctor_detect.py). Median of the
repeats, same process, same inputs.

    PYTHONPATH=src .venv/bin/python benchmarks/doctor_detector_cost.py   # -> benchmarks/results/doctor_detector_cost.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "src")]

from feixing.diagnose import detect  # noqa: E402
from feixing.diagnose.telemetry import ONLINE_SIGNALS  # noqa: E402

WORLD, WINDOW, WINDOWS, OFFLINE_STEPS = 4, 50, 30, 1000


def numpy_nanmedian(a, axis=-1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)


def online_ms(seed: int) -> list[float]:
    """CPU ms of each OnlineDetector.update after the first (warm-up) window."""
    rng = np.random.default_rng(seed)
    det, out = detect.OnlineDetector(WORLD), []
    for k in range(1, WINDOWS + 1):
        step = k * WINDOW
        rows = {r: np.column_stack([np.arange(step - WINDOW + 1, step + 1),
                                    0.02 * (1 + 0.05 * rng.random((WINDOW, len(detect.ONLINE_ROWS) - 1)))])
                for r in range(WORLD)}
        m = 0.02 * (1 + 0.05 * rng.random((WORLD, len(ONLINE_SIGNALS))))
        c0 = time.thread_time()
        det.update(step, m, rows, True)
        if k > 1:
            out.append((time.thread_time() - c0) * 1e3)
    return out


def offline_ms(seed: int, repeats: int = 5) -> list[float]:
    rng = np.random.default_rng(seed)
    steps = np.arange(1, OFFLINE_STEPS + 1)
    sig = {n: 0.02 * (1 + 0.05 * rng.random((WORLD, OFFLINE_STEPS))) for n in detect.ONLINE_ROWS[1:]}
    out = []
    for _ in range(repeats):
        c0 = time.thread_time()
        detect.find_stragglers(steps, sig, 1, True)
        out.append((time.thread_time() - c0) * 1e3)
    return out


def main() -> None:
    ours = detect.nanmedian
    res = {}
    for name, fn in (("np.nanmedian", numpy_nanmedian), ("detect.nanmedian", ours),
                     ("np.nanmedian (again)", numpy_nanmedian)):
        detect.nanmedian = fn
        res[name] = {"online_update_ms": statistics.median(online_ms(0)),
                     "offline_find_stragglers_ms": statistics.median(offline_ms(1))}
    detect.nanmedian = ours
    print(f"{'nanmedian':22s} {'online update per window (ms)':>30s} {'offline, 1,000 steps (ms)':>27s}")
    for name, r in res.items():
        print(f"{name:22s} {r['online_update_ms']:30.2f} {r['offline_find_stragglers_ms']:27.1f}")
    per_step = {k: v["online_update_ms"] * 1e3 / WINDOW for k, v in res.items()}
    print("rank 0's detector thread, CPU per training step (windows of 50): "
          + ", ".join(f"{k} {v:.0f} us" for k, v in per_step.items()))
    out = os.path.join(ROOT, "benchmarks", "results", "doctor_detector_cost.json")
    with open(out, "w") as fh:
        json.dump({"world": WORLD, "window": WINDOW, "windows": WINDOWS, "offline_steps": OFFLINE_STEPS,
                   "results": res, "detector_cpu_per_step_us": per_step, "machine": "2-core CPU VM, no GPU"},
                  fh, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
