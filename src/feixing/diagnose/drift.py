"""Drift and spike detection over a whole run, and the rules that merge all findings into a verdict.

Drift: for each layer's time per step (data, compute = forward + backward + optimizer, gc,
exposed comm) and every canary, for all ranks pooled and each rank alone, a CUSUM against an
early baseline (detect.drift_test), on low quantiles: step signals as the q10 of each block of
steps; canaries as the minimum over ranks (every rank) or the rolling minimum of the last
CANARY_FLOOR_RANK canaries (one rank). Interference from other processes only adds time, so
the lower envelope moves when the work itself got slower, not when a neighbour got busy. One
finding per (scope, layer). A compute drift is labelled `dispatch` when the dispatch canary (a
fixed sequence of tiny operators, which no model change affects) rose by at least half as
much or drifted too: on CPU, host dispatch and compute cannot be told apart otherwise.

Spikes: a step over SPIKE_RATIO x its rolling median is attributed to the known event whose
phase explains at least half of the excess (checkpoint, gc, data).
"""

from __future__ import annotations

import numpy as np

from feixing.diagnose.detect import (
    DRIFT_BASE_BLOCKS,
    DRIFT_BLOCK,
    DRIFT_H_SIGMA,
    DRIFT_MIN,
    DRIFT_WARMUP,
    LAYER_OF,
    SPIKE_RATIO,
    SPIKE_RATIO_NOISY,
    SPIKE_REF,
    Finding,
    _robust_sigma,
    drift_series,
    drift_test,
    rolling,
)

# compute = forward + backward + optimizer (CPU time on CPU devices): one test per scope, not three
DRIFT_SIGNALS = ("data", "compute", "gc", "comm")
# signal -> smallest growth worth a finding; on CPU the dispatch canary's CPU time replaces its wall time.
# Dispatch: 1.5%, above the canary's noise between canaries (+-1% with every rank's minimum); 1% gave
# 2 false alarms in 10,000 clean steps, 2% lost 5 of 40 drifts (evaluation runs, docs/BENCHMARKS.md).
CANARY_DRIFT = {"dispatch_s": 1.5 * DRIFT_MIN, "rss_mb": 0.10}
COMM_DRIFT_MIN = 0.50  # exposed comm wait mirrors everyone else's noise: only large growth ...
COMM_H_SIGMA = 10.0  # ... and a higher CUSUM alarm level (other processes' load moved it 26-70%)
RANK_DRIFT_MIN = 0.05  # one rank alone: more series, more noise; smaller ones surface as stragglers
# Compute time that drifts while the dispatch canary stays flat is the work or the host getting
# slower; a shared host's own speed wanders by 3-10% over minutes (clean evaluation runs), so
# only a large one is reported. With the canary rising too it is a dispatch drift, from 1.5%.
COMPUTE_DRIFT_MIN = 0.10
# Canaries in the rolling minimum a canary drift is tested on. Every rank: 1 (none), the
# minimum over ranks of canaries that are each the minimum of 3 warm repeats is steady enough,
# and a longer minimum delays a rising drift by CANARY_FLOOR - 1 canaries (evaluation pilot:
# 16/20 drifts found with 1, 12/20 with 2). One rank alone: 4, its single canary is noisier.
CANARY_FLOOR = 1
CANARY_FLOOR_RANK = 4
_WHAT = {"data": "waiting for data", "compute": "compute time", "dispatch": "host dispatch latency",
         "gc": "GC pause time", "communication": "exposed communication wait", "memory": "resident memory"}


def _who(scope) -> str:
    return "every rank" if scope == "all" else f"rank {scope}"


