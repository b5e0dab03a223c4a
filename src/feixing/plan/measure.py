"""Measure on the real process group: fit the cost model's machine constants, and time shortlisted layouts.

Both functions are collective: every rank of the default (world) group must call them with
the same arguments, in the same order. Each timing is the slowest rank's (an all-reduce MAX
over the *world*), so every rank sees bit-identical numbers and therefore makes the same
choice, even when several CP groups (data-parallel replicas) measure at the same time.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from feixing.plan.cp_cost import Cluster, Workload

_DTYPES = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def _slowest(seconds: float, device) -> float:
    """The largest value over all ranks of the world (identical on every rank afterwards).
    On `device` because NCCL/HCCL reduce only device tensors; fp32 is precise enough here."""
    x = torch.tensor([seconds], dtype=torch.float32, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x.item())


def _sync(device) -> None:
    """Wait for queued kernels, so a timer measures work rather than launches (no-op on CPU)."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def _timed(fn, group, device) -> float:
    dist.barrier(group=group)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return _slowest(time.perf_counter() - t0, device)


def _median_time(fn, group, reps: int, device) -> float:
    fn()  # warm-up: allocator, first-call costs
    return statistics.median(_timed(fn, group, device) for _ in range(reps))


def _shift(group, send, recv, rank: int, n: int):
    """Post one ring shift (send to rank+1, receive from rank-1) on `group`; returns the requests."""
    ops = [dist.P2POp(dist.isend, send, group=group, group_peer=(rank + 1) % n),
           dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % n)]
    return dist.batch_isend_irecv(ops)


