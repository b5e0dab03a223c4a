"""How long does gathering the state take at each save? (the loop waits for it)

`Manager._capture` collects every tensor to save and, for each DTensor, the shard's global
offset. torch computes that offset anew on every call (~0.3 ms per DTensor on the 2-core VM);
feixing computes it once per (shape, mesh, placements) and keeps it (`load._shard_box`). This
script times `_capture` of an FSDP2 Llama with AdamW state on one process, the cache on and off
in alternate calls, and prints the medians.

    PYTHONPATH=src .venv/bin/python benchmarks/checkpoint_capture.py [--flavor demo] [--calls 41]
    PYTHONPATH=src .venv/bin/python benchmarks/checkpoint_capture.py --flavor 1b --meta

Writes benchmarks/results/checkpoint_capture.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from feixing import config, models  # noqa: E402
from feixing.checkpoint import Manager, load  # noqa: E402
from feixing.config.schema import CheckpointConfig  # noqa: E402
from feixing.distributed.launch import free_port  # noqa: E402
from feixing.distributed.mesh import ParallelDims  # noqa: E402
from feixing.models.llama.parallelize import parallelize  # noqa: E402
from feixing.train.optim import build_optimizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="demo")
    ap.add_argument("--calls", type=int, default=41, help="calls of each kind, alternating")
    ap.add_argument("--meta", action="store_true", help="tensors without data (the 1B's state fits nowhere here)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "checkpoint_capture.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    cfg = config.load(os.path.join(ROOT, "configs", "demo.toml"),
                      [f"model.flavor={a.flavor}", "parallel.cp_ulysses_degree=1", "parallel.cp_ring_degree=1"])
    model = models.build(cfg.model, vocab_size=256)
    dims = ParallelDims.from_config(cfg.parallel, 1)
    parallelize(model, dims, dims.build_mesh("cpu"), cfg.parallel, "fp32")
    if not a.meta:
        model.to_empty(device="cpu")
        model.init_weights(0)
    opt = build_optimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the AdamW state that a save gathers
    app = {"model": model, "optimizer": opt, "loader": {"pos": 0}}
    ck = Manager(CheckpointConfig(interval=10**9), "/tmp/feixing-capture-bench", 0, 1)
    cached, uncached = load._shard_box, load._shard_box.__wrapped__
    times = {"cached": [], "uncached": []}
    n = 0
    for i in range(2 * a.calls + 2):
        kind = "cached" if i % 2 else "uncached"
        load._shard_box = cached if kind == "cached" else uncached
        t0 = time.perf_counter()
        _, sources = ck._capture(app, 1)
        dt = time.perf_counter() - t0
        n = len(sources)
        if i >= 2:  # the first of each kind warms up (and fills the cache)
            times[kind].append(dt)
    load._shard_box = cached
    ck.close()
    res = {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)} for k, v in times.items()}
    print(f"{a.flavor}: {n} tensors; gathering the state: {res['uncached']['median_ms']:.1f} ms without the "
          f"offset cache, {res['cached']['median_ms']:.1f} ms with it (medians of {a.calls} calls each)")
    with open(a.out, "w") as fh:
        json.dump({"flavor": a.flavor, "meta": a.meta, "tensors": n, "calls": a.calls, **res, "torch": torch.__version__,
                   "loadavg": os.getloadavg()}, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
