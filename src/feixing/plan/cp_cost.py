"""Cost model of one attention layer (fwd + bwd) under context parallelism; `auto` picks (U, R, mode).

The model (written out in docs/parallelism.md):

* compute: causal attention costs 4 S^2 H d / 2 FLOPs forward and 2.5x that backward, split
  evenly over P ranks (zigzag balance). Kernels on small blocks run below peak:
  efficiency = n / (n + n_half) for a block of n query tokens (n_half ~ a few hundred).
* Ulysses: two all-to-alls forward and two backward, each moving
  (S/P)(2H + 2 max(Hkv, U)) d (U-1)/U bytes-per-element per rank; not overlapped with compute;
  over intra-node links when the U ranks share a node, otherwise the inter-node link.
* ring: R-1 steps, each overlapping the transfer of one KV slice 2 (S/R) max(Hkv,U)/U d
  with the compute of the previous block: step time = max(compute, o * transfer) +
  (1 - o) * transfer + latency, o = `overlap` (1 on accelerators, 0 for gloo on CPU).
  Backward also returns dK/dV in fp32. Links: intra-node if all P ranks share a node.
* all-gather KV: one all-gather forward and backward, one reduce-scatter (fp32) backward,
  not overlapped.

Everything is per layer and per rank; absolute numbers are as good as the bandwidth and FLOP
figures given, the ranking is what `choose` uses. plan/measure.py fits the constants (link
speeds, step latency, kernel rate and its small-block fall-off, overlap) on the real group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Workload:
    seq_len: int
    n_heads: int
    n_kv_heads: int
    head_dim: int = 128
    batch: int = 1
    dtype_bytes: int = 2
    causal: bool = True


@dataclass
class Cluster:
    cp_degree: int
    devices_per_node: int = 8
    intra_gbps: float = 150.0  # GB/s per device for all-to-all / p2p inside a node (e.g. NVLink, HCCS)
    inter_gbps: float = 25.0  # GB/s per device across nodes (e.g. 200 Gb/s IB/RoCE NIC)
    tflops: float = 400.0  # attention kernel TFLOP/s at large blocks (bf16)
    n_half: int = 512  # query tokens per block at which the kernel reaches half of `tflops`
    latency_s: float = 20e-6  # per collective / per ring step
    overlap: float = 1.0  # share of a ring transfer that hides behind compute (1: DMA/NIC
    # engines copy while the cores compute; 0: the copy competes for the same cores, e.g. gloo on CPU)
    ulysses_gbps: float = 0.0  # measured all-to-all GB/s on the real group (plan/measure.py); 0 = from placement
    ring_gbps: float = 0.0  # measured p2p shift GB/s on the real group; 0 = from placement


def valid_degrees(w: Workload, p: int) -> list[tuple[int, int]]:
    """(U, R) with U * R = p that the head rules allow (H % U == 0; Hkv % U == 0 or U % Hkv == 0)."""
    out = []
    for u in range(1, p + 1):
        if p % u or w.n_heads % u:
            continue
        if (w.n_kv_heads >= u and w.n_kv_heads % u) or (w.n_kv_heads < u and u % w.n_kv_heads):
            continue
        if w.seq_len % (2 * p):
            continue
        out.append((u, p // u))
    return out


def _eff(n_tokens: float, n_half: int) -> float:
    return n_tokens / (n_tokens + n_half)


def layer_time(w: Workload, c: Cluster, u: int, r: int, mode: str = "ring") -> dict:
    """Modelled seconds for one layer's attention forward + backward on one rank, with parts."""
    p = u * r
    S, H, d, B, eb = w.seq_len, w.n_heads, w.head_dim, w.batch, w.dtype_bytes
    kvh = max(w.n_kv_heads, u)
    gb = 1e9
    flops_fwd = 4 * B * S * S * H * d * (0.5 if w.causal else 1.0)
    # every kernel call is one (query chunk, key chunk) pair of S/(2R) tokens (R = 1: two halves)
    blk = S / (2 * r)
    rate = c.tflops * 1e12 * _eff(blk, c.n_half)
    comp_fwd = flops_fwd / p / rate
    comp_bwd = 2.5 * comp_fwd
    intra_u = u <= c.devices_per_node  # Ulysses groups are consecutive ranks
    bw_u = (c.ulysses_gbps or (c.intra_gbps if intra_u else c.inter_gbps)) * gb
    bw_r = (c.ring_gbps or (c.intra_gbps if p <= c.devices_per_node else c.inter_gbps)) * gb
    a2a_bytes = B * (S / p) * (2 * H + 2 * kvh) * d * (u - 1) / u * eb
    t_a2a = 0.0 if u == 1 else 2 * (a2a_bytes / bw_u + c.latency_s)  # fwd + bwd
    kv_bytes = B * 2 * (S / r) * kvh / u * d * eb
    t_ring = 0.0
    if r > 1 and mode == "ring":
        step_f, step_b = comp_fwd / r, comp_bwd / r
        xfer_f = kv_bytes / bw_r + c.latency_s
        xfer_b = kv_bytes * (1 + 4 / eb) / bw_r + c.latency_s  # KV again + fp32 dK/dV
        o = c.overlap
        fwd = step_f + (r - 1) * (max(step_f, o * xfer_f) + (1 - o) * xfer_f)
        bwd = step_b + (r - 1) * (max(step_b, o * xfer_b) + (1 - o) * xfer_b)
        comm_exposed = fwd + bwd - comp_fwd - comp_bwd
        t_ring = comm_exposed
    elif r > 1:  # all-gather KV: gather fwd, gather + reduce-scatter (fp32) bwd, not overlapped
        t_ring = (2 * (r - 1) * kv_bytes + (r - 1) * kv_bytes * 4 / eb) / bw_r + 3 * c.latency_s
    total = comp_fwd + comp_bwd + t_a2a + t_ring
    return dict(U=u, R=r, mode=mode, total_s=total, compute_s=comp_fwd + comp_bwd,
                ulysses_comm_s=t_a2a, ring_comm_exposed_s=t_ring,
                bytes_per_rank=2 * a2a_bytes * 2 + (r - 1) * kv_bytes * (2 + 4 / eb))


