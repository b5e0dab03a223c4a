"""Always-on per-rank telemetry: phase timers, GC pauses, canaries, buffered JSONL, online detection.

Usage inside a training loop (see docs/doctor.md):

    tele = Telemetry(cfg.telemetry, faults=cfg.faults, run_dir=..., rank=..., world_size=...)
    with tele.phase("data"): ...
    with tele.phase("forward"): ...
    tele.end_step(step)
    tele.close()

Each rank appends to its own `run_dir/telemetry/rank-XXXXX.jsonl` (one `step` record per step,
a `canary` record every `canary_interval` steps), buffered in memory and written every
`flush_interval` steps, so the step never waits on the disk or on another rank. Online detection
needs no collective either: every `detect_interval` steps each rank pushes six window medians
onto a queue in the job's key-value store (torch.distributed's TCPStore, one round trip to the
store, not a rendezvous with the other ranks) and a thread on rank 0 drains it and runs the
detectors (see OnlineGather; an all_gather where the store has no queues). Phase times are
host wall times net of GC pauses (which are reported separately as `gc`); on CUDA each phase
also records a pair of events whose device time is read back a few steps later, never
synchronizing. `step_s` is the time from the end of the previous `end_step` to this one, so the
telemetry's own work (`tele_s`) is not counted in the step it measures.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections import deque
from time import perf_counter, process_time, thread_time

import torch

from feixing.diagnose.faults import FaultInjector
from feixing.diagnose.probes import Canaries
from feixing.diagnose.watchdog import Heartbeat, Watchdog

log = logging.getLogger("feixing.diagnose")

# The signals each rank contributes to online detection (per detect_interval window).
ONLINE_SIGNALS = ("step", "data", "compute", "gc", "comm", "checkpoint")
COMPUTE_PHASES = ("forward", "backward", "optimizer")


class _Phase:
    """Reusable context manager for one phase name (no generator, no allocation per use)."""

    __slots__ = ("c0", "cpu_clock", "ev", "gc0", "name", "t0", "tele")

    def __init__(self, tele: Telemetry, name: str):
        self.tele, self.name, self.ev = tele, name, None
        # CPU time is read only where a detector uses it (a syscall each; see Telemetry.__init__)
        self.cpu_clock = tele._cpu_clock if name in COMPUTE_PHASES else None

    def __enter__(self):
        tele = self.tele
        self.gc0 = gc0 = tele._gc_total
        if self.cpu_clock is not None:
            # Adjacent compute phases (forward, backward, forward, ...) share one reading: the
            # previous one's exit starts this one, unless a GC pause came in between.
            mark = tele._cpu_mark
            self.c0 = mark if mark is not None and tele._cpu_mark_gc == gc0 else self.cpu_clock()
        else:
            tele._cpu_mark = None
        self.t0 = perf_counter()
        if tele._faults is not None:  # inside the timed region: the fault is the phase being slow
            tele._faults.before_phase(self.name, tele._cur_step, tele._history)
        # after the fault: a hung rank never arrives (and its heartbeat then needs a fresh time)
        tele._hb.enter(self.name, tele._cur_step, None if tele._faults is not None else self.t0)
        if tele._cuda:
            self.ev = torch.cuda.Event(enable_timing=True)
            self.ev.record()
        return self

    def __exit__(self, *exc):
        tele = self.tele
        gc_s = tele._gc_total - self.gc0
        if self.cpu_clock is not None:
            c1 = tele._cpu_mark = self.cpu_clock()
            tele._cpu_mark_gc = tele._gc_total
            cpu = tele._cpu
            cpu[self.name] = cpu.get(self.name, 0.0) + max(c1 - self.c0 - gc_s, 0.0)
        dt = perf_counter() - self.t0 - gc_s
        acc = tele._acc
        acc[self.name] = acc.get(self.name, 0.0) + dt
        tele._hb.exit()
        if self.ev is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            tele._events.append((tele._cur_step, self.name, self.ev, end))
            self.ev = None
        return False


class _Off:
    """What `phase()` returns when telemetry is disabled."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Telemetry:
    """Per-rank phase timers and canaries; see the module docstring for the record format."""

    def __init__(self, cfg, faults=None, run_dir: str = ".", rank: int = 0, world_size: int = 1,
                 group=None, device_type: str = "cpu"):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.enabled = bool(cfg.enabled)
        self._faults = FaultInjector(faults, rank, world_size) if faults else None
        self._off = _Off()
        self._closed = False
        if not self.enabled:
            if faults:
                log.warning("telemetry.enabled = false: faults are injected only while telemetry is on")
            return
        self.dir = os.path.join(run_dir, "telemetry")
        os.makedirs(self.dir, exist_ok=True)
        self.groups = group if isinstance(group, dict) else {"world": group}
        self._cuda = device_type == "cuda" and torch.cuda.is_available()
        # collectives need tensors on the backend's device (NCCL: CUDA, HCCL: NPU)
        self._comm_device = torch.device("cuda", torch.cuda.current_device()) if self._cuda \
            else torch.device(device_type)
        self._phases: dict[str, _Phase] = {}
        self._acc: dict[str, float] = {}
        # On CPU, compute runs on the host: its CPU time (unlike wall time) does not grow
        # when other processes take the core, so the detectors use it for compute phases (only
        # those read it: a CPU-time clock is a syscall, ~10 us when it is the first after a matmul).
        # With one intra-op thread all compute runs on the calling thread: its own CPU time is
        # exact and cheaper to read than the process's, which sums every thread (gloo's, the
        # watchdog's, ...) and cost 7-18 us after a matmul with 10-30 threads (3-10 us for this one).
        self._cpu_clock = None if device_type != "cpu" else \
            thread_time if torch.get_num_threads() == 1 else process_time
        self._cpu: dict[str, float] = {}
        self._cpu_mark, self._cpu_mark_gc = None, 0.0  # last compute phase's exit reading (see _Phase)
        self._sched_fd = _open_schedstat()
        self._sched0 = _read_sched(self._sched_fd)
        self._events: deque = deque()
        self._dev_pending: dict = {}
        # recent step records, for faults and online windows
        self._history: deque = deque(maxlen=max(64, cfg.detect_interval))
        self._buf: list = []  # step records as dicts (formatted at flush: cheaper than per step), other lines as str
        self._cur_step = None
        self._gc_total, self._gc_n, self._gc_t0 = 0.0, 0, 0.0
        self._gc_step0, self._gc_n0 = 0.0, 0
        self._tele_s = 0.0
        self._tele_total, self._steps = 0.0, 0
        self.background_cpu_s = 0.0  # set by close()
        self._hb = Heartbeat()
        # held open for the run (closed in close()): appends are buffered, one write per flush
        self._file = open(os.path.join(self.dir, f"rank-{rank:05d}.jsonl"), "a")  # noqa: SIM115
        self.canaries = Canaries(device_type, rank, world_size, self.groups, int(cfg.probe_bytes)) \
            if cfg.canary_interval > 0 or cfg.probe_interval > 0 else None
        self.online = None
        if cfg.online_detect and world_size > 1 and cfg.detect_interval > 0:
            from feixing.diagnose.online import OnlineGather
            self.online = OnlineGather(run_dir, rank, world_size)
        self.watchdog = Watchdog(self._hb, self.dir, rank, world_size, cfg.hang_timeout_s) \
            if cfg.hang_timeout_s > 0 else None
        gc.callbacks.append(self._on_gc)
        meta = {"type": "meta", "rank": rank, "world_size": world_size, "device_type": device_type,
                "pid": os.getpid(), "time": time.time(),
                "canary_interval": cfg.canary_interval, "detect_interval": cfg.detect_interval,
                "faults": [vars(f) for f in (faults or [])]}
        self._file.write(json.dumps(meta) + "\n")
        self._file.flush()
        self._t_step0 = perf_counter()

    # ----- the hot path ---------------------------------------------------------------------

    def _on_gc(self, event: str, info: dict) -> None:
        if event == "start":
            self._gc_t0 = perf_counter()
        else:
            self._gc_total += perf_counter() - self._gc_t0
            self._gc_n += 1

    def phase(self, name: str):
        """Context manager timing one phase of the current step (phases must not nest)."""
        if not self.enabled:
            return self._off
        p = self._phases.get(name)
        if p is None:
            p = self._phases[name] = _Phase(self, name)
        return p

    def end_step(self, step: int) -> None:
        """Close the step: write its record; run canaries / online detection when due."""
        if not self.enabled:
            return
        t_in = perf_counter()
        self._cpu_mark = None  # telemetry's own work below must not count as compute
        step_s = t_in - self._t_step0
        acc = self._acc
        sched = _read_sched(self._sched_fd)
        rec = {"step": step, "step_s": step_s, "ph": acc, "cpu": self._cpu,
               "gc_s": self._gc_total - self._gc_step0, "gc_n": self._gc_n - self._gc_n0,
               "sched_s": sched - self._sched0, "tele_s": self._tele_s}
        self._sched0 = sched
        self._gc_step0, self._gc_n0 = self._gc_total, self._gc_n
        self._acc = {}
        self._cpu = {}
        self._history.append(rec)
        self._buf.append(rec)
        if self._cuda:
            self._read_events(step)
        cfg = self.cfg
        probe = cfg.probe_interval > 0 and step % cfg.probe_interval == 0
        due = cfg.canary_interval > 0 and step % cfg.canary_interval == 0
        sync_s = 0.0
        if self.canaries is not None and (due or probe):
            t0 = perf_counter()
            self._hb.enter("canary", step)
            c = self.canaries.run(self._faults, step, probe)
            self._hb.exit()
            sync_s = c.get("sync_s", 0.0)
            c["step"], c["cost_s"] = step, perf_counter() - t0 - sync_s
            self._buf.append(json.dumps({"type": "canary", **c}) + "\n")
        if self.online is not None and step % cfg.detect_interval == 0:
            self._online(step)
        if len(self._buf) >= cfg.flush_interval:
            self.flush()
        self._cur_step = step + 1
        t_out = perf_counter()
        self._tele_s = t_out - t_in - sync_s
        self._tele_total += self._tele_s
        self._steps += 1
        self._t_step0 = t_out - sync_s  # the probe's opening wait belongs to the next step (see Canaries.run)

    # ----- periodic work ---------------------------------------------------------------------

    def _read_events(self, step: int) -> None:
        """Device time per phase from CUDA events that have completed; never synchronizes."""
        ev = self._events
        while ev and ev[0][3].query():
            s, name, a, b = ev.popleft()
            d = self._dev_pending.setdefault(s, {})
            d[name] = d.get(name, 0.0) + a.elapsed_time(b) / 1e3
        done = [s for s in self._dev_pending if not ev or s < ev[0][0]]
        for s in done:
            self._buf.append(json.dumps({"type": "device", "step": s, "dev": self._dev_pending.pop(s)}) + "\n")

    def _online(self, step: int) -> None:
        """Hand this rank's window medians to online detection (see OnlineGather)."""
        t0 = perf_counter()
        window = list(self._history)[-self.cfg.detect_interval:]
        per_step = [[_signal(r, s) for s in ONLINE_SIGNALS] for r in window]  # once, for medians and rows
        vec = [_median(col) for col in zip(*per_step)]
        if self.online.store is None:  # no queue in this store: one tiny all_gather, watched like a phase
            self._hb.enter("telemetry_gather", step)
            self.online.all_gather(step, vec, self._comm_device)
            self._hb.exit()
        else:  # detect.ONLINE_ROWS: the step number, ONLINE_SIGNALS[:4] (step, data, compute, gc), sched
            rows = [(r["step"], *v[:4], r.get("sched_s", 0.0)) for r, v in zip(window, per_step)]
            self.online.push(step, vec, rows, self._cpu_clock is not None)
        self._buf.append(f'{{"type":"online","step":{step},"cost_s":{perf_counter() - t0:.6f}}}\n')

    def flush(self) -> None:
        if self.enabled and self._buf and not self._file.closed:
            self._file.write("".join(x if isinstance(x, str) else _line(x) for x in self._buf))
            self._file.flush()
            self._buf.clear()

    def overhead(self) -> float:
        """Telemetry's own time in end_step (canaries, gathers, writes) as a fraction of step time."""
        steps = [r["step_s"] for r in self._history]
        mean_step = sum(steps) / len(steps) if steps else 0.0
        return (self._tele_total / max(self._steps, 1)) / mean_step if mean_step else 0.0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._faults is not None:
            self._faults.release.set()
        if not self.enabled:
            return
        if self._sched_fd is not None:
            os.close(self._sched_fd)
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self.watchdog is not None:
            self.watchdog.close()
        if self.online is not None:
            self.online.close()
        # CPU time of telemetry's threads (watchdog, rank 0's online detector): off the step, but
        # on a shared core it is taken from the training thread
        self.background_cpu_s = sum(x.cpu_s for x in (self.watchdog, self.online) if x is not None)
        self.flush()
        self._file.close()


