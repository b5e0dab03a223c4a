"""`feixing doctor RUN_DIR`: read a run's telemetry, run every detector, print the verdict first.

    findings = diagnose_run(run_dir)      # list[Finding]
    print(render_text(findings, data))    # verdict, then evidence
    render_html(findings, data)           # one self-contained page with inline SVG plots
    doctor_main(run_dir, json=True)       # what the CLI calls; returns the exit code
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from feixing.diagnose.detect import Finding, find_slow_links, find_stragglers
from feixing.diagnose.drift import combine, find_drifts, find_spikes
from feixing.diagnose.html_report import render_html
from feixing.diagnose.telemetry import COMPUTE_PHASES
from feixing.diagnose.watchdog import collective_laggards


@dataclass
class RunData:
    """A run's telemetry as arrays: rows are ranks, columns steps (or canaries); NaN = missing."""

    world_size: int
    steps: np.ndarray
    sig: dict[str, np.ndarray]
    can_steps: np.ndarray
    can: dict[str, np.ndarray]
    link_from: list[int]
    hangs: list[dict] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    collectives: dict[int, dict] = field(default_factory=dict)  # rank -> watchdog.last_collectives()


def load_run(run_dir: str) -> RunData:
    tdir = os.path.join(run_dir, "telemetry")
    files = sorted(glob.glob(os.path.join(tdir, "rank-*.jsonl")))
    if not files:
        raise FileNotFoundError(f"no telemetry in {tdir}: run training with [telemetry] enabled = true "
                                f"and pass the run's directory (run.dir)")
    recs, cans, meta = {}, {}, []
    for path in files:
        rank = int(os.path.basename(path)[5:10])
        recs[rank], cans[rank] = {}, {}
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                t = r.get("type")
                if t == "step":
                    recs[rank][r["step"]] = r  # a resumed run overwrites the replayed steps
                elif t == "canary":
                    cans[rank][r["step"]] = r
                elif t == "meta":
                    meta.append(r)
    world = max([m["world_size"] for m in meta] + [max(recs) + 1])
    steps = np.array(sorted({s for d in recs.values() for s in d}), dtype=np.int64)
    col = {s: i for i, s in enumerate(steps)}
    phases = {p for d in recs.values() for r in d.values() for p in r["ph"]}
    cpus = {p for d in recs.values() for r in d.values() for p in r.get("cpu", {})}
    names = phases | {f"cpu_{p}" for p in cpus} | {"gc", "step", "sched"}
    sig = {n: np.full((world, len(steps)), np.nan) for n in names}
    for rank, d in recs.items():
        for s, r in d.items():
            j = col[s]
            sig["step"][rank, j] = r["step_s"]
            sig["gc"][rank, j] = r["gc_s"]
            sig["sched"][rank, j] = r.get("sched_s", 0.0)
            for p in phases:
                sig[p][rank, j] = r["ph"].get(p, 0.0)
            for p in cpus:
                sig[f"cpu_{p}"][rank, j] = r.get("cpu", {}).get(p, 0.0)
    missing = np.isnan(sig["step"])
    sig["compute_wall"] = sum(np.nan_to_num(sig[p]) for p in COMPUTE_PHASES if p in sig) + 0 * sig["step"]
    # Compute is measured where it runs: host CPU time on CPU devices (robust to other processes
    # taking the core), wall time otherwise.
    src = [f"cpu_{p}" for p in COMPUTE_PHASES if f"cpu_{p}" in sig] or [p for p in COMPUTE_PHASES if p in sig]
    sig["compute"] = sum(np.nan_to_num(sig[p]) for p in src) + 0 * sig["step"] if src \
        else np.zeros_like(sig["step"])
    sig["compute"][missing] = np.nan
    can_steps = np.array(sorted({s for d in cans.values() for s in d}), dtype=np.int64)
    cc = {s: i for i, s in enumerate(can_steps)}
    keys = {k for d in cans.values() for r in d.values() for k, v in r.items()
            if isinstance(v, (int, float)) and k not in ("step", "link_from")}
    can = {k: np.full((world, len(can_steps)), np.nan) for k in keys}
    link_from = [(r - 1) % world for r in range(world)]
    for rank, d in cans.items():
        for s, r in d.items():
            for k in keys:
                if k in r:
                    can[k][rank, cc[s]] = r[k]
            if "link_from" in r:
                link_from[rank] = r["link_from"]
    hangs, colls = [], {}
    for path in sorted(glob.glob(os.path.join(tdir, "hang-rank-*.json"))):
        with open(path) as f:
            hangs.append(json.load(f))
    for path in sorted(glob.glob(os.path.join(tdir, "collectives-rank-*.json"))):
        with open(path) as f:
            c = json.load(f)
        colls[int(c["rank"])] = c
    return RunData(world, steps, sig, can_steps, can, link_from, hangs, meta, colls)


