"""Detectors over per-rank telemetry: straggler, slow link, drift, event spikes, hang -> Findings.

All detectors are causal: a finding's `detected_step` is the first step at which the rule
fires using only records up to that step, so the offline report says when an online monitor
with per-step data would have alarmed. `first_step` is the estimated onset.

- straggler: per rank and layer (data, compute, gc) a rolling median over STRAGGLER_WINDOW
  steps, compared with the median of its peers (robust to one bad rank), in units of a step;
  flagged while over STRAGGLER_MIN_FRAC of a step and STRAGGLER_MIN_REL of the peers' time in
  that layer, and while fewer than half the ranks are flagged (a straggler is a minority), for
  STRAGGLER_PERSIST consecutive steps. Exposed communication wait is never used:
  it is the symptom in the ranks that wait, not the cause. Checkpoint blocking is never used:
  it is an event (spike), not a straggler.
- slow link: the ring probe's receive latency per link vs the median link, persistent over
  LINK_PERSIST canaries; names both ends.
- drift: one-sided CUSUM of block low quantiles (q10 over DRIFT_BLOCK steps; interference only
  adds time, so a low quantile is steadier than a mean) against a baseline taken after warm-up,
  for every phase and canary, for all ranks pooled and for each rank alone.
- spike: a step over SPIKE_RATIO x the rolling median step, attributed to the phase whose
  excess explains it (checkpoint, gc, data); unexplained spikes are not findings.
- hang: the watchdog's reports (see watchdog.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

LAYER_OF = {"data": "data", "forward": "compute", "backward": "compute", "optimizer": "compute",
            "compute": "compute", "comm": "communication", "checkpoint": "checkpoint", "gc": "gc",
            "dispatch_s": "dispatch", "dispatch_cpu_s": "dispatch", "rss_mb": "memory",
            "link_lat_s": "communication"}

# Tuned on clean 4-rank runs of the evaluation loop on a shared 2-core machine, where other
# processes make one rank's compute up to ~2x slower for 10-20 steps at a time.
STRAGGLER_WINDOW = 11      # steps in the rolling median (odd: a clean median)
STRAGGLER_PERSIST = 10     # consecutive flagged steps before a finding
STRAGGLER_MIN_FRAC = 0.05  # excess over peers, as a fraction of a step, below which nothing is flagged
STRAGGLER_MIN_REL = 0.10   # ... and as a fraction of the peers' time in that layer
STRAGGLER_WARMUP = 20      # the first steps of a run are never flagged: start-up is uneven
LINK_PERSIST = 3           # consecutive probes with a slow link (a descheduled receiver lasts one)
LINK_MIN_FRAC = 0.02       # link excess (s) as a fraction of a step
DRIFT_BLOCK = 25           # steps per drift block
DRIFT_QUANTILE = 10        # the block's lower envelope: other processes only ever add time
DRIFT_WARMUP = 10          # steps skipped before the baseline
DRIFT_BASE_BLOCKS = 4      # blocks (or canaries) in the baseline
DRIFT_MIN = 0.01           # smallest relative drift we report (1%)
DRIFT_K_SIGMA = 0.5        # CUSUM slack in baseline sigmas (and at least DRIFT_MIN / 2)
DRIFT_H_SIGMA = 5.0        # CUSUM alarm level in baseline sigmas (and at least DRIFT_H_MIN * DRIFT_MIN)
DRIFT_H_MIN = 5.0
# Online: the per-step fields each rank pushes with its window medians, for the straggler rule
# (the names find_stragglers reads; "step" first is the step number, then "step" is its time).
ONLINE_ROWS = ("step_no", "step", "data", "compute", "gc", "sched")
# Online: window medians are noisier and the dispatch canary is not there to confirm a small
# drift, and a warning in the log should be rare: a higher alarm level and at least 10% growth.
ONLINE_H_SIGMA, ONLINE_H_MIN, ONLINE_DRIFT_MIN = 10.0, 8.0, 0.10
DRIFT_SIGMA_FLOOR = 0.01   # the baseline never claims to be steadier than 1% per block
SPIKE_RATIO = 1.5          # a spike step is this much over the rolling median step (checkpoint)
SPIKE_RATIO_NOISY = 2.0    # ... for gc and data, whose pauses the machine's own noise also makes
SPIKE_REF = 50             # steps in the spike detector's rolling reference


@dataclass
class Finding:
    kind: str                 # straggler | drift | spike | hang
    layer: str                # data | dispatch | compute | communication | checkpoint | gc | memory
    ranks: list[int]
    first_step: int
    magnitude: float          # straggler/drift: relative slowdown; spike: excess in steps; hang: seconds
    summary: str
    detected_step: int | None = None
    evidence: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def nanmedian(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """np.nanmedian along one axis (all-NaN -> NaN), by one sort. The same values; numpy takes a
    masked-array path for small arrays that made rank 0's online detector 2.5x slower
    (benchmarks/doctor_detector_cost.py)."""
    s = np.sort(np.moveaxis(np.asarray(a, dtype=float), axis, -1), axis=-1)  # NaN sorts last
    if s.shape[-1] == 0:
        return np.full(s.shape[:-1], np.nan)
    n = (~np.isnan(s)).sum(axis=-1, keepdims=True)  # values per lane; the middle one(s) of those:
    lo = np.take_along_axis(s, np.maximum(n - 1, 0) // 2, axis=-1)
    hi = np.take_along_axis(s, n // 2, axis=-1)
    return ((lo + hi) / 2)[..., 0]


def rolling(x: np.ndarray, w: int) -> np.ndarray:
    """Causal rolling nanmedian along the last axis; NaN until a full window exists."""
    out = np.full(x.shape, np.nan)
    if x.shape[-1] >= w:
        v = np.lib.stride_tricks.sliding_window_view(x, w, axis=-1)
        with np.errstate(all="ignore"):  # inf and -inf in one window: NaN, like numpy's, quietly
            out[..., w - 1:] = nanmedian(v, axis=-1)
    return out


def _robust_sigma(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def _runs(mask: np.ndarray):
    """(start, end_exclusive) of each run of True."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def peer_excess(m: np.ndarray) -> np.ndarray:
    """For each rank, its value minus the median of the other ranks (rows = ranks)."""
    r = m.shape[0]
    peers = np.array([[j for j in range(r) if j != i] for i in range(r)], dtype=np.intp).reshape(r, r - 1)
    with np.errstate(invalid="ignore"):
        return m - nanmedian(m[peers], axis=1)  # steps where no peer reported stay NaN


