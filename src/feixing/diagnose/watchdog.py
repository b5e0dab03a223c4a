"""Hang watchdog: a per-rank heartbeat file and a thread that names the rank that did not arrive.

The training thread only updates a few attributes at every phase entry and exit (a sequence
number, the step and phase, and a short ring of recent phases); it never touches the disk. A
daemon thread polls every `hang_timeout_s / 5` (at most 5 s), writes that state to
`telemetry/heartbeat/rank-XXXXX.json` once the rank has stayed in one phase (or between two)
for a poll or more, and checks whether the current phase has been open longer than
`hang_timeout_s`. Phases are entered in the same order on every rank (SPMD), so when one rank
stalls, the ranks waiting for it in a collective hold a higher sequence number than the rank
that never arrived. The first rank whose timeout fires writes `telemetry/hang-rank-XXXXX.json`
with every rank's heartbeat and the ranks that are behind, and logs it. The watchdog does not
kill anything: the collective's own timeout still ends the job.

Phases are coarse: with FSDP every rank is inside `forward` while one of them has not reached
an all-gather. So when a hang is reported, every rank's watchdog (the stalled rank's too: its
thread still runs) also writes `telemetry/collectives-rank-XXXXX.json`: the last collectives of
torch's flight recorder (`TORCH_FR_BUFFER_SIZE`, which feixing's launcher sets) with, per
process group, the sequence number of the last collective the rank issued. `collective_laggards`
names the ranks that did not issue the collective the others wait in.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import threading
import time
from collections import deque

log = logging.getLogger("feixing.diagnose")


class Heartbeat:
    """What the training thread updates; plain attributes, so an update costs < 1 us.

    Times are `perf_counter` readings (the phase timer's own, so entering a phase reads no extra
    clock); `snapshot()` turns them into wall-clock times for the files other ranks read."""

    __slots__ = ("open", "phase", "recent", "seq", "step", "t_enter")

    def __init__(self):
        self.seq, self.step, self.phase, self.open, self.t_enter = 0, None, "", False, time.perf_counter()
        self.recent: deque = deque(maxlen=8)

    def enter(self, phase: str, step, t: float | None = None) -> None:
        self.seq += 1
        self.step, self.phase, self.open = step, phase, True
        self.t_enter = t = time.perf_counter() if t is None else t
        self.recent.append((self.seq, step, phase, t))

    def exit(self) -> None:
        self.open = False

    def age(self) -> float:
        """Seconds since the current phase was entered."""
        return time.perf_counter() - self.t_enter

    def snapshot(self) -> dict:
        wall = time.time() - time.perf_counter()  # perf_counter -> wall clock
        return {"seq": self.seq, "step": self.step, "phase": self.phase, "open": self.open,
                "t_enter": self.t_enter + wall,
                "recent": [[q, st, ph, t + wall] for q, st, ph, t in self.recent]}


def laggards(beats: dict[int, dict], world_size: int) -> tuple[list[int], list[int]]:
    """(ranks behind the furthest rank, ranks with no heartbeat) from {rank: snapshot}."""
    missing = [r for r in range(world_size) if r not in beats]
    if not beats:
        return [], missing
    top = max(b["seq"] for b in beats.values())
    return sorted(r for r, b in beats.items() if b["seq"] < top), missing


def last_collectives(n: int = 8) -> dict | None:
    """This rank's flight recorder (torch.distributed): per process group id the sequence number of
    the last collective it issued, and its last `n` collectives; None when the recorder is off
    (TORCH_FR_BUFFER_SIZE unset) or this torch has none. Point-to-point operations are left out:
    their numbers count per pair of ranks."""
    try:
        import torch._C._distributed_c10d as c10d
        d = json.loads(c10d._dump_fr_trace_json(True, False))
    except Exception:  # noqa: BLE001 - no recorder in this build, or no process group
        return None
    entries = [e for e in d.get("entries", []) if not e.get("is_p2p")]
    if not entries:
        return None
    issued: dict[str, int] = {}
    for e in entries:
        pg = e["process_group"][0]
        issued[pg] = max(issued.get(pg, 0), int(e["collective_seq_id"]))
    last = [{"pg": e["process_group"][0], "seq": e["collective_seq_id"], "op": e["profiling_name"],
             "sizes": e.get("input_sizes")} for e in entries[-n:]]
    return {"issued": issued, "last": last}


def collective_laggards(dumps: dict[int, dict]) -> list[dict]:
    """From {rank: last_collectives()}: for every process group where the ranks issued different
    numbers of collectives, the collective the furthest ranks wait in and the ranks that did not
    issue it. A rank that has no entry for a group is not counted (it may not be a member)."""
    out = []
    pgs = sorted({pg for d in dumps.values() for pg in d["issued"]}, key=lambda p: (len(p), p))
    for pg in pgs:
        seqs = {r: d["issued"][pg] for r, d in dumps.items() if pg in d["issued"]}
        top = max(seqs.values())
        behind = sorted(r for r, q in seqs.items() if q < top)
        if not behind or len(seqs) < 2:
            continue
        op = next((e["op"] for d in dumps.values() for e in d["last"] if e["pg"] == pg and e["seq"] == top), "?")
        out.append({"pg": pg, "seq": top, "op": op, "behind": behind,
                    "waiting": sorted(r for r, q in seqs.items() if q == top),
                    "last_seq": seqs})
    return out


class Watchdog:
    """Background thread: persists the heartbeat and reports a hang once per stalled phase."""

    def __init__(self, hb: Heartbeat, tele_dir: str, rank: int, world_size: int, timeout_s: float):
        self.hb, self.rank, self.world_size, self.timeout_s = hb, rank, world_size, timeout_s
        self.dir = os.path.join(tele_dir, "heartbeat")
        self.tele_dir = tele_dir
        os.makedirs(self.dir, exist_ok=True)
        self.poll_s = min(max(timeout_s / 5, 0.05), 5.0)
        self._stop = threading.Event()
        self._written = None
        self._reported_seq = -1
        self._dumped = False
        self.cpu_s = 0.0  # this thread's CPU time, set when it stops (telemetry's cost off the step)
        self.reports: list[dict] = []
        self._thread = threading.Thread(target=self._loop, name=f"feixing-watchdog-{rank}", daemon=True)
        self._thread.start()

    def _path(self, rank: int) -> str:
        return os.path.join(self.dir, f"rank-{rank:05d}.json")

    def write(self) -> None:
        snap = self.hb.snapshot()
        key = (snap["seq"], snap["open"])
        if key == self._written:
            return
        snap["time"] = time.time()
        tmp = self._path(self.rank) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(snap, f)
        os.replace(tmp, self._path(self.rank))
        self._written = key

    def read_all(self) -> dict[int, dict]:
        beats = {}
        for r in range(self.world_size):
            try:
                with open(self._path(r)) as f:
                    beats[r] = json.load(f)
            except (OSError, ValueError):
                continue
        return beats

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                hb = self.hb
                # Persist only when this rank has stayed in one phase (or between two) for a poll
                # or more: phases that flow need no file (writes at every poll were most of this
                # thread's CPU time), and a stall is on disk within 2 polls, before any timeout
                # (at least 5 polls) fires.
                if hb.age() >= self.poll_s:
                    self.write()
                if hb.open and hb.seq != self._reported_seq and hb.age() > self.timeout_s:
                    self._reported_seq = hb.seq
                    self.report()
                if not self._dumped and glob.glob(os.path.join(self.tele_dir, "hang-rank-*.json")):
                    self.dump_collectives()  # a hang somewhere: what this rank issued last
            except Exception as e:  # noqa: BLE001 - a watchdog must never kill training
                log.debug("watchdog: %s", e)
        self.cpu_s = time.thread_time()  # every error is caught above: the loop ends only on close()

    def dump_collectives(self) -> dict | None:
        self._dumped = True
        coll = last_collectives()
        if coll is not None:
            coll.update(rank=self.rank, time=time.time())
            path = os.path.join(self.tele_dir, f"collectives-rank-{self.rank:05d}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(coll, f)
            os.replace(path + ".tmp", path)
        return coll

    def report(self) -> dict:
        self.write()
        time.sleep(self.poll_s)  # let the peers' watchdogs persist their latest state
        beats = self.read_all()
        behind, missing = laggards(beats, self.world_size)
        hb = self.hb
        rep = {"reporter": self.rank, "time": time.time(), "timeout_s": self.timeout_s,
               "step": hb.step, "phase": hb.phase, "seq": hb.seq,
               "behind": behind, "missing": missing, "heartbeats": {str(r): b for r, b in beats.items()}}
        path = os.path.join(self.tele_dir, f"hang-rank-{self.rank:05d}.json")
        with open(path, "w") as f:
            json.dump(rep, f, indent=1)
        self.reports.append(rep)
        mine = self.dump_collectives()
        if mine and mine["last"]:
            e = mine["last"][-1]
            log.error("HANG: rank %d's last collective: %s #%d of process group %s (`feixing doctor` "
                      "compares every rank's)", self.rank, e["op"], e["seq"], e["pg"])
        names = behind + missing
        if names:
            detail = "; ".join(f"rank {r}: last phase {beats[r]['phase']!r} of step {beats[r]['step']}"
                               for r in behind)
            log.error("HANG: rank %d waited %.0f s in %r of step %s; rank(s) %s did not arrive (%s)%s",
                      self.rank, self.timeout_s, hb.phase, hb.step, names, detail,
                      f"; no heartbeat from {missing}" if missing else "")
        else:
            log.error("HANG: every rank has been inside %r of step %s for over %.0f s; no rank is "
                      "behind at phase granularity", hb.phase, hb.step, self.timeout_s)
        return rep

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.write()
        except OSError:
            pass
