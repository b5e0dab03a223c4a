"""Canaries: host dispatch latency and memory every `canary_interval` steps, collective probes every `probe_interval`.

Every rank runs the same canaries at the same step (they contain collectives). Each returns
plain floats for the rank's JSONL record:

- dispatch: a fixed sequence of tiny operators; host time to issue them (one untimed pass to warm
  the caches, then the min of 3 repeats, since the minimum is the least disturbed by other
  processes). On CUDA the device time of the same sequence comes from events read back at the
  next canary, so the canary never synchronizes.
- links: every rank sends to its right ring neighbour and receives from its left one; the time
  until the receive completes is the latency (1 float) and bandwidth (`probe_bytes`) of link
  left -> self (each exchange after a barrier, so delays do not travel around the ring). A
  slow link therefore shows at the receiving end.
- groups: all_reduce latency and bandwidth in each named process group.
- memory: resident set size (and CUDA allocated / reserved when on CUDA).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

N_DISPATCH_OPS = 64
# Iterations of the host reference: plain Python arithmetic, no torch, no system call (~130 us
# here). Timed next to each dispatch pass, it measures how fast the core runs the interpreter at
# that moment: when it slows as much as the dispatch canary, the whole core got slower (a busy
# neighbour on the host, a lower clock), not only the operator dispatch path (drift.py says which).
N_REFERENCE_ITERS = 4000
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:  # not Linux: fall back to the peak, which is what getrusage offers
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Canaries:
    """State kept between canary runs (tensors reused, pending CUDA events)."""

    def __init__(self, device_type: str, rank: int, world_size: int, groups: dict, probe_bytes: int):
        self.device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" \
            else torch.device(device_type)
        self.cuda = device_type == "cuda"
        self.rank, self.world_size, self.groups = rank, world_size, groups
        n = max(probe_bytes // 4, 1)
        self._x = torch.ones(8, device=self.device)
        self._small = torch.zeros(1, device=self.device)
        self._small_r = torch.zeros(1, device=self.device)
        self._big = torch.zeros(n, device=self.device)
        self._big_r = torch.zeros(n, device=self.device)
        from feixing.diagnose.telemetry import _open_schedstat, _read_sched
        fd = _open_schedstat()
        self._sched = lambda: _read_sched(fd)
        self._pending = None  # (start_event, end_event) of the last dispatch canary on CUDA
        self._dispatch_base = None

    def _dispatch_once(self) -> None:
        x = self._x
        for _ in range(N_DISPATCH_OPS // 3):
            x = x * 1.0001
            x = x + 0.0001
            x = torch.relu(x)

    @staticmethod
    def _reference_once() -> float:
        x = 1.0
        for _ in range(N_REFERENCE_ITERS):
            x = x * 1.0000001 + 1e-7
        return x

    def dispatch(self, faults, step) -> dict:
        out = {}
        if self.cuda and self._pending is not None and self._pending[1].query():
            out["dispatch_dev_s"] = self._pending[0].elapsed_time(self._pending[1]) / 1e3
            self._pending = None
        self._dispatch_once()  # untimed: after a step's large kernels the dispatch path is cold
        best = best_cpu = ref = ref_cpu = float("inf")
        for _ in range(3):
            c0 = time.process_time()
            t0 = time.perf_counter()
            if self.cuda and self._pending is None:
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                ev[0].record()
                self._dispatch_once()
                ev[1].record()
                self._pending = ev
            else:
                self._dispatch_once()
            if faults is not None:
                if self._dispatch_base is None:
                    self._dispatch_base = time.perf_counter() - t0
                from feixing.diagnose.faults import spin
                spin(faults.dispatch_extra(step, self._dispatch_base))
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
            c0 = time.process_time()
            t0 = time.perf_counter()
            self._reference_once()
            ref = min(ref, time.perf_counter() - t0)
            ref_cpu = min(ref_cpu, time.process_time() - c0)
        out["dispatch_s"] = best
        out["reference_s"] = ref
        if not self.cuda:  # host CPU time: unaffected by other processes taking the core
            out["dispatch_cpu_s"] = best_cpu
            out["reference_cpu_s"] = ref_cpu
        return out

    def _ring(self, send, recv, delay: float) -> float:
        """Send to the right neighbour, receive from the left; seconds until the receive is done,
        less the time this rank sat descheduled meanwhile (that is the host, not the link)."""
        right, left = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        s0 = self._sched()
        t0 = time.perf_counter()
        if delay > 0:
            from feixing.diagnose.faults import wait
            wait(delay)
        rs = dist.isend(send, right)
        rr = dist.irecv(recv, left)
        rr.wait()
        # the injected delay models this rank's *outgoing* link: not part of its incoming one
        dt = time.perf_counter() - t0 - (self._sched() - s0) - max(delay, 0.0)
        rs.wait()
        return dt

    def links(self, faults, step) -> dict:
        if self.world_size < 2:
            return {}
        delay = faults.link_delay(step) if faults is not None else 0.0
        # A barrier before each exchange: without it one slow sender delays every later exchange
        # around the ring, and all links look slow. Minimum of 2: a descheduled peer inflates one
        # (and a slow link needs LINK_PERSIST probes in a row anyway). run() opened with a barrier.
        lat = self._ring(self._small, self._small_r, delay)
        dist.barrier()
        lat = min(lat, self._ring(self._small, self._small_r, delay))
        dist.barrier()
        bw_t = self._ring(self._big, self._big_r, delay)
        return {"link_from": (self.rank - 1) % self.world_size, "link_lat_s": lat,
                "link_bw_gbs": self._big.numel() * 4 / max(bw_t, 1e-9) / 1e9}

    def group_probes(self) -> dict:
        out = {}
        for name, g in self.groups.items():
            if (dist.get_world_size(g) if g is not None else self.world_size) < 2:
                continue
            t0 = time.perf_counter()
            dist.all_reduce(self._small, group=g)
            t1 = time.perf_counter()
            dist.all_reduce(self._big, group=g)
            t2 = time.perf_counter()
            out[f"ar_{name}_lat_s"] = t1 - t0
            out[f"ar_{name}_bw_gbs"] = self._big.numel() * 4 / max(t2 - t1, 1e-9) / 1e9
        self._big.zero_()
        return out

    def memory(self) -> dict:
        out = {"rss_mb": rss_mb()}
        if self.cuda:
            out["cuda_alloc_mb"] = torch.cuda.memory_allocated() / 2**20
            out["cuda_reserved_mb"] = torch.cuda.memory_reserved() / 2**20
        return out

    def run(self, faults, step, collectives: bool) -> dict:
        """All due canaries; `sync_s` is the wait in the barrier that opens the collective probes.

        That wait is the ranks' arrival skew, which the next step's first collective would have
        absorbed anyway, so telemetry does not count it as its own cost."""
        rec = self.dispatch(faults, step)
        rec.update(self.memory())
        if collectives and dist.is_available() and dist.is_initialized() and self.world_size > 1:
            t0 = time.perf_counter()
            dist.barrier()
            rec["sync_s"] = time.perf_counter() - t0
            rec.update(self.links(faults, step))
            rec.update(self.group_probes())
        return rec