def find_drifts(steps: np.ndarray, sig: dict, can_steps: np.ndarray, can: dict) -> list[Finding]:
    warm = int(np.searchsorted(steps, steps[0] + DRIFT_WARMUP)) if steps.size else 0
    steps_w = steps[warm:]
    step_base = float(np.nanmedian(sig["step"][:, warm:warm + DRIFT_BASE_BLOCKS * DRIFT_BLOCK])) \
        if steps_w.size else 0.0
    n_ranks = sig["step"].shape[0]
    raw = []  # (scope, layer, signal, first_step, detected_step, final_z)
    for name in DRIFT_SIGNALS:
        if name not in sig:
            continue
        x = sig[name][:, warm:]
        # Exposed comm wait of one rank is a symptom of the others; only the pooled one is a signal.
        scopes = ["all"] if name == "comm" else ["all"] + list(range(n_ranks))
        for scope in scopes:
            vals = x if scope == "all" else x[scope:scope + 1]
            q, bsteps, per = drift_series(vals, steps_w, DRIFT_BLOCK)
            if q.size == 0:
                continue
            b = vals[:, :DRIFT_BASE_BLOCKS * DRIFT_BLOCK]
            bm = np.nanmedian(b)
            step_sigma = _robust_sigma((b - bm).ravel()) / max(bm, 0.1 * step_base) if bm > 0 else 0.0
            res = drift_test(q, norm=0.1 * step_base, step_sigma=step_sigma, per_block=per,
                             h_sigma=COMM_H_SIGMA if name == "comm" else DRIFT_H_SIGMA)
            if res is not None:
                alarm, start, z, _ = res
                final = float(np.nanmedian(z[-3:]))
                if final >= (COMM_DRIFT_MIN if name == "comm" else DRIFT_MIN if scope == "all" else RANK_DRIFT_MIN):
                    # offline, a slowdown that went away again is not a drift
                    raw.append((scope, LAYER_OF[name], name, int(bsteps[start] - DRIFT_BLOCK + 1),
                                int(bsteps[alarm]), final))
    can_final = {}
    on_cpu = "dispatch_cpu_s" in can  # CPU devices: the canaries' CPU time replaces their wall time
    tests = [("dispatch_cpu_s" if on_cpu else "dispatch_s", CANARY_DRIFT["dispatch_s"]),
             ("rss_mb", CANARY_DRIFT["rss_mb"]),
             ("reference_cpu_s" if on_cpu else "reference_s", None)]  # the host reference: evidence only
    for name, floor in tests:
        if name not in can or can[name].size == 0:
            continue
        m = can[name]
        keep = can_steps >= steps[0] + DRIFT_WARMUP if steps.size else np.ones(len(can_steps), bool)
        m, cs = m[:, keep], can_steps[keep]
        for scope in ["all"] + list(range(n_ranks)):
            w = CANARY_FLOOR if scope == "all" else CANARY_FLOOR_RANK
            series = _floor(np.nanmin(m, axis=0) if scope == "all" else m[scope], w)
            if series.size > DRIFT_BASE_BLOCKS:
                base = np.nanmedian(series[:DRIFT_BASE_BLOCKS])
                can_final[(scope, name)] = float(np.nanmedian(series[-3:]) / base - 1) if base > 0 else 0.0
            if floor is None:
                continue
            res = drift_test(series, confirm=2 * w)
            if res is not None:
                alarm, start, z, _ = res
                final = float(np.nanmedian(z[-3:]))
                if final >= (floor if scope == "all" else max(floor, RANK_DRIFT_MIN)):
                    raw.append((scope, LAYER_OF[name], name, int(cs[start]), int(cs[alarm]), final))
    return _merge_drifts(raw, can_final, steps, n_ranks)


def _floor(x: np.ndarray, w: int) -> np.ndarray:
    """Causal rolling minimum: the least disturbed of the last w canaries (interference only adds time)."""
    out = x.astype(float).copy()
    for i in range(1, w):
        out[i:] = np.fmin(out[i:], x[:-i])
    return out


def _merge_drifts(raw: list, can_final: dict, steps: np.ndarray, n_ranks: int) -> list[Finding]:
    """One finding per (scope, layer). On CPU host dispatch is part of compute, so a compute drift
    goes under dispatch when the dispatch canary also rose (at least half as much), or drifted at
    the same scope or on every rank. A layer drifting on most ranks alone is a drift on every rank."""
    scopes_of = {}
    for scope, layer, *_ in raw:
        scopes_of.setdefault(layer, set()).add(scope)
    by = {}
    for scope, layer, name, first, det, final in raw:
        if layer == "compute":
            disp = max(can_final.get((scope, "dispatch_s"), 0.0), can_final.get((scope, "dispatch_cpu_s"), 0.0))
            disp_scopes = scopes_of.get("dispatch", ())
            if disp >= max(0.5 * final, DRIFT_MIN / 2) or scope in disp_scopes or "all" in disp_scopes:
                layer = "dispatch"  # dispatch slowing on every rank explains compute slowing anywhere
        ranks_here = scopes_of.get(layer, set()) - {"all"}
        if scope != "all" and 2 * len(ranks_here) > n_ranks:
            name, scope = f"{name} (rank {scope})", "all"  # most ranks drift alike: the cluster drifts
        by.setdefault((scope, layer), []).append((name, first, det, final))
    out = []
    for (scope, layer), items in by.items():
        if scope != "all" and ("all", layer) in by:
            continue  # one rank's share of a drift every rank has
        if layer == "compute" and max(i[3] for i in items) < COMPUTE_DRIFT_MIN:
            continue
        first = min(i[1] for i in items)
        det = min(i[2] for i in items)
        mag = float(np.median([i[3] for i in items]))
        last = int(steps[-1]) if steps.size else det
        summ = (f"{_WHAT.get(layer, layer)} on {_who(scope)} grew {mag:.0%} between steps {first} and "
                f"{last}")
        ev = [f"{n}: {f:+.1%} vs the early baseline, CUSUM alarm at step {d}" for n, _, d, f in items]
        ref = can_final.get((scope, "reference_cpu_s"), can_final.get((scope, "reference_s")))
        if layer == "dispatch" and ref is not None and np.isfinite(ref):
            # A plain-Python loop timed next to each dispatch canary (probes.py): if it slowed as
            # well, the core itself runs slower (a busy host, a lower clock), not only the dispatch path.
            core = ref >= 0.5 * mag
            summ += (f" (a plain-Python reference on the same cores slowed {ref:.0%} too: the host's CPU "
                     "runs slower, not only operator dispatch)" if core else "")
            ev.append(f"host reference (plain Python, no torch) {ref:+.1%} vs the early baseline: "
                      + ("the core itself slowed" if core else "the core did not slow; the dispatch path did"))
        ranks = [] if scope == "all" else [scope]
        out.append(Finding("drift", layer, ranks, first, round(mag, 4), summ, det, ev))
    return out