def calibrate(w: Workload, group=None, devices_per_node: int = 8, backend: str = "auto",
              device=None, reps: int = 3) -> tuple[Cluster, dict]:
    """A Cluster whose constants were measured on `group` at this workload's sizes, and the raw numbers.

    * all-to-all GB/s: one `all_to_all_single` of the per-rank Ulysses buffer of U = P, and
      when the group spans nodes one among node peers only (zero splits to other nodes);
    * p2p GB/s and per-step latency: a ring shift of one rank's KV slice, and of 4 bytes;
    * kernel rate and small-block fall-off: fwd + bwd of an unmasked block at the two block
      sizes the layouts use (S/2P tokens x H heads, S/2 tokens x H/P heads), with all ranks
      computing at once (so cores shared between ranks count), fitted to rate * n / (n + n_half);
    * overlap: the same shift posted before the small block's kernel and waited after it,
      o = (t_kernel + t_shift - t_both) / min(t_kernel, t_shift), clamped to [0, 1].
    """
    from feixing.ops.attention import MaskSpec, block_backward, block_forward, resolve_backend

    group = group if group is not None else dist.group.WORLD
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = _DTYPES[w.dtype_bytes]
    device = torch.device(device) if device is not None else torch.device("cpu")
    kernel = resolve_backend(backend, device)
    S, H, d, B = w.seq_len, w.n_heads, w.head_dim, w.batch
    eb = w.dtype_bytes
    a2a_n = B * (S // p) * (2 * H + 2 * max(w.n_kv_heads, p)) * d
    a2a = torch.randn(-(-a2a_n // p) * p, device=device).to(dtype)
    a2a_out = torch.empty_like(a2a)
    kv = torch.randn(B * 2 * (S // p) * w.n_kv_heads * d, device=device).to(dtype)
    kv_in = torch.empty_like(kv)
    tiny, tiny_in = torch.zeros(1, device=device), torch.zeros(1, device=device)

    def wait(reqs):
        for r in reqs:
            r.wait()

    t_a2a = _median_time(lambda: dist.all_to_all_single(a2a_out, a2a, group=group), group, reps, device)
    n = devices_per_node
    spans_nodes = p > n and p % n == 0
    if spans_nodes:  # Ulysses groups stay inside a node: time an all-to-all among node peers only
        chunk = a2a.numel() // p
        splits = [chunk if i // n == rank // n else 0 for i in range(p)]
        node_in, node_out = a2a[:chunk * n].contiguous(), torch.empty_like(a2a[:chunk * n])
        t_node = _median_time(lambda: dist.all_to_all_single(
            node_out, node_in, output_split_sizes=splits, input_split_sizes=splits, group=group),
            group, reps, device)
    t_lat = _median_time(lambda: wait(_shift(group, tiny, tiny_in, rank, p)), group, reps + 2, device)
    t_p2p = _median_time(lambda: wait(_shift(group, kv, kv_in, rank, p)), group, reps, device)

    def block(n, h):
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (torch.randn(B, n, h, d, generator=g).to(device, dtype) for _ in range(4))
        scale, full = d ** -0.5, MaskSpec(full=True)

        def run():
            out, lse = block_forward(q, k, v, scale=scale, mask=full, backend=kernel)
            block_backward(do, q, k, v, out, lse, scale=scale, mask=full, backend=kernel)
        return run, 3.5 * 4 * B * n * n * h * d  # fwd + 2.5x bwd FLOPs

    small, f_small = block(max(1, S // (2 * p)), H)
    big, f_big = block(max(1, S // 2), max(1, H // p))
    t_small = _median_time(small, group, reps, device)
    t_big = _median_time(big, group, reps, device)

    def both():
        reqs = _shift(group, kv, kv_in, rank, p)
        small()
        wait(reqs)
    t_both = _median_time(both, group, reps, device)

    # 1 / rate(n) = (1 / peak) (1 + n_half / n): a line through the two measured points
    n1, n2 = S / (2 * p), S / 2
    y1, y2 = t_small / f_small, t_big / f_big
    slope = (y1 - y2) / (1 / n1 - 1 / n2) if n2 > n1 else 0.0
    inv_peak = max(y2 - slope / n2, 1e-18)
    n_half = max(0.0, slope / inv_peak)
    hide = min(t_small, t_p2p)
    overlap = min(1.0, max(0.0, (t_small + t_p2p - t_both) / hide)) if hide > 0 else 0.0
    a2a_bytes = a2a.numel() * a2a.element_size() * (p - 1) / p
    p2p_bytes = kv.numel() * kv.element_size()
    def gbps(nbytes, t):  # the fixed cost is charged separately (latency_s), but never more
        # than half of a transfer: on a busy host the 4-byte shift's time is mostly scheduling
        return nbytes / max(t - t_lat, t / 2) / 1e9

    cluster = Cluster(cp_degree=p, devices_per_node=devices_per_node, tflops=1 / inv_peak / 1e12,
                      n_half=int(round(n_half)), latency_s=t_lat, overlap=overlap)
    if spans_nodes:  # placement rule: node-local all-to-all inside, the ring shift (paced by
        # its inter-node hops) for everything that crosses nodes
        cluster.intra_gbps = gbps(chunk * (n - 1) * a2a.element_size(), t_node)
        cluster.inter_gbps = gbps(p2p_bytes, t_p2p)
    else:  # the whole group shares a node: what was measured is what each layout uses
        cluster.ulysses_gbps, cluster.ring_gbps = gbps(a2a_bytes, t_a2a), gbps(p2p_bytes, t_p2p)
    raw = dict(t_a2a=t_a2a, t_p2p=t_p2p, t_latency=t_lat, t_kernel_small=t_small,
               t_kernel_big=t_big, t_kernel_and_shift=t_both, a2a_bytes=a2a_bytes,
               p2p_bytes=p2p_bytes, dtype_bytes=eb)
    return cluster, raw


def time_layouts(w: Workload, layouts: list[tuple[int, int, str]], group=None, backend: str = "auto",
                 device=None, reps: int = 3) -> list[list[float]]:
    """Seconds (slowest rank) of one attention fwd + bwd at the real shape: per (U, R, mode), one per round.

    Layouts are timed round-robin (one warm-up call each first), so round k of every layout
    ran under the same machine conditions and rounds can be compared pairwise. Causal,
    random inputs of the workload's shape and dtype.
    """
    from feixing.context_parallel import ContextParallel

    group = group if group is not None else dist.group.WORLD
    p = dist.get_world_size(group)
    dtype = _DTYPES[w.dtype_bytes]
    device = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator(device="cpu").manual_seed(1234)
    s = w.seq_len // p

    def make(h):
        return torch.randn(w.batch, s, h, w.head_dim, generator=g).to(device, dtype)
    q, k, v, do = make(w.n_heads), make(w.n_kv_heads), make(w.n_kv_heads), make(w.n_heads)
    runs, made = [], []
    for u, r, mode in layouts:
        cp = ContextParallel(u, r, group=group, mode=mode, backend=backend)
        made += [x for x in (cp.ulysses_group, cp.ring_group) if x is not None and x is not group]

        def run(cp=cp):
            qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
            cp.attention(qs, ks, vs, causal=w.causal).backward(do)
        runs.append(run)
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(reps):
        for i, run in enumerate(runs):
            times[i].append(_timed(run, group, device))
    for g in made:  # the subgroups were only for timing: free their sockets and threads
        dist.destroy_process_group(g)
    return times
