"""What torch's flight recorder (TORCH_FR_BUFFER_SIZE, on by default in feixing) adds per collective.

One gloo process (a world of one, so a collective is ~30 us of pure overhead and the recorder's
share shows), 5,000 all_reduces of 16 floats, best of 7 repetitions; processes with the recorder
on and off alternate (on/off, off/on, ...) and each pair gives one difference.

    PYTHONPATH=src .venv/bin/python benchmarks/flight_recorder_cost.py [--pairs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(port: str) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    t = torch.ones(16)
    for _ in range(2000):
        dist.all_reduce(t)
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(5000):
            dist.all_reduce(t)
        best = min(best, (time.perf_counter() - t0) / 5000)
    print(best * 1e6)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/flight_recorder_cost.json")
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from feixing.distributed.launch import free_port
    runs = []
    for i in range(a.pairs):
        pair = {}
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            env = {k: v for k, v in os.environ.items() if k not in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")}
            if mode == "on":
                env["TORCH_FR_BUFFER_SIZE"] = "2000"
            out = subprocess.run([sys.executable, __file__, "--child", str(free_port())], env=env,
                                 capture_output=True, text=True, check=True)
            pair[mode] = float(out.stdout.split()[-1])
        runs.append(pair)
        print(f"pair {i}: on {pair['on']:.2f} us, off {pair['off']:.2f} us per all_reduce", flush=True)
    diffs = sorted(p["on"] - p["off"] for p in runs)
    res = {"pairs": runs, "diff_us_median": statistics.median(diffs), "diff_us": diffs,
           "off_us_median": statistics.median(p["off"] for p in runs)}
    print(f"recorder on - off: median {res['diff_us_median']:+.2f} us per collective "
          f"(pairs {', '.join(f'{d:+.2f}' for d in diffs)}), collectives of {res['off_us_median']:.1f} us with the recorder off")
    with open(a.out, "w") as f:
        json.dump(dict(res, argv=sys.argv[1:]), f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
