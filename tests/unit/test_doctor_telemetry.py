"""Telemetry in one process: records, GC accounting, canaries, faults, the hang watchdog, doctor output."""

import gc
import json
import logging
import os
import time

import pytest

from feixing.config.schema import FaultConfig, TelemetryConfig
from feixing.diagnose import Telemetry
from feixing.diagnose.faults import FaultInjector, check_faults
from feixing.diagnose.report import doctor_main, hang_findings, load_run
from feixing.diagnose.sim import run_loop
from feixing.diagnose.watchdog import Heartbeat, Watchdog, collective_laggards, laggards
from tests.unit.test_doctor_detect import write_run

CFG = {"canary_interval": 5, "probe_interval": 0, "online_detect": False, "hang_timeout_s": 0}


def test_records_phases_gc_and_canaries(tmp_path):
    tele = Telemetry(TelemetryConfig(**CFG), run_dir=str(tmp_path))
    for step in range(1, 11):
        with tele.phase("data"):
            time.sleep(0.001)
        with tele.phase("forward"):
            if step == 3:
                junk = [[i] for i in range(100_000)]  # a real GC pause inside forward
                gc.collect()
                del junk
        tele.end_step(step)
    tele.close()
    data = load_run(str(tmp_path))
    assert data.steps.tolist() == list(range(1, 11)) and data.can_steps.tolist() == [5, 10]
    gc3 = data.sig["gc"][0, 2]
    assert gc3 > 0.001 and data.sig["gc"][0, 0] == 0.0  # 100k objects take well over 1 ms to traverse
    assert data.sig["forward"][0, 2] < gc3  # the pause is reported as gc, not as forward
    assert data.sig["data"][0, 0] >= 0.001 and "cpu_forward" in data.sig
    assert data.can["dispatch_s"][0, 0] > 0 and data.can["rss_mb"][0, 0] > 10
    assert not tele._buf and not gc.callbacks.count(tele._on_gc)


def test_disabled_telemetry_writes_nothing(tmp_path):
    tele = Telemetry(TelemetryConfig(enabled=False), run_dir=str(tmp_path))
    with tele.phase("forward"):
        pass
    tele.end_step(1)
    tele.close()
    assert not os.path.exists(tmp_path / "telemetry")


def test_slow_data_fault_is_applied_and_logged(tmp_path, caplog):
    faults = [FaultConfig(kind="slow_data", ranks=[0], start_step=11, magnitude=1.0)]
    with caplog.at_level(logging.WARNING, logger="feixing.diagnose"):
        tele = Telemetry(TelemetryConfig(**CFG), faults=faults, run_dir=str(tmp_path))
        for step in range(1, 21):
            with tele.phase("data"):
                time.sleep(0.002)
            tele.end_step(step)
        tele.close()
    assert "FAULT INJECTION ON" in caplog.text and "FAULT ACTIVE: slow_data on rank 0 from step 11" in caplog.text
    d = load_run(str(tmp_path)).sig["data"][0]
    # +1.0 x the recent step time (~2 ms): data at least 1.7x its pre-fault median (sleep jitter)
    assert sorted(d[11:])[4] > 1.7 * sorted(d[:10])[5]


def test_fault_config_errors_name_the_entry():
    with pytest.raises(ValueError, match=r"faults\[0\].kind = 'slow' is unknown"):
        check_faults([FaultConfig(kind="slow")])
    assert FaultInjector([FaultConfig(kind="slow_rank", ranks=[1])], 0, 4).faults == []