def find_spikes(steps: np.ndarray, sig: dict) -> list[Finding]:
    """Slow steps explained by a known event, one finding per (event, ranks that caused it)."""
    # The job's step is its slowest rank's: a rank that stalls makes its own step long at once,
    # while its peers only wait for it in their next step's collective.
    st = np.nanmax(sig["step"], axis=0)
    ref = np.concatenate([[np.nan], rolling(st, SPIKE_REF)[:-1]])
    for t in range(5, min(SPIKE_REF + 1, st.size)):  # early steps: median of what exists so far
        ref[t] = np.nanmedian(st[:t])
    spikes = np.flatnonzero(st > SPIKE_RATIO * ref)
    groups: dict[tuple, list] = {}
    unexplained = 0
    for t in spikes:
        excess = st[t] - ref[t]
        best, best_v, ranks = None, 0.0, ()
        for name in ("checkpoint", "gc", "data"):
            if name not in sig:
                continue
            base = 0.0 if name == "checkpoint" or t == 0 else np.nanmedian(sig[name][:, max(t - SPIKE_REF, 0):t])
            e = np.nan_to_num(sig[name][:, t] - (base if np.isfinite(base) else 0.0))
            if e.max() > best_v:
                best, best_v, ranks = name, float(e.max()), tuple(int(r) for r in np.flatnonzero(e >= 0.5 * e.max()))
        noisy = best != "checkpoint" and st[t] < SPIKE_RATIO_NOISY * ref[t]
        if best is None or best_v < 0.5 * excess or noisy:
            unexplained += 1
            continue
        groups.setdefault((best, ranks), []).append((int(steps[t]), excess / ref[t], best_v))
    out = []
    for (name, ranks), items in groups.items():
        mags = [i[1] for i in items]
        if name != "checkpoint" and len(items) < 2 and max(mags) < 2.0:
            continue  # one small gc or data hiccup is noise, not a finding
        at = ", ".join(str(i[0]) for i in items[:6]) + (" ..." if len(items) > 6 else "")
        what = {"checkpoint": "checkpoint blocking", "gc": "GC pauses", "data": "data waits"}[name]
        mag = float(np.median(mags))
        summ = (f"{what} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} made "
                f"{len(items)} step{'s' if len(items) > 1 else ''} {1 + mag:.1f}x slower than normal "
                f"(steps {at})")
        ev = [f"step {s}: +{m:.0%} of a step, {v * 1e3:.1f} ms in {name}" for s, m, v in items[:10]]
        if unexplained:
            ev.append(f"{unexplained} other slow step(s) had no known cause (machine noise)")
        out.append(Finding("spike", LAYER_OF[name], list(ranks), items[0][0], round(mag, 3), summ, items[0][0], ev))
    return sorted(out, key=lambda f: f.first_step)


def combine(stragglers: list[Finding], links: list[Finding], drifts: list[Finding],
            spikes: list[Finding], hangs: list[Finding]) -> list[Finding]:
    """Drop findings another finding explains, and order them: hangs, stragglers, drifts, spikes."""
    slow = {(r, f.layer) for f in stragglers for r in f.ranks}
    keep_drifts = []
    for f in drifts:
        if f.layer == "communication" and (stragglers or links):
            continue  # others waiting for a straggler or a slow link show up as a comm drift
        if f.ranks and all((r, f.layer) in slow for r in f.ranks):
            continue  # a straggler is the more specific finding
        keep_drifts.append(f)
    keep_spikes = [f for f in spikes if not (f.ranks and all((r, f.layer) in slow for r in f.ranks))]
    out = hangs + sorted(stragglers + links, key=lambda f: f.detected_step or 0) + \
        sorted(keep_drifts, key=lambda f: f.detected_step or 0) + keep_spikes
    return out
