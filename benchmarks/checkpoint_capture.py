"""How long does gathering the state take at each save? (the loop waits for it)

A save's capture (`feixing.checkpoint.capture`) names every tensor to save through torch's
`get_state_dict` and finds each DTensor shard's global offset. Three ways, in turn, on an FSDP2
Llama with AdamW state on one process:

- `full_uncached`: in full, torch computing each shard's offset anew (~0.3 ms per DTensor here);
- `full`: in full, offsets kept per (shape, mesh, placements) (`load._shard_box`);
- `cached`: what every save after the first does: the remembered capture, checked against a
  fingerprint of the live state, with the parameter groups and non-model state re-read.

It also times building the staging layout from the tensor list (`stage.Layout`), which
`Stager.prepare` skips when a save's tensor list equals the previous one's.

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
from feixing.checkpoint.stage import Layout  # noqa: E402
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
    cached_box, uncached_box = load._shard_box, load._shard_box.__wrapped__
    cap = ck.capture
    cap(app, 1)  # the first capture, done in full and remembered
    kinds = ("full_uncached", "full", "cached")
    times = {k: [] for k in kinds}
    n = 0
    for i in range(len(kinds) * (a.calls + 1)):
        kind = kinds[i % len(kinds)]
        load._shard_box = uncached_box if kind == "full_uncached" else cached_box
        t0 = time.perf_counter()
        _, sources = cap(app, 1) if kind == "cached" else cap._full(app, 1, None, remember=False)
        dt = time.perf_counter() - t0
        n = len(sources)
        if i >= len(kinds):  # the first of each kind warms up (and fills the offset cache)
            times[kind].append(dt)
    load._shard_box = cached_box
    assert cap.cached >= a.calls, "the cached kind did not use the cache"
    ck.close()
    items = [(k, t.dtype, tuple(t.shape)) for k, t in sources.items()]
    for _ in range(a.calls):
        t0 = time.perf_counter()
        Layout(items)
        times.setdefault("layout", []).append(time.perf_counter() - t0)
    res = {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)} for k, v in times.items()}
    print(f"{a.flavor}: {n} tensors; gathering the state (medians of {a.calls} calls each): "
          + ", ".join(f"{k} {res[k]['median_ms']:.2f} ms" for k in kinds)
          + f"; cached / full = {res['cached']['median_ms'] / res['full']['median_ms']:.3f}; "
          f"building the staging layout {res['layout']['median_ms']:.2f} ms (skipped when the tensors are the same)")
    with open(a.out, "w") as fh:
        json.dump({"flavor": a.flavor, "meta": a.meta, "tensors": n, "calls": a.calls, **res, "torch": torch.__version__,
                   "loadavg": os.getloadavg()}, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
