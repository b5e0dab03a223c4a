"""Does per-rank peak memory of one attention layer (forward + backward) fall close to 1/P under context parallelism?

Run (2-core CPU, gloo):
    PYTHONPATH=src .venv/bin/python benchmarks/context_parallel_memory.py --seqs 2048 4096 8192

Each (P, mode, S) runs in fresh processes. A rank builds its shard of q, k, v (1, S/P, H, D)
fp32, runs the layer once to warm up, resets the kernel's peak-RSS mark
(/proc/self/clear_refs), runs forward+backward again and reports VmHWM minus the RSS just
before that run: the memory the layer itself needed on that rank (inputs excluded). The
baseline is P = 1 in the same run; `vs_P1` should approach 1/P. glibc is told to serve blocks
above 64 KiB from mmap so that freed memory leaves RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(rank, p, port, u, r, mode, s, cfg, q_out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=p)
    from feixing.context_parallel import ContextParallel

    cp = ContextParallel(u, r, mode=mode)
    h, hkv, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    g = torch.Generator().manual_seed(rank)
    q, k, v, do = (torch.randn(1, s // p, n, d, generator=g) for n in (h, hkv, hkv, h))

    def step():
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        cp.attention(qs, ks, vs, causal=True).backward(do)
        return qs.grad.sum().item()

    step()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    step()
    peak = _status_kb("VmHWM") - before
    t = torch.tensor([float(peak)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        q_out.put(t.item() / 1024.0)
    dist.destroy_process_group()


def _run(p, u, r, mode, s, cfg) -> float:
    ctx = mp.get_context("spawn")
    qq = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(i, p, port, u, r, mode, s, cfg, qq)) for i in range(p)]
    for pr in procs:
        pr.start()
    mb = qq.get(timeout=1800)
    for pr in procs:
        pr.join()
    return mb


def main() -> None:
    # Large blocks straight from mmap and back to the OS on free, so RSS follows live tensors
    # (otherwise glibc keeps the warm-up's freed heap resident and the peak hides in it).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/context_parallel_memory.json")
    args = ap.parse_args()
    cfg = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    layouts = [(1, 1, 1, "ring", "single"), (2, 1, 2, "ring", "ring1x2"), (2, 2, 1, "ring", "ulysses2x1"),
               (4, 1, 4, "ring", "ring1x4"), (4, 1, 4, "allgather", "allgather1x4"),
               (4, 2, 2, "ring", "hybrid2x2"), (4, 4, 1, "ring", "ulysses4x1")]
    rows = []
    for s in args.seqs:
        for p, u, r, mode, name in layouts:
            rows.append(dict(S=s, P=p, layout=name, peak_mb=_run(p, u, r, mode, s, cfg)))
    base = {row["S"]: row["peak_mb"] for row in rows if row["P"] == 1}
    print(f"{'S':>6} {'P':>2} {'layout':<13} {'peak MB/rank':>12} {'vs P=1':>7} {'1/P':>5}")
    for row in rows:
        row["vs_P1"] = row["peak_mb"] / base[row["S"]]
        print(f"{row['S']:>6} {row['P']:>2} {row['layout']:<13} {row['peak_mb']:>12.1f} "
              f"{row['vs_P1']:>7.2f} {1 / row['P']:>5.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(config=cfg, machine="2-core CPU, no GPU, gloo", rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
