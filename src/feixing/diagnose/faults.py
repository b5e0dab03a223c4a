"""Fault injection for tests and evaluation: `[[faults]]` entries slow a rank, a phase or a link.

Off unless `cfg.faults` is non-empty, and loudly logged when on. Faults act inside
`Telemetry.phase(...)` (and inside the canaries), so the same code path that measures a phase
also slows it. Delays are sized from the rank's own recent timings, frozen when a fault
starts, so that a fault does not compound on itself:

| kind             | where                                | delay per step                          |
|------------------|--------------------------------------|-----------------------------------------|
| slow_rank        | forward, backward (half each), busy  | magnitude x recent step time             |
| dispatch_ramp    | compute phases + dispatch canary, busy | f x the phase's baseline, f = mag x (step-start)/100 |
| slow_link        | comm phase + ring probe send         | magnitude x recent step time, per message |
| slow_data        | data                                 | magnitude x recent step time             |
| gc_storm         | forward (a full gc.collect over ballast sized for magnitude x step) | measured as GC pause |
| checkpoint_stall | checkpoint                           | magnitude x recent step time             |
| hang             | backward, before the rank arrives    | blocks `magnitude` seconds (0 = until close) |
"""

from __future__ import annotations

import gc
import logging
import statistics
import threading
import time
from collections.abc import Sequence

log = logging.getLogger("feixing.diagnose")

KINDS = ("slow_rank", "dispatch_ramp", "slow_link", "slow_data", "gc_storm", "checkpoint_stall", "hang")
# The layer each fault should be diagnosed as (used by tests and the evaluation harness).
EXPECTED_LAYER = {"slow_rank": "compute", "dispatch_ramp": "dispatch", "slow_link": "communication",
                  "slow_data": "data", "gc_storm": "gc", "checkpoint_stall": "checkpoint",
                  "hang": "communication"}
_RAMP_PHASES = ("forward", "backward", "optimizer")


def wait(seconds: float) -> None:
    """Idle delay (a wait for data, disk or a peer): sleep, then spin the last ms for precision."""
    if seconds <= 0:
        return
    end = time.perf_counter() + seconds
    if seconds > 0.002:
        time.sleep(seconds - 0.001)
    while time.perf_counter() < end:
        pass


def spin(seconds: float) -> None:
    """Busy delay (slower compute or dispatch): burns CPU time, as slower work would."""
    end = time.process_time() + seconds
    deadline = time.perf_counter() + 20 * seconds + 1.0  # never spin forever when descheduled
    while time.process_time() < end and time.perf_counter() < deadline:
        pass


def check_faults(faults: Sequence) -> None:
    """Raise a clear error for a `[[faults]]` entry a user got wrong."""
    for i, f in enumerate(faults):
        if f.kind not in KINDS:
            raise ValueError(f"faults[{i}].kind = {f.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if f.magnitude < 0:
            raise ValueError(f"faults[{i}].magnitude = {f.magnitude} must be >= 0")
        if f.start_step < 0:
            raise ValueError(f"faults[{i}].start_step = {f.start_step} must be >= 0")


class FaultInjector:
    """The faults that apply to one rank; Telemetry calls `before_phase` at every phase entry."""

    def __init__(self, faults: Sequence, rank: int, world_size: int):
        check_faults(faults)
        self.rank, self.world_size = rank, world_size
        self.faults = [f for f in faults if not f.ranks or rank in f.ranks]
        self._started: set[int] = set()
        self._hung: set[int] = set()
        self._step_base: dict[int, float] = {}
        self._phase_base: dict[int, dict[str, float]] = {}
        self._ballast: list = []
        self._gc_target = 0.0
        self.release = threading.Event()  # set by Telemetry.close() to free a hung rank
        for f in faults:
            log.warning("FAULT INJECTION ON (rank %d): kind=%s ranks=%s start_step=%d magnitude=%g%s",
                        rank, f.kind, f.ranks or "all", f.start_step, f.magnitude,
                        "" if f in self.faults else " (not this rank)")

    def _active(self, step: int | None, history) -> list:
        """Faults active at `step`; freezes each fault's baselines the first time it fires."""
        if step is None:
            return []
        out = []
        for i, f in enumerate(self.faults):
            if step < f.start_step:
                continue
            if i not in self._started:
                self._started.add(i)
                self._freeze(i, f, history)
                log.warning("FAULT ACTIVE: %s on rank %d from step %d (magnitude %g)",
                            f.kind, self.rank, step, f.magnitude)
            out.append((i, f))
        return out

    def _freeze(self, i: int, f, history) -> None:
        recent = list(history)[-20:]
        steps = [r["step_s"] for r in recent if r["step_s"] > 0]
        self._step_base[i] = statistics.median(steps) if steps else 0.01
        # CPU time where recorded (CPU devices): the work a slower dispatch would stretch
        self._phase_base[i] = {p: statistics.median([(r.get("cpu") or r["ph"]).get(p, 0.0) for r in recent])
                               if recent else 0.0 for p in _RAMP_PHASES}
        if f.kind == "gc_storm":
            self._gc_target = f.magnitude * self._step_base[i]
            self._size_ballast()

    def _size_ballast(self) -> None:
        """Hold enough tracked objects that one full collection pauses about `_gc_target` s."""
        probe = [[j] for j in range(50_000)]
        t0 = time.perf_counter()
        gc.collect()
        per_obj = max((time.perf_counter() - t0) / len(probe), 1e-9)
        n = int(self._gc_target / per_obj)
        self._ballast = [[j] for j in range(min(n, 20_000_000))]
        del probe

    def before_phase(self, phase: str, step: int | None, history) -> None:
        for i, f in self._active(step, history):
            k = f.kind
            if k == "slow_rank" and phase in ("forward", "backward"):
                spin(0.5 * f.magnitude * self._step_base[i])
            elif (k, phase) in (("slow_data", "data"), ("checkpoint_stall", "checkpoint"), ("slow_link", "comm")):
                wait(f.magnitude * self._step_base[i])
            elif k == "dispatch_ramp" and phase in _RAMP_PHASES:
                spin(self._ramp(f, step) * self._phase_base[i].get(phase, 0.0))
            elif k == "gc_storm" and phase == "forward":
                _ = [[j] for j in range(1000)]  # fresh garbage, then a full pass over the ballast
                gc.collect()
            elif k == "hang" and phase == "backward" and i not in self._hung:
                self._hung.add(i)  # a hang is one event: the rank stops once
                log.error("FAULT hang: rank %d stops before backward at step %s", self.rank, step)
                self.release.wait(f.magnitude if f.magnitude > 0 else None)

    @staticmethod
    def _ramp(f, step: int) -> float:
        return f.magnitude * max(step - f.start_step, 0) / 100.0

    def dispatch_extra(self, step: int | None, base_s: float) -> float:
        """Extra seconds the dispatch canary should take at `step` (dispatch_ramp)."""
        return sum(self._ramp(f, step) * base_s for _, f in self._active(step, ()) if f.kind == "dispatch_ramp")

    def link_delay(self, step: int | None) -> float:
        """Extra seconds before this rank sends on its ring link in the probe (slow_link): the
        same delay per message as in the comm phase, as a slow link would add to every transfer."""
        return sum(f.magnitude * self._step_base[i]
                   for i, f in self._active(step, ()) if f.kind == "slow_link")