def minority(flags: np.ndarray) -> np.ndarray:
    """Straggler flags (ranks along axis 0) kept only where fewer than half the ranks are flagged.

    A straggler is a minority: where half the ranks or more are flagged together, no majority
    defines "normal" (on an oversubscribed host, ranks sharing a core slow down together)."""
    return flags & (2 * flags.sum(axis=0) < flags.shape[0])


def find_stragglers(steps: np.ndarray, sig: dict[str, np.ndarray], first_step: int | None = None,
                    compute_cpu: bool | None = None) -> list[Finding]:
    """`first_step`: the run's first step (default steps[0]; online detection passes it because
    it sees only the latest steps); `compute_cpu`: compute is CPU time (default: the records had
    it), which descheduled time does not inflate."""
    if sig["step"].shape[0] < 3:  # peers need a majority to define "normal"
        return []
    first_step = int(steps[0]) if first_step is None else first_step
    compute_cpu = "cpu_forward" in sig if compute_cpu is None else compute_cpu
    step_ref = rolling(nanmedian(sig["step"], axis=0), STRAGGLER_WINDOW)
    out = []
    # Time a rank spent runnable but descheduled (other processes on its core) is not its own
    # slowness in a wall-time layer; subtract any such excess over its peers.
    sched_exc = np.maximum(peer_excess(rolling(sig["sched"], STRAGGLER_WINDOW)), 0) if "sched" in sig else 0.0
    sched_raw = np.maximum(peer_excess(sig["sched"]), 0) if "sched" in sig else 0.0
    step_ref_all = np.where(np.isfinite(step_ref), step_ref, np.nanmedian(sig["step"]))
    for layer in ("data", "compute", "gc"):
        if layer not in sig:
            continue
        # sleeps wake late on a busy host; compute: a rank on a crowded core runs 5-6% of a step slower
        thr = STRAGGLER_MIN_FRAC * {"data": 1.4, "compute": 1.2}.get(layer, 1.0)
        m = rolling(sig[layer], STRAGGLER_WINDOW)
        exc = peer_excess(m)
        raw = peer_excess(sig[layer])  # per step, for the onset
        if layer != "compute" or not compute_cpu:
            exc = exc - sched_exc
            raw = raw - sched_raw
        raw = raw / step_ref_all
        frac = exc / step_ref
        with np.errstate(all="ignore"):
            rel = exc / (m - exc)
        flags = minority((frac > thr) & (rel > STRAGGLER_MIN_REL))
        flags[:, : int(np.searchsorted(steps, first_step + STRAGGLER_WARMUP))] = False
        for r in range(m.shape[0]):
            flag = flags[r]
            runs = [(a, b) for a, b in _runs(flag) if b - a >= STRAGGLER_PERSIST]
            if not runs:
                continue
            a, _b = runs[0]
            det = a + STRAGGLER_PERSIST - 1
            onset = change_point(raw[r], max(a - STRAGGLER_WINDOW, 0), det)
            flagged = np.concatenate([np.arange(x, y) for x, y in runs])
            mag = float(np.nanmedian(rel[r, flagged]))
            share = float(np.nanmedian(frac[r, flagged]))
            verb = {"data": "waits for data", "compute": "computes", "gc": "pauses for GC"}[layer]
            summ = (f"rank {r} {verb} {mag:.0%} slower than its peers since step {int(steps[onset])}"
                    f" (+{share:.0%} of a step)")
            ev = [(f"flagged in {len(flagged)} of {len(steps) - a} steps from step {int(steps[a])}; "
                  f"threshold {thr:.1%} of a step over the peers' median")]
            out.append(Finding("straggler", layer, [r], int(steps[onset]), round(mag, 4), summ,
                               int(steps[det]), ev))
    return out