def hang_findings(hangs: list[dict], colls: dict[int, dict] | None = None) -> list[Finding]:
    if not hangs:
        return []
    behind = sorted({r for h in hangs for r in h["behind"] + h["missing"]})
    h0 = min(hangs, key=lambda h: h["time"])
    waiting = sorted({h["reporter"] for h in hangs})
    beats = h0["heartbeats"]
    lag = collective_laggards(colls) if colls else []
    if lag:  # collective granularity (the flight recorder): names a rank even inside one phase
        g = lag[0]
        behind = sorted({r for x in lag for r in x["behind"]})
        last = "; ".join(f"rank {r} issued {x['last_seq'][r]} collectives on process group {x['pg']}, "
                         f"the others {x['seq']}" for x in lag for r in x["behind"])
        summ = (f"hang: rank{'s' if len(behind) > 1 else ''} {', '.join(map(str, behind))} did not arrive "
                f"at {g['op']} #{g['seq']} of process group {g['pg']}; ranks {g['waiting']} waited in it "
                f"(in {h0['phase']!r} of step {h0['step']}) over {h0['timeout_s']:.0f} s")
    elif behind:
        last = "; ".join(f"rank {r} last entered {beats[str(r)]['phase']!r} of step {beats[str(r)]['step']}"
                         for r in behind if str(r) in beats)
        summ = (f"hang: rank{'s' if len(behind) > 1 else ''} {', '.join(map(str, behind))} did not arrive "
                f"at {h0['phase']!r} of step {h0['step']}; ranks {waiting} waited over {h0['timeout_s']:.0f} s")
    else:
        last = ""
        summ = (f"hang: every rank stayed in {h0['phase']!r} of step {h0['step']} for over "
                f"{h0['timeout_s']:.0f} s; no rank is behind at phase granularity")
    ev = [last] if last else []
    for r, c in sorted((colls or {}).items()):
        ev.append(f"rank {r} last collectives (process group, #, op): "
                  + ", ".join(f"({e['pg']}, {e['seq']}, {e['op']})" for e in c["last"][-3:]))
    for r, b in sorted(beats.items(), key=lambda kv: int(kv[0])):
        ev.append(f"rank {r} recent phases (seq, step, phase): "
                  + ", ".join(f"({s}, {st}, {p})" for s, st, p, _ in b["recent"][-4:]))
    step = int(h0["step"]) if h0["step"] is not None else 0
    return [Finding("hang", "communication", behind, step, float(h0["timeout_s"]), summ, step, ev)]


def diagnose(data: RunData) -> list[Finding]:
    if data.steps.size == 0:
        return hang_findings(data.hangs, data.collectives)
    stragglers = find_stragglers(data.steps, data.sig)
    step_med = float(np.nanmedian(data.sig["step"]))
    links = find_slow_links(data.can_steps, data.can["link_lat_s"], data.link_from, step_med) \
        if "link_lat_s" in data.can else []
    drifts = find_drifts(data.steps, data.sig, data.can_steps, data.can)
    spikes = find_spikes(data.steps, data.sig)
    return combine(stragglers, links, drifts, spikes, hang_findings(data.hangs, data.collectives))


def diagnose_run(run_dir: str) -> list[Finding]:
    """Every finding for the run in `run_dir` (the run.dir that holds telemetry/)."""
    return diagnose(load_run(run_dir))


def render_text(findings: list[Finding], data: RunData | None = None) -> str:
    lines = []
    if not findings:
        lines.append("Verdict: no straggler, drift, event spike or hang found.")
    else:
        lines.append("Verdict:")
        lines += [f"  {i + 1}. {f.summary}" for i, f in enumerate(findings)]
    if data is not None and data.steps.size:
        st = np.nanmedian(data.sig["step"], axis=0)
        lines.append("")
        lines.append(f"Run: {data.world_size} ranks, steps {int(data.steps[0])}-{int(data.steps[-1])}, "
                     f"median step {np.nanmedian(st) * 1e3:.1f} ms")
        share = {p: float(np.nanmedian(v)) for p, v in data.sig.items() if p != "step"}
        tot = float(np.nanmedian(st)) or 1.0
        lines.append("Phase medians: " + ", ".join(f"{p} {v * 1e3:.2f} ms ({v / tot:.0%})"
                                                   for p, v in sorted(share.items()) if v > 0))
    for i, f in enumerate(findings):
        lines.append("")
        lines.append(f"Evidence for {i + 1} [{f.kind}, layer {f.layer}, ranks {f.ranks or 'all'}, "
                     f"from step {f.first_step}, detected at step {f.detected_step}]:")
        lines += [f"  - {e}" for e in f.evidence]
    return "\n".join(lines)


def doctor_main(run_dir: str, json: bool = False, html: str | None = None) -> int:
    """`feixing doctor RUN_DIR [--json] [--html OUT]`; returns 0 (healthy), 1 (findings), 2 (no telemetry)."""
    import json as _json
    try:
        data = load_run(run_dir)
    except FileNotFoundError as e:
        print(f"feixing doctor: {e}", file=sys.stderr)
        return 2
    findings = diagnose(data)
    if json:
        keys = ("kind", "layer", "ranks", "first_step", "magnitude", "summary", "detected_step", "evidence")
        print(_json.dumps({"findings": [{k: getattr(f, k) for k in keys} for f in findings]}, indent=1))
    else:
        print(render_text(findings, data))
    if html:
        with open(html, "w") as fh:
            fh.write(render_html(findings, data))
        if not json:
            print(f"\nwrote {html}")
    return 1 if findings else 0