def _signal(rec: dict, name: str) -> float:
    ph = rec["ph"]
    if name == "step":
        return rec["step_s"]
    if name == "gc":
        return rec["gc_s"]
    if name == "compute":
        src = rec.get("cpu") or ph  # CPU time on CPU devices (see Telemetry.__init__)
        return sum(src.get(p, 0.0) for p in COMPUTE_PHASES)
    return ph.get(name, 0.0)


def _median(xs: list[float]) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _open_schedstat():
    """/proc/self/schedstat (Linux): the main thread's time waiting for a CPU; None elsewhere."""
    try:
        return os.open("/proc/self/schedstat", os.O_RDONLY)
    except OSError:
        return None


def _read_sched(fd) -> float:
    """Seconds the training thread has spent runnable but not running (other processes had the core)."""
    if fd is None:
        return 0.0
    try:
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _line(rec: dict) -> str:
    """One step record as a JSONL line; floats rounded to 1 us so records stay small."""
    ph = ",".join(f'"{k}":{v:.6f}' for k, v in rec["ph"].items())
    cpu = ",".join(f'"{k}":{v:.6f}' for k, v in rec.get("cpu", {}).items())
    return (f'{{"type":"step","step":{rec["step"]},"step_s":{rec["step_s"]:.6f},"ph":{{{ph}}},'
            f'"cpu":{{{cpu}}},"gc_s":{rec["gc_s"]:.6f},"gc_n":{rec["gc_n"]},'
            f'"sched_s":{rec.get("sched_s", 0.0):.6f},"tele_s":{rec["tele_s"]:.6f}}}\n')
