"""Modelled at cluster scale (64 devices, 8 per node, 128K-1M tokens, Llama-3 8B/70B GQA):
which CP layout is fastest, and by how much does the hybrid beat the best pure mode?

Run:
    PYTHONPATH=src .venv/bin/python benchmarks/context_parallel_model.py

Modelled, not measured: feixing.plan.cp_cost with the link and kernel figures printed in the
header (assumptions stated in docs/parallelism.md). The baseline is the best pure mode
(Ulysses only, ring only, or all-gather only) for the same workload and links.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from feixing.plan.cp_cost import Cluster, Workload, candidates, choose

SHAPES = {"llama3-8b": (32, 8, 128), "llama3-70b": (64, 8, 128)}
LINKS = {  # name: (intra-node GB/s per device, inter-node GB/s per device)
    "nvlink+400G": (150.0, 50.0),
    "nvlink+200G": (150.0, 25.0),
    "pcie+100G": (25.0, 12.5),
}
SEQS = [131072, 262144, 524288, 1048576]


def main() -> None:
    rows = []
    for shape, (h, hkv, d) in SHAPES.items():
        for link, (intra, inter) in LINKS.items():
            for s in SEQS:
                w = Workload(seq_len=s, n_heads=h, n_kv_heads=hkv, head_dim=d)
                c = Cluster(cp_degree=64, devices_per_node=8, intra_gbps=intra, inter_gbps=inter)
                cand = candidates(w, c)
                pure = [x for x in cand if x["U"] == 1 or x["R"] == 1]
                hyb = [x for x in cand if x["U"] > 1 and x["R"] > 1]
                best_pure, best_hyb = pure[0], hyb[0]
                u, r, m = choose(w, c)
                rows.append(dict(shape=shape, link=link, S=s, best_pure=f"{best_pure['U']}x{best_pure['R']} {best_pure['mode']}",
                                 best_pure_ms=best_pure["total_s"] * 1e3,
                                 best_hybrid=f"{best_hyb['U']}x{best_hyb['R']} {best_hyb['mode']}",
                                 best_hybrid_ms=best_hyb["total_s"] * 1e3,
                                 hybrid_gain=best_pure["total_s"] / best_hyb["total_s"] - 1,
                                 auto=f"{u}x{r} {m}",
                                 compute_ms=best_hyb["compute_s"] * 1e3,
                                 ulysses_only_ms=next((x["total_s"] * 1e3 for x in pure if x["R"] == 1), None),
                                 ring_only_ms=next((x["total_s"] * 1e3 for x in pure if x["U"] == 1 and x["mode"] == "ring"), None)))
    c0 = Cluster(cp_degree=64)
    print(f"model: 64 devices, 8/node, kernel {c0.tflops} TFLOP/s at large blocks (half at "
          f"{c0.n_half} query tokens), {c0.latency_s * 1e6:.0f} us per step; bf16; one layer fwd+bwd")
    print(f"{'shape':<11} {'links':<12} {'S':>8} {'best pure':<16} {'ms':>8} {'best hybrid':<16} {'ms':>8} {'gain':>6} {'auto':<14}")
    for x in rows:
        print(f"{x['shape']:<11} {x['link']:<12} {x['S']:>8} {x['best_pure']:<16} {x['best_pure_ms']:>8.1f} "
              f"{x['best_hybrid']:<16} {x['best_hybrid_ms']:>8.1f} {x['hybrid_gain']:>6.1%} {x['auto']:<14}")
    out = "benchmarks/results/context_parallel_model.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(links_gbps=LINKS, shapes=SHAPES, rows=rows), f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
