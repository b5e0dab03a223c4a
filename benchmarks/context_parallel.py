"""Per-layer time and bytes of every CP layout (ulysses, ring, all-gather-KV, hybrids) on gloo/CPU, and `auto` against the best.

Run (2-core CPU, gloo; take the CPU lock, see docs/BENCHMARKS.md):
    PYTHONPATH=src .venv/bin/python benchmarks/context_parallel.py --world 4 8 --seqs 1024 2048 4096 \
        --shapes 8,2,64 8,8,64 --rounds 7

For every shape (heads, kv heads, head dim), world size P and sequence length S:

1. `auto` chooses a layout through the production code path (`feixing.plan.auto.choose_on_group`:
   constants fitted on this group, shortlist, timed tie-break), without seeing this script's table.
2. Every valid layout, plus an `auto` entry built from that choice, gets one warm-up call, then
   --rounds rounds of one forward+backward each, round-robin with the starting layout rotated
   every round (machine drift hits every layout alike). A time is the slowest rank's.
3. Per layout: median over rounds, min, max; `auto_vs_best` = auto entry's median / the best
   layout's median (goal <= 1.05); `pick_vs_best` uses the picked layout's own row instead;
   `*_paired` = the median over rounds of the same-round ratio (drift cancels); `same_layout`
   = auto entry / its own layout's row, which run the same code: a direct read of the noise.

The 1-process layer (same inputs) is timed before the workers start, as context (`vs_1proc`);
with P processes on 2 cores that ratio measures overhead, not speed-up. `--compare A.json`
prints how rankings moved between this run and an earlier one. yunchang (if installed, MHA
shapes only) runs forward-only in its one CPU configuration (see docs/parallelism.md).
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
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from feixing.distributed.launch import free_port  # noqa: E402  (after the path insert)


def layouts_for(p: int, h: int, hkv: int, s: int) -> list[tuple[str, int, int, str]]:
    """Every (name, U, R, mode) the planner may choose from (the cost model's own enumeration)."""
    from feixing.plan.cp_cost import Workload, valid_degrees

    out = []
    for u, r in valid_degrees(Workload(seq_len=s, n_heads=h, n_kv_heads=hkv), p):
        if r == 1:
            out.append((f"ulysses {u}x1", u, 1, "ring"))
        elif u == 1:
            out += [(f"ring 1x{r}", 1, r, "ring"), (f"allgather 1x{r}", 1, r, "allgather")]
        else:
            out += [(f"hybrid {u}x{r}", u, r, "ring"), (f"hybrid-ag {u}x{r}", u, r, "allgather")]
    return out


def _inputs(s, h, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, s, n, d, generator=g) for n in (h, hkv, hkv, h)]