def change_point(x: np.ndarray, lo: int, hi: int) -> int:
    """Onset of a shift up in x[lo:hi + 1]: the split into a lower segment before and a higher one
    from it with the least squared error (the least-squares change point). A rolling median alone
    puts the onset half a window before its first flag: earlier when a milder slowness just
    before the shift joins the flagged run, though the shift itself is still plain to see."""
    seg = np.asarray(x[lo:hi + 1], dtype=float)
    fill = np.nanmedian(seg) if np.isfinite(seg).any() else 0.0
    seg = np.where(np.isfinite(seg), seg, fill)
    best, at = np.inf, hi
    for t in range(1, len(seg)):
        a, b = seg[:t], seg[t:]
        if b.mean() <= a.mean():
            continue
        cost = ((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()
        if cost < best:
            best, at = cost, lo + t
    return at


def find_slow_links(can_steps: np.ndarray, lat: np.ndarray, link_from: list[int],
                    step_med: float) -> list[Finding]:
    """lat: (ranks, canaries) receive latency of link link_from[r] -> r."""
    probed = np.isfinite(lat).all(axis=0)  # canaries without collective probes have no latency
    lat, can_steps = lat[:, probed], can_steps[probed]
    if lat.size == 0 or lat.shape[0] < 3:
        return []
    exc = peer_excess(lat)
    with np.errstate(all="ignore"):
        ratio = lat / (lat - exc)
    thr = max(LINK_MIN_FRAC * step_med, 6 * _robust_sigma(exc[:, :DRIFT_BASE_BLOCKS]))
    out = []
    for r in range(lat.shape[0]):
        flag = (exc[r] > thr) & (ratio[r] > 3)
        runs = [(a, b) for a, b in _runs(flag) if b - a >= LINK_PERSIST]
        if not runs:
            continue
        a, b = runs[0]
        s = link_from[r]
        mag = float(np.nanmedian(ratio[r, a:b]))
        out.append(Finding(
            "straggler", "communication", sorted({s, r}), int(can_steps[a]), round(mag - 1, 3),
            f"link rank {s} -> rank {r} is {mag:.1f}x slower than the other links since step "
            f"{int(can_steps[a])} (+{np.nanmedian(exc[r, a:b]) * 1e3:.2f} ms per message)",
            int(can_steps[a + LINK_PERSIST - 1]),
            [(f"ring probe latency {np.nanmedian(lat[r, a:b]) * 1e3:.2f} ms vs median link "
             f"{np.nanmedian(lat[r, a:b] - exc[r, a:b]) * 1e3:.2f} ms")]))
    return out


def cusum(z: np.ndarray, k: float, h: float, cap: float = np.inf, confirm: int = 1,
          level: float = -np.inf) -> tuple[int | None, int]:
    """One-sided CUSUM over z (relative deviations); (alarm index or None, index where it last rose from 0).

    Each point adds at most `cap` (one burst of interference cannot carry a drift alone), and
    the alarm also needs the median of the last `confirm` points to be at least `level` (the
    shift is still there).
    """
    s, start = 0.0, 0
    for i, v in enumerate(z):
        if not np.isfinite(v):
            continue
        if s == 0.0:
            start = i
        s = max(0.0, s + min(v, cap) - k)
        if s > h and (confirm <= 1 or np.nanmedian(z[max(i - confirm + 1, 0): i + 1]) >= level):
            return i, start
    return None, start


def drift_series(values: np.ndarray, steps: np.ndarray, block: int):
    """Block q10 over (ranks x block steps); returns (block values, last step of each block, n per block)."""
    n = values.shape[-1] // block
    if n == 0:
        return np.empty(0), np.empty(0), 0
    v = values[..., : n * block].reshape(*values.shape[:-1], n, block)
    v = np.moveaxis(v, -2, 0).reshape(n, -1)
    with np.errstate(all="ignore"):
        q = np.nanpercentile(v, DRIFT_QUANTILE, axis=1)
    return q, steps[block - 1: n * block: block], v.shape[1]


def drift_test(x: np.ndarray, norm: float | None = None, step_sigma: float = 0.0, per_block: int = 1,
               confirm: int = 4, h_sigma: float = DRIFT_H_SIGMA):
    """CUSUM of x against its first DRIFT_BASE_BLOCKS points; (alarm, start, z, sigma) or None.

    sigma (per block, relative) is the largest of: the spread of the baseline blocks, the
    spread of the individual samples scaled to a block's q25 (`step_sigma`, `per_block`
    samples, x2 because neighbouring steps are correlated), and DRIFT_SIGMA_FLOOR.
    """
    if x.size < DRIFT_BASE_BLOCKS + 2:
        return None
    base = float(np.nanmedian(x[:DRIFT_BASE_BLOCKS]))
    denom = max(base, norm or 0.0)
    if not denom > 0:
        return None
    z = (x - base) / denom
    sigma = max(_robust_sigma(z[:DRIFT_BASE_BLOCKS]), 2 * 1.36 * step_sigma / np.sqrt(max(per_block, 1)),
                DRIFT_SIGMA_FLOOR)
    k = max(DRIFT_K_SIGMA * sigma, DRIFT_MIN / 2)
    h = max(h_sigma * sigma, DRIFT_H_MIN * DRIFT_MIN)
    alarm, start = cusum(z[DRIFT_BASE_BLOCKS:], k, h, cap=max(3 * sigma, 3 * DRIFT_MIN),
                         confirm=confirm, level=max(DRIFT_MIN, 2 * sigma))
    if alarm is None:
        return None
    return alarm + DRIFT_BASE_BLOCKS, start + DRIFT_BASE_BLOCKS, z, sigma


class OnlineDetector:
    """Rank 0's online rules, fed every `detect_interval` steps with what each rank pushed.

    `update` gets a (ranks, len(ONLINE_SIGNALS)) matrix of per-rank window medians and, from
    every rank, the window's per-step rows (ONLINE_ROWS). Stragglers: the offline rule
    (find_stragglers) over the latest steps, so a warning names the same rank, layer and onset
    as `feixing doctor` would, one window at most after the step it would have been detected at.
    Without per-step rows (the all_gather fallback sends only medians) a straggler must be
    flagged in two consecutive windows. Drifts: a CUSUM of the all-rank median against the first
    DRIFT_BASE_BLOCKS windows, with a higher alarm level than offline (ONLINE_*). Each
    (kind, rank, layer) warns once.
    """

    def __init__(self, world_size: int, keep: int = 200):
        from feixing.diagnose.telemetry import ONLINE_SIGNALS
        self.names = ONLINE_SIGNALS
        self.world_size = world_size
        self.keep = keep  # per-step rows kept (the straggler rule looks back 21 steps)
        self.rows: dict[int, np.ndarray] = {}  # step -> (ranks, len(ONLINE_ROWS) - 1)
        self.first_step: int | None = None
        self.flags: dict[tuple, int] = {}
        self.said: set = set()
        self.hist: dict[str, list[float]] = {"data": [], "compute": []}
        self.state: dict[str, list[float]] = {}

    def update(self, step: int, m: np.ndarray, rows: dict[int, np.ndarray] | None = None,
               compute_cpu: bool = False) -> list[str]:
        col = {n: m[:, i] for i, n in enumerate(self.names)}
        step_med = float(np.median(col["step"]))
        msgs = []
        if self.world_size >= 3 and rows is not None:
            msgs += self._stragglers(step, rows, compute_cpu)
        elif self.world_size >= 3 and step_med > 0:
            for layer in ("data", "compute", "gc"):
                exc = peer_excess(col[layer][:, None])[:, 0]
                peer = col[layer] - exc
                hits = minority((exc / step_med > STRAGGLER_MIN_FRAC) & (exc > STRAGGLER_MIN_REL * peer))
                for r in range(self.world_size):
                    hit = bool(hits[r])
                    key = ("straggler", r, layer)
                    self.flags[key] = self.flags.get(key, 0) + 1 if hit else 0
                    if self.flags[key] >= 2 and key not in self.said:
                        self.said.add(key)
                        msgs.append(f"rank {r} is a straggler in {layer}: {exc[r] / max(peer[r], 1e-12):.0%} "
                                    f"slower than its peers (window ending at step {step})")
        for layer in ("data", "compute"):
            # the fastest rank's window median: the lower envelope, as offline
            msg = self._drift(layer, float(np.min(col[layer])), step_med, step)
            if msg:
                msgs.append(msg)
        return msgs

    def _stragglers(self, step: int, rows: dict[int, np.ndarray], compute_cpu: bool) -> list[str]:
        """rows: rank -> (n, len(ONLINE_ROWS)) array, the first column the step number."""
        for r, a in rows.items():
            for row in a:
                if np.isfinite(row[0]):
                    s = int(row[0])
                    self.rows.setdefault(s, np.full((self.world_size, len(ONLINE_ROWS) - 1), np.nan))[r] = row[1:]
        if not self.rows:
            return []
        if self.first_step is None:
            self.first_step = min(self.rows)
        for s in sorted(self.rows)[:-self.keep]:
            del self.rows[s]
        steps = np.array(sorted(self.rows), dtype=np.int64)
        block = np.stack([self.rows[s] for s in steps], axis=2)  # (ranks, fields, steps)
        sig = {name: block[:, i] for i, name in enumerate(ONLINE_ROWS[1:])}
        msgs = []
        for f in find_stragglers(steps, sig, self.first_step, compute_cpu):
            key = ("straggler", f.ranks[0], f.layer)
            if key not in self.said:
                self.said.add(key)
                msgs.append(f"rank {f.ranks[0]} is a straggler in {f.layer}: {f.magnitude:.0%} slower than "
                            f"its peers since step {f.first_step} (detected at step {f.detected_step}, "
                            f"window ending at step {step})")
        return msgs

    def _drift(self, layer: str, v: float, step_med: float, step: int) -> str | None:
        """Incremental CUSUM with the offline rule's slack, cap and confirmation, O(1) per window."""
        h = self.hist[layer]
        h.append(v)
        if len(h) <= DRIFT_BASE_BLOCKS:
            if len(h) == DRIFT_BASE_BLOCKS:
                base = float(np.median(h))
                denom = max(base, 0.1 * step_med)
                sigma = max(_robust_sigma((np.array(h) - base) / denom), DRIFT_SIGMA_FLOOR)
                self.state[layer] = [base, denom, max(DRIFT_K_SIGMA * sigma, DRIFT_MIN / 2),
                                     max(ONLINE_H_SIGMA * sigma, ONLINE_H_MIN * DRIFT_MIN), 0.0,
                                     max(3 * sigma, 3 * DRIFT_MIN), max(ONLINE_DRIFT_MIN, 2 * sigma)]
            return None
        del h[:-4]  # keep only what the confirmation needs
        base, denom, k, hh, cs, cap, level = self.state[layer]
        zs = [(x - base) / denom for x in h]
        cs = max(0.0, cs + min(zs[-1], cap) - k)
        self.state[layer][4] = cs
        key = ("drift", "all", layer)
        if cs > hh and float(np.median(zs)) >= level and key not in self.said:
            self.said.add(key)
            return f"{layer} on every rank drifted {zs[-1]:+.1%} from its early baseline (step {step})"
        return None
