"""Online detection without a collective: ranks push their windows to the store, rank 0 judges them.

Every `detect_interval` steps each rank pushes one line (its step, its rank, the medians of
telemetry.ONLINE_SIGNALS over the window, and the window's per-step rows of detect.ONLINE_ROWS,
which the straggler rule reads step by step) onto a queue in the job's key-value store,
the TCPStore that torch.distributed already runs for rendezvous. A push is one round trip to
the store; unlike an all_gather it does not wait for the other ranks, so a slow rank does not
make the telemetry of the others slow. On rank 0 a daemon thread (with its own store
connection) drains the queue, assembles windows that every rank has reported, and runs
detect.OnlineDetector on them; its warnings go to the training log. Where the store has no
queues (torch < 2.7), each window is one tiny all_gather of the medians instead (and the
straggler rule works on window medians: two flagged windows in a row).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from array import array

import numpy as np
import torch

log = logging.getLogger("feixing.diagnose")

POLL_S = 2.0  # rank 0's thread also drains this often when no window of its own woke it


def encode(step: int, rank: int, vec: list[float], rows=(), compute_cpu: bool = False) -> str:
    """One queue entry at the window's last step: a rank's window medians (telemetry.ONLINE_SIGNALS)
    as text, then its per-step rows (detect.ONLINE_ROWS each) as one base64 token of float64s
    (formatting 300 numbers as text cost ~160 us a window; packing them, a tenth of that)."""
    packed = base64.b64encode(array("d", [v for row in rows for v in row]).tobytes()).decode() if rows else "-"
    return " ".join([str(step), str(rank), str(int(compute_cpu))] + [f"{v:.7g}" for v in vec] + [packed])


def decode(line: str) -> tuple[int, int, bool, list[float], np.ndarray]:
    from feixing.diagnose.detect import ONLINE_ROWS
    step, rank, cpu, *vals = line.split()
    flat = np.frombuffer(base64.b64decode(vals[-1]), dtype=np.float64) if vals[-1] != "-" else np.zeros(0)
    return int(step), int(rank), cpu == "1", [float(v) for v in vals[:-1]], flat.reshape(-1, len(ONLINE_ROWS))


def _queue_store():
    """The default process group's store if it supports queues, else None."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.queue_len("feixing/probe")
        return store
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


class OnlineGather:
    """One rank's side of online detection; on rank 0 also the detector and its thread."""

    def __init__(self, run_dir: str, rank: int, world_size: int, store=None):
        from feixing.diagnose.detect import OnlineDetector
        self.rank, self.world_size = rank, world_size
        # One queue per run directory, so runs that share a process group (tests) do not mix. The
        # path as configured, not made absolute: every rank has the same config, not the same cwd.
        self.key = "feixing/telemetry/" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]
        self.store = store if store is not None else _queue_store()
        self.detector = OnlineDetector(world_size) if rank == 0 else None
        self.messages: list[tuple[int, str]] = []  # (window step, warning), rank 0
        self.cpu_s = 0.0  # the detector thread's CPU time, set when it stops
        self._pending: dict[int, dict[int, tuple]] = {}  # step -> rank -> (medians, rows, compute_cpu)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = None
        if self.detector is not None and self.store is not None:
            try:
                self._reader = self.store.clone()  # its own connection: the main thread never queues behind it
            except (AttributeError, RuntimeError, NotImplementedError):
                self._reader = self.store
            self._drain(judge=False)  # entries a crashed earlier run with this directory left behind
            self._thread = threading.Thread(target=self._run, name="feixing-doctor", daemon=True)
            self._thread.start()

    def push(self, step: int, vec: list[float], rows=(), compute_cpu: bool = False) -> None:
        """This rank's window to the queue (one store round trip, no wait for peers)."""
        self.store.queue_push(self.key, encode(step, self.rank, vec, rows, compute_cpu))
        if self._thread is not None:
            self._wake.set()

    def all_gather(self, step: int, vec: list[float], device) -> None:
        """Fallback where the store has no queues: every rank all-gathers the window medians."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return
        t = torch.tensor(vec, dtype=torch.float64, device=device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        if self.detector is not None:
            self._judge(step, torch.stack(out).cpu().numpy())

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(POLL_S)
                self._wake.clear()
                try:
                    self._drain()
                except Exception as e:  # noqa: BLE001 - the store goes away when the job ends
                    if not self._stop.is_set():
                        log.warning("online detection stopped: store unreachable (%s)", e)
                    return
        finally:
            self.cpu_s = time.thread_time()  # the detector's CPU time (telemetry's cost off the step)

    def _drain(self, judge: bool = True) -> None:
        """Pop everything queued; judge each window every rank has reported, oldest first."""
        for _ in range(self._reader.queue_len(self.key)):
            step, rank, cpu, vec, rows = decode(self._reader.queue_pop(self.key, False).decode())
            self._pending.setdefault(step, {})[rank] = (vec, rows, cpu)
        if not judge:
            self._pending.clear()
            return
        for step in sorted(s for s, w in self._pending.items() if len(w) == self.world_size):
            for older in [s for s in self._pending if s < step]:
                del self._pending[older]  # a rank that skipped a window (restarted): it never completes
            w = self._pending.pop(step)
            rows = {r: w[r][1] for r in range(self.world_size)}
            self._judge(step, np.array([w[r][0] for r in range(self.world_size)]),
                        rows if all(len(a) for a in rows.values()) else None, w[0][2])

    def _judge(self, step: int, m: np.ndarray, rows=None, compute_cpu: bool = False) -> None:
        for msg in self.detector.update(step, m, rows, compute_cpu):
            log.warning("doctor: %s", msg)
            self.messages.append((step, msg))

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=5.0)
            self._thread = None