def _slowest(*ts: float) -> list[float]:
    x = torch.tensor(ts, dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.tolist()


def _once(cp, q, k, v, do):
    """One timed forward+backward on this rank's shards: (fwd s, fwd+bwd s) of the slowest rank, out."""
    qs, ks, vs = (cp.shard(x).requires_grad_() for x in (q, k, v))
    dos = cp.shard(do)
    cp.counter.reset()
    dist.barrier()
    t0 = time.perf_counter()
    out = cp.attention(qs, ks, vs, causal=True)
    t1 = time.perf_counter()
    out.backward(dos)
    t2 = time.perf_counter()
    f, fb = _slowest(t1 - t0, t2 - t0)
    return f, fb, out


def _yunchang(rank, p, u, r, q, k, v, reps, ref_full):
    """Forward only (its CPU path has no backward), basic layout; returns (time, max err)."""
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    set_seq_parallel_pg(u, r, rank, p, use_ulysses_low=True)
    attn = LongContextAttention(ring_impl_type="basic", attn_type=AttnType.TORCH_MATH)
    loc = [x.chunk(p, dim=1)[rank].contiguous() for x in (q, k, v)]
    ts = []
    for i in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        out = attn(*loc, causal=True)
        t = _slowest(time.perf_counter() - t0)[0]
        if i:
            ts.append(t)
    parts = [torch.empty_like(out) for _ in range(p)]
    dist.all_gather(parts, out.contiguous())
    err = (torch.cat(parts, 1) - ref_full).abs().max().item()
    return statistics.median(ts), err


def _point(rank, p, shape, s, rounds, cps) -> list[dict]:
    """All layouts and auto at one (shape, P, S); rows for rank 0."""
    from feixing.context_parallel import ContextParallel
    from feixing.ops.attention import attention
    from feixing.plan.auto import choose_on_group
    from feixing.plan.cp_cost import Workload

    h, hkv, d = shape
    q, k, v, do = _inputs(s, h, hkv, d)
    ref = attention(q, k, v, causal=True, backend="cpu_flash")
    w = Workload(seq_len=s, n_heads=h, n_kv_heads=hkv, head_dim=d, dtype_bytes=4)
    dist.barrier()
    t0 = time.perf_counter()
    (au, ar, amode), rep = choose_on_group(w, None, devices_per_node=p, backend="cpu_flash")
    auto_cost = _slowest(time.perf_counter() - t0)[0]
    entries = layouts_for(p, h, hkv, s)
    entries.append(("auto", au, ar, amode))
    for _, u, r, mode in entries[:-1]:  # one object per layout, kept across sequence lengths
        if (u, r, mode) not in cps:
            cps[(u, r, mode)] = ContextParallel(u, r, mode=mode, backend="cpu_flash")
    # the auto entry gets its own object, as a user's run would
    runs = [(name, ContextParallel(u, r, mode=mode, backend="cpu_flash") if name == "auto"
             else cps[(u, r, mode)], u, r, mode) for name, u, r, mode in entries]
    rows = []
    for name, cp, u, r, mode in runs:  # warm-up, correctness and bytes
        _, _, out = _once(cp, q, k, v, do)
        err = (cp.gather(out.detach()) - ref).abs().max().item()
        rows.append(dict(shape=list(shape), P=p, S=s, mode=name, U=u, R=r, ring_mode=mode,
                         bytes_fwd=cp.counter.total("fwd"), bytes_bwd=cp.counter.total("bwd"),
                         max_err_vs_1proc=err, fwd=[], fwd_bwd=[]))
    n = len(runs)
    for k_round in range(rounds):
        for i in [(k_round + j) % n for j in range(n)]:  # rotated round-robin
            name, cp, *_ = runs[i]
            f, fb, _ = _once(cp, q, k, v, do)
            rows[i]["fwd"].append(f)
            rows[i]["fwd_bwd"].append(fb)
    for row in rows:
        row["fwd_s"] = statistics.median(row["fwd"])
        row["fwd_bwd_s"] = statistics.median(row["fwd_bwd"])
        row["min_s"], row["max_s"] = min(row["fwd_bwd"]), max(row["fwd_bwd"])
    modes = [r for r in rows if r["mode"] != "auto"]
    best = min(modes, key=lambda r: r["fwd_bwd_s"])
    auto = rows[-1]
    picked = next(r for r in modes if (r["U"], r["R"], r["ring_mode"]) == (au, ar, amode))
    model_first = tuple(rep["model"][0]["layout"])

    def paired(a, b):  # median over rounds of a's time / b's time in the same round
        return statistics.median(x / y for x, y in zip(a["fwd_bwd"], b["fwd_bwd"]))

    summary = dict(shape=list(shape), P=p, S=s, auto=picked["mode"], measured_best=best["mode"],
                   auto_vs_best=auto["fwd_bwd_s"] / best["fwd_bwd_s"],
                   pick_vs_best=picked["fwd_bwd_s"] / best["fwd_bwd_s"],
                   auto_vs_best_paired=paired(auto, best), pick_vs_best_paired=paired(picked, best),
                   # auto's entry and its layout's own row run the same code: their ratio is noise
                   same_layout=auto["fwd_bwd_s"] / picked["fwd_bwd_s"],
                   model_alone=next(r["mode"] for r in modes
                                    if (r["U"], r["R"], r["ring_mode"]) == model_first),
                   shortlist=[list(m["layout"]) for m in rep["model"]],
                   autotune_measured_s=rep.get("measured_s"),
                   autotune_ratio_to_model_pick=rep.get("ratio_to_model_pick"), auto_startup_s=auto_cost,
                   fitted_cluster=rep["cluster"])
    return rows, summary


def _worker(rank, p, port, cfg, q_out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=p)
    rows, autos, cps = [], [], {}
    for shape in cfg["shapes"]:
        for s in cfg["seqs"]:
            r, a = _point(rank, p, shape, s, cfg["rounds"], cps)
            rows += r
            autos.append(a)
            if rank == 0:
                print(f"  P={p} shape={shape} S={s}: best {a['measured_best']}, auto {a['auto']} "
                      f"auto/best {a['auto_vs_best']:.3f}", flush=True)
            h, hkv, d = shape
            if cfg["yunchang"] and hkv == h:
                from feixing.ops.attention import attention

                q, k, v, _ = _inputs(s, h, hkv, d)
                ref = attention(q, k, v, causal=True, backend="cpu_flash")
                for u, rr in ((p, 1), (p // 2, 2)):
                    try:
                        t, err = _yunchang(rank, p, u, rr, q, k, v, 3, ref)
                        rows.append(dict(shape=list(shape), P=p, S=s, mode=f"yunchang {u}x{rr}", U=u,
                                         R=rr, fwd_s=t, fwd_bwd_s=None, max_err_vs_1proc=err,
                                         note="forward only (TORCH_MATH); no CPU backward"))
                    except Exception as e:  # noqa: BLE001 - report what yunchang does, do not hide it
                        rows.append(dict(shape=list(shape), P=p, S=s, mode=f"yunchang {u}x{rr}",
                                         error=repr(e)[:200]))
    if rank == 0:
        q_out.put((rows, autos))
    dist.barrier()
    dist.destroy_process_group()


def _baseline(cfg) -> dict:
    from feixing.ops.attention import attention

    torch.set_num_threads(1)
    res = {}
    for shape in cfg["shapes"]:
        for s in cfg["seqs"]:
            q, k, v, do = _inputs(s, *shape)
            ts = []
            for i in range(4):
                qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
                t0 = time.perf_counter()
                attention(qs, ks, vs, causal=True, backend="cpu_flash").backward(do)
                if i:
                    ts.append(time.perf_counter() - t0)
            res[f"{shape}/{s}"] = statistics.median(ts)
    return res


def _compare(now: dict, path: str) -> None:
    """How stable are medians and rankings between this run and the one in `path`?"""
    old = json.load(open(path))
    key = lambda r: (tuple(r["shape"]), r["P"], r["S"], r["mode"])  # noqa: E731
    before = {key(r): r["fwd_bwd_s"] for r in old["rows"] if r.get("fwd_bwd_s")}
    print(f"stability against {path}: per point, best layout then/now, largest |now/then - 1| of a "
          "layout's median, and whether the order of layouts is the same")
    for a in now["auto"]:
        pts = [r for r in now["rows"] if (tuple(r["shape"]), r["P"], r["S"]) == (tuple(a["shape"]), a["P"], a["S"])
               and r.get("fwd_bwd_s") and r["mode"] != "auto" and key(r) in before]
        if not pts:
            continue
        then_best = min(pts, key=lambda r: before[key(r)])["mode"]
        drift = max(abs(r["fwd_bwd_s"] / before[key(r)] - 1) for r in pts)
        same = (sorted(pts, key=lambda r: r["fwd_bwd_s"]) == sorted(pts, key=lambda r: before[key(r)]))
        print(f"  {a['shape']} P={a['P']} S={a['S']}: best {then_best} / {a['measured_best']}, "
              f"max drift {drift:.1%}, same order {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, nargs="+", default=[4])
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--shapes", nargs="+", default=["8,2,64"], help="heads,kv_heads,head_dim")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--yunchang", action="store_true", help="also run yunchang (MHA shapes only)")
    ap.add_argument("--compare", default="", help="an earlier JSON of this script to compare with")
    ap.add_argument("--out", default="benchmarks/results/context_parallel.json")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    cfg = dict(seqs=args.seqs, shapes=shapes, rounds=args.rounds, yunchang=args.yunchang)
    t_start = time.time()
    base = _baseline(cfg)
    rows, autos = [], []
    ctx = mp.get_context("spawn")
    for p in args.world:
        qq = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, p, port, cfg, qq)) for r in range(p)]
        for pr in procs:
            pr.start()
        got_rows, got_auto = qq.get(timeout=3600)
        rows += got_rows
        autos += got_auto
        for pr in procs:
            pr.join()
    for row in rows:
        if row.get("fwd_bwd_s"):
            row["vs_1proc"] = row["fwd_bwd_s"] / base[f"{tuple(row['shape'])}/{row['S']}"]
    print("baseline 1 process fwd+bwd: " + ", ".join(f"{k}: {t:.3f}s" for k, t in base.items()))
    print(f"{'shape':<10} {'P':>2} {'S':>5} {'layout':<16} {'median s':>8} {'min-max s':>13} "
          f"{'fwd s':>6} {'MiB f/b':>11} {'max err':>8}")
    for r in rows:
        tag = f"{r['shape'][0]}/{r['shape'][1]}/{r['shape'][2]}"
        if "error" in r:
            print(f"{tag:<10} {r['P']:>2} {r['S']:>5} {r['mode']:<16} ERROR {r['error']}")
        elif r.get("fwd_bwd_s") is None:
            print(f"{tag:<10} {r['P']:>2} {r['S']:>5} {r['mode']:<16} {'n/a':>8} {'':>13} "
                  f"{r['fwd_s']:>6.3f} {'':>11} {r['max_err_vs_1proc']:>8.1e}")
        else:
            mib = f"{r['bytes_fwd'] / 2**20:.2f}/{r['bytes_bwd'] / 2**20:.2f}"
            print(f"{tag:<10} {r['P']:>2} {r['S']:>5} {r['mode']:<16} {r['fwd_bwd_s']:>8.3f} "
                  f"{r['min_s']:>6.3f}-{r['max_s']:<6.3f} {r['fwd_s']:>6.3f} {mib:>11} "
                  f"{r['max_err_vs_1proc']:>8.1e}")
    for a in autos:
        print(f"auto {a['shape']} P={a['P']} S={a['S']}: picks {a['auto']} (model alone: "
              f"{a['model_alone']}, {len(a['shortlist'])} timed, {a['auto_startup_s']:.1f} s), "
              f"best {a['measured_best']}; auto/best {a['auto_vs_best']:.3f} (paired "
              f"{a['auto_vs_best_paired']:.3f}), picked row/best {a['pick_vs_best']:.3f} (paired "
              f"{a['pick_vs_best_paired']:.3f}); noise: auto/own row {a['same_layout']:.3f}")
    out = dict(config=dict(cfg, shapes=[list(s) for s in shapes]), argv=sys.argv[1:],
               machine="2-core CPU, no GPU, gloo", load_avg_at_end=os.getloadavg(),
               wall_s=time.time() - t_start, baseline_1proc_s=base, auto=autos, rows=rows)
    if args.compare:
        _compare(out, args.compare)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
