"""`checkpoint.max_overhead`: save as often as a share of the loop's time allows.

A save costs the loop more than the time it blocks: on a CPU the optimizer waits for the copy
into the staging buffer (1.1 s for 6 GB on the 2-core VM), and the copy and the writer share
the cores with the steps. Where that is a large share of a step, saving at every due step
slows training by tens of percent. The rule here bounds it, in the spirit of CheckFreq (Mohan
et al., FAST '21), from what the loop itself measures: the manager sees one call per step, so
each step's duration is known. A step that a save overlapped (from the step that started it to
the one in which it committed) costs its duration less the median of recent steps without a
save; the sum over those steps is the save's cost. The next save is allowed once

    cost of the previous save <= max_overhead * (time since the previous save began),

so over a run the saves take at most that share of its time, whatever their cause. A save is
only allowed once a few steps without a save have been seen to compare with: without them the
steps a save slows down cannot be told from normal ones (saving at every step would then look
free). The cost is never less than the part the manager timed itself (blocked in the save call,
the wait before the optimizer).
"""

from __future__ import annotations

import statistics
import time
from collections import deque

IDLE_WINDOW = 25   # recent steps without a save whose median is a step's normal duration
MIN_IDLE = 5       # steps without a save needed before the next save (the baseline)


class LoopBudget:
    def __init__(self, share: float):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"checkpoint.max_overhead must be in [0, 1), got {share}")
        self.share = share
        self._t: float | None = None       # the previous step's call
        self._overlapped = False           # a save was in flight during the step now ending
        self._idle: deque[float] = deque(maxlen=IDLE_WINDOW)
        self._steps: list[float] = []      # durations of the steps the latest save overlapped
        self._began: float | None = None   # when the latest save began

    def step(self, busy: bool, now: float | None = None) -> None:
        """Once per step, at the manager's per-step call; `busy`: a save is still in flight."""
        now = time.perf_counter() if now is None else now
        if self._t is not None:
            (self._steps if self._overlapped else self._idle).append(now - self._t)
        self._t = now
        self._overlapped = busy

    def began(self, now: float | None = None) -> None:
        """A save began at this step (after `step`): the steps from now on are its cost."""
        self._began = time.perf_counter() if now is None else now
        self._steps = []
        self._overlapped = True

    def pause(self) -> None:
        """The loop stopped calling per step (a flush, an evaluation): the next interval is no step."""
        self._t = None

    def cost(self, timed: float) -> float:
        """The latest save's cost to the loop so far (s); `timed`: its blocked + wait time."""
        if not self._idle or not self._steps:
            return timed
        normal = statistics.median(self._idle)
        return max(timed, sum(max(0.0, d - normal) for d in self._steps))

    def allows(self, timed: float, now: float | None = None) -> bool:
        """Whether a save may begin now; `timed` as in `cost`."""
        if self.share <= 0 or self._began is None:
            return True
        if len(self._idle) < MIN_IDLE:
            return False
        now = time.perf_counter() if now is None else now
        return self.cost(timed) <= self.share * (now - self._began)