def candidates(w: Workload, c: Cluster, modes=("ring", "allgather")) -> list[dict]:
    """Every valid (U, R, mode) with its modelled time, fastest first."""
    rows = []
    for u, r in valid_degrees(w, c.cp_degree):
        for m in modes if r > 1 else ("ring",):
            rows.append(layer_time(w, c, u, r, m))
    if not rows:
        raise ValueError(
            f"no (ulysses, ring) split of cp degree {c.cp_degree} fits heads={w.n_heads}, "
            f"kv_heads={w.n_kv_heads}, seq_len={w.seq_len} (needs seq_len % (2 * cp) == 0)")
    return sorted(rows, key=lambda row: row["total_s"])


def choose(w: Workload, c: Cluster, modes=("ring", "allgather")) -> tuple[int, int, str]:
    """`auto`: the (ulysses_degree, ring_degree, mode) with the smallest modelled time."""
    best = candidates(w, c, modes)[0]
    return best["U"], best["R"], best["mode"]


def shortlist(w: Workload, c: Cluster, margin: float, modes=("ring", "allgather")) -> list[dict]:
    """The candidates whose modelled time is within (1 + margin) x the best one, fastest first."""
    rows = candidates(w, c, modes)
    return [r for r in rows if r["total_s"] <= (1.0 + margin) * rows[0]["total_s"]]


def describe(w: Workload, c: Cluster) -> dict:
    """Inputs and the ranked candidates, for logs and benchmark JSON."""
    return dict(workload=asdict(w), cluster=asdict(c), candidates=candidates(w, c))