def test_watchdog_names_the_rank_that_did_not_arrive(tmp_path):
    hb = Heartbeat()
    for phase in ("data", "forward", "backward"):
        hb.enter(phase, 7)
        hb.exit()
    hb.enter("comm", 7)  # rank 0 waits in a collective
    late = {"seq": 3, "step": 7, "phase": "backward", "open": False, "t_enter": time.time(),
            "recent": [[3, 7, "backward", 0.0]]}
    os.makedirs(tmp_path / "heartbeat")
    (tmp_path / "heartbeat" / "rank-00001.json").write_text(json.dumps(late))
    wd = Watchdog(hb, str(tmp_path), rank=0, world_size=2, timeout_s=0.2)
    deadline = time.time() + 5
    while not wd.reports and time.time() < deadline:
        time.sleep(0.05)
    t_watch = time.thread_time()
    wd.close()
    assert wd.reports and wd.reports[0]["behind"] == [1]
    # the thread's own CPU time (wrote heartbeats, read both, wrote the report), not this thread's
    assert 0 < wd.cpu_s < t_watch
    rep = json.loads((tmp_path / "hang-rank-00000.json").read_text())
    f = hang_findings([rep])[0]
    assert (f.kind, f.ranks, f.first_step) == ("hang", [1], 7) and "rank 1 did not arrive at 'comm'" in f.summary
    assert laggards({0: {"seq": 5}, 1: {"seq": 5}}, 3) == ([], [2])
    # heartbeat times are perf_counter readings; the files other ranks read carry wall-clock times
    # ("comm" was entered before the watchdog's wait of at most 5 s above; a perf_counter value
    # left unconverted would be off by decades)
    snap = hb.snapshot()
    assert abs(snap["t_enter"] - time.time()) < 5 and abs(snap["recent"][-1][3] - time.time()) < 5


def test_hang_inside_one_phase_is_named_from_the_collectives():
    """Every rank is in 'forward' (FSDP all-gathers run inside it), so the heartbeats name nobody;
    the flight recorder's per-group counts show rank 2 never issued the all-gather #41 the others
    wait in. A group only some ranks have entries for is compared among those."""
    def dump(seq0, seq1=None):
        d = {"issued": {"0": seq0},
             "last": [{"pg": "0", "seq": q, "op": "nccl:_allgather_base", "sizes": [[8]]} for q in (seq0 - 1, seq0)]}
        if seq1 is not None:
            d["issued"]["3"] = seq1
        return d
    colls = {0: dump(41, 7), 1: dump(41, 7), 2: dump(40), 3: dump(41)}
    lag = collective_laggards(colls)
    assert [(x["pg"], x["seq"], x["op"], x["behind"], x["waiting"]) for x in lag] == \
        [("0", 41, "nccl:_allgather_base", [2], [0, 1, 3])]
    beat = {"seq": 9, "step": 5, "phase": "forward", "open": True, "t_enter": 0.0, "recent": []}
    rep = {"reporter": 0, "time": 1.0, "timeout_s": 600.0, "step": 5, "phase": "forward", "seq": 9,
           "behind": [], "missing": [], "heartbeats": {str(r): beat for r in range(4)}}
    f = hang_findings([rep])[0]
    assert f.ranks == [] and "no rank is behind at phase granularity" in f.summary
    f = hang_findings([rep], colls)[0]
    assert f.ranks == [2] and f.summary.startswith(
        "hang: rank 2 did not arrive at nccl:_allgather_base #41 of process group 0; ranks [0, 1, 3] waited in it")
    assert collective_laggards({0: dump(5), 1: dump(5)}) == []


def test_ab_blocks_switch_telemetry_and_cpu_clock_is_read_for_compute_only(tmp_path):
    out = run_loop(0, 1, str(tmp_path), 16, data_s=0.0, ckpt_every=0, ab_block=2)
    assert out["ab_on"] == ([True] * 2 + [False] * 4 + [True] * 2) * 2 and len(out["ab_walls"]) == 16
    recs = [json.loads(x) for x in (tmp_path / "telemetry" / "rank-00000.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))  # telemetry numbers the steps it sees
    assert {tuple(sorted(r["cpu"])) for r in steps} == {("backward", "forward", "optimizer")}
    assert set(steps[0]["ph"]) == {"data", "forward", "backward", "comm", "optimizer"}


def test_adjacent_compute_phases_share_one_cpu_clock_reading(tmp_path):
    """Gradient accumulation's forward, backward, forward, backward reads the CPU-time clock 5
    times, not 8: each compute phase's exit reading starts the next one. A GC pause or a
    non-compute phase in between, or the end of the step, starts a fresh reading."""
    reads = []

    def clock():  # each read is one tick later than the last
        reads.append(len(reads))
        return float(len(reads) - 1)

    tele = Telemetry(TelemetryConfig(**{**CFG, "canary_interval": 0}), run_dir=str(tmp_path))
    tele._cpu_clock = clock
    for name in ("forward", "backward", "forward", "backward", "comm", "optimizer"):
        with tele.phase(name):
            pass
    assert len(reads) == 5 + 2 and tele._cpu == {"forward": 2.0, "backward": 2.0, "optimizer": 1.0}
    tele.end_step(1)
    with tele.phase("forward"):
        pass
    tele._on_gc("start", {})  # a collection between two compute phases: not part of either
    tele._on_gc("stop", {})
    with tele.phase("backward"):
        pass
    assert len(reads) == 7 + 4 and tele._cpu == {"forward": 1.0, "backward": 1.0}
    tele.close()


def test_trainer_ab_stand_in_switches_every_block_and_records_cpu(tmp_path):
    from benchmarks.trainer_tele_ab import ABTelemetry

    ab = ABTelemetry(TelemetryConfig(**CFG), 1, str(tmp_path / "walls"), run_dir=str(tmp_path), rank=0, world_size=1)
    for step in range(1, 9):
        with ab.phase("forward"):
            sum(range(20000))  # some CPU time for the thread clock
        ab.end_step(step)
    ab.close()
    out = json.loads((tmp_path / "walls.0").read_text())
    assert out["ab_on"] == [True, False, False, True] * 2 and len(out["ab_walls"]) == 8
    assert all(c > 0 for c in out["ab_cpus"])
    steps = [json.loads(x) for x in (tmp_path / "telemetry" / "rank-00000.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["type"] == "step"] == [1, 2, 3, 4]  # only its on steps, numbered


def test_variants_each_run_once_per_group_and_number_their_own_steps(tmp_path):
    from benchmarks.doctor_ab import VARIANTS, make_variants

    out = run_loop(0, 1, str(tmp_path), 4 * len(VARIANTS), data_s=0.0, ckpt_every=0,
                   variants=make_variants(str(tmp_path)))
    groups = [out["ab_on"][i:i + len(VARIANTS)] for i in range(0, len(out["ab_on"]), len(VARIANTS))]
    assert len(groups) == 4 and all(sorted(g) == sorted(VARIANTS) for g in groups)
    for i, name in enumerate(VARIANTS[1:]):  # make_variants numbers the enabled ones' folders 1..
        recs = [json.loads(x) for x in (tmp_path / str(i + 1) / "telemetry" / "rank-00000.jsonl").read_text().splitlines()]
        steps = [r for r in recs if r["type"] == "step"]
        assert [r["step"] for r in steps] == [1, 2, 3, 4], name
        assert bool(steps[0]["cpu"]) == (name not in ("no CPU-time clock", "timers and records only")), name


def test_doctor_main_json_and_html(tmp_path, capsys):
    d = write_run(str(tmp_path / "run"), extra=lambda r, s: {"forward": 0.004} if r == 3 and s >= 100 else {})
    assert doctor_main(d, json=True, html=str(tmp_path / "out.html")) == 1
    out = json.loads(capsys.readouterr().out)
    f = out["findings"][0]
    assert (f["kind"], f["layer"], f["ranks"]) == ("straggler", "compute", [3])
    assert set(f) >= {"kind", "layer", "ranks", "first_step", "magnitude", "summary"}
    page = (tmp_path / "out.html").read_text()
    assert page.count("<svg") >= 4 and "<script" not in page and "rank 3 computes" in page
    assert doctor_main(write_run(str(tmp_path / "clean")), json=False) == 0
    assert capsys.readouterr().out.startswith("Verdict: no straggler")
    assert doctor_main(str(tmp_path / "none")) == 2
