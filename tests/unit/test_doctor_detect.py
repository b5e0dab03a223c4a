"""Detectors on synthetic telemetry: stragglers, drifts, spikes, slow links, online rules, clean runs."""

import json
import os
import warnings

import numpy as np
import pytest

from feixing.diagnose.detect import OnlineDetector, change_point, cusum, nanmedian, peer_excess
from feixing.diagnose.report import diagnose_run, load_run
from feixing.diagnose.telemetry import ONLINE_SIGNALS, _line

PH = {"data": 0.002, "forward": 0.004, "backward": 0.008, "comm": 0.004, "optimizer": 0.001}


def write_run(d, steps=300, ranks=4, seed=0, noise=0.03, extra=None, ckpt_every=0, canary_every=25,
              dispatch=None, link_delay=None, reference=None):
    """Write a synthetic run: lognormal noise per phase; extra(rank, step) -> {phase: seconds added}.

    The comm phase of every rank absorbs the slowest rank's extra time, as in synchronous training.
    """
    rng = np.random.default_rng(seed)
    tdir = os.path.join(d, "telemetry")
    os.makedirs(tdir, exist_ok=True)
    files = [open(os.path.join(tdir, f"rank-{r:05d}.jsonl"), "w") for r in range(ranks)]  # noqa: SIM115
    for r, f in enumerate(files):
        f.write(json.dumps({"type": "meta", "rank": r, "world_size": ranks}) + "\n")
    for s in range(1, steps + 1):
        ph = [{p: v * rng.lognormal(0, noise) for p, v in PH.items()} for _ in range(ranks)]
        for r in range(ranks):
            for p, v in (extra(r, s) if extra else {}).items():
                ph[r][p] = ph[r].get(p, 0.0) + v
            if ckpt_every and s % ckpt_every == 0:
                ph[r]["checkpoint"] = ph[r].get("checkpoint", 0.0) + 0.0005
        busy = [sum(v for p, v in x.items() if p != "comm") for x in ph]
        for r in range(ranks):
            ph[r]["comm"] += max(busy) - busy[r]
            gc_s = ph[r].pop("gc", 0.0)
            rec = {"step": s, "step_s": sum(ph[r].values()) + gc_s, "ph": ph[r], "gc_s": gc_s, "gc_n": 0,
                   "tele_s": 0.0}
            files[r].write(_line(rec))
            if canary_every and s % canary_every == 0:
                c = {"type": "canary", "step": s, "link_from": (r - 1) % ranks,
                     "dispatch_s": (dispatch(r, s) if dispatch else 4e-4) * rng.lognormal(0, 0.01),
                     "link_lat_s": 2e-4 * rng.lognormal(0, 0.1) + (link_delay(r, s) if link_delay else 0.0),
                     "rss_mb": 200.0}
                if reference:  # the host reference timed next to the dispatch canary
                    c["reference_s"] = reference(r, s) * rng.lognormal(0, 0.01)
                files[r].write(json.dumps(c) + "\n")
    for f in files:
        f.close()
    return d


def kinds(findings):
    return {(f.kind, f.layer, tuple(f.ranks)) for f in findings}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_run_has_no_findings(tmp_path, seed):
    assert diagnose_run(write_run(str(tmp_path), steps=400, seed=seed)) == []


def test_slow_rank_named_with_layer_and_onset(tmp_path):
    # rank 2 gets 10% of a step (1.9 ms) extra compute from step 120
    d = write_run(str(tmp_path), extra=lambda r, s: {"forward": 0.0019} if r == 2 and s >= 120 else {})
    f = diagnose_run(d)
    assert [(x.kind, x.layer, x.ranks) for x in f if x.kind == "straggler"] == [("straggler", "compute", [2])]
    s = next(x for x in f if x.kind == "straggler")
    assert 118 <= s.first_step <= 122 and s.detected_step - 120 <= 20
    assert "rank 2 computes" in s.summary and 0.1 < s.magnitude < 0.2  # 1.9 ms on ~13 ms of compute
    # the waiting ranks' comm time grows too; it must not be reported as a separate problem
    assert not any(x.layer == "communication" for x in f)


def test_onset_is_not_pulled_back_by_a_milder_slowness_just_before(tmp_path):
    # rank 2 is 7% of a step slower at steps 113-119 (over the 6% threshold: the rolling median
    # flags it from ~118, and that run merges with the fault's), then 30% slower from step 120.
    # First flag minus half a window said 116; the shift itself is at 120.
    def extra(r, s):
        if r != 2:
            return {}
        return {"forward": 0.0057} if s >= 120 else {"forward": 0.0013} if s >= 113 else {}
    f = [x for x in diagnose_run(write_run(str(tmp_path), extra=extra)) if x.kind == "straggler"]
    assert [(x.layer, x.ranks) for x in f] == [("compute", [2])]
    assert 119 <= f[0].first_step <= 121, f[0].first_step


def test_nanmedian_equals_numpys_and_peer_excess_uses_the_other_ranks():
    """The detectors' sort-based nanmedian must give numpy's values exactly (NaN, inf, ties,
    all-NaN lanes, every axis), or re-scored runs would change."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        shape = tuple(int(n) for n in rng.integers(1, 6, size=rng.integers(1, 4)))
        a = rng.standard_normal(shape)
        a[rng.random(shape) < rng.random() * 0.7] = np.nan
        a[rng.random(shape) < 0.05] = np.inf
        a = np.round(a, 1)  # ties
        for ax in range(-len(shape), len(shape)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # numpy warns about all-NaN lanes
                want = np.nanmedian(a, axis=ax)
            np.testing.assert_array_equal(nanmedian(a, axis=ax), want)
    # ranks x steps; at step 2 ranks 1 and 3 reported nothing
    m = np.array([[1.0, 5.0], [2.0, np.nan], [4.0, 7.0], [10.0, np.nan]])
    np.testing.assert_array_equal(peer_excess(m), [[-3, -2], [-2, np.nan], [2, 2], [8, np.nan]])


def test_change_point():
    x = np.r_[np.zeros(20), np.full(5, 0.07), np.full(10, 0.3)]
    assert change_point(x, 0, 34) == 25
    assert change_point(x, 10, 34) == 25
    x[22] = np.nan  # a step a rank did not report
    assert change_point(x, 10, 34) == 25
    assert change_point(np.r_[np.zeros(8), np.full(4, 0.2)], 0, 11) == 8


def test_slow_data_and_gc_storm_layers(tmp_path):
    d = write_run(str(tmp_path / "a"), steps=160, extra=lambda r, s: {"data": 0.003} if r == 1 and s >= 100 else {})
    assert ("straggler", "data", (1,)) in kinds(diagnose_run(d))
    d = write_run(str(tmp_path / "b"), steps=160, extra=lambda r, s: {"gc": 0.004} if r == 3 and s >= 100 else {})
    assert ("straggler", "gc", (3,)) in kinds(diagnose_run(d))


def test_checkpoint_stall_is_a_spike_never_a_straggler(tmp_path):
    d = write_run(str(tmp_path), ckpt_every=50,
                  extra=lambda r, s: {"checkpoint": 0.05} if r == 0 and s % 50 == 0 else {})
    f = diagnose_run(d)
    assert [(x.kind, x.layer, x.ranks) for x in f] == [("spike", "checkpoint", [0])]
    assert f[0].first_step == 50 and "checkpoint" in f[0].summary


def test_cluster_wide_dispatch_drift(tmp_path):
    # every phase and the dispatch canary grow 0.5% per 100 steps from step 100 (1% at step 300)
    ramp = lambda s: 0.005 * max(s - 100, 0) / 100
    d = write_run(str(tmp_path), steps=900, noise=0.01,
                  extra=lambda r, s: {p: PH[p] * ramp(s) for p in ("forward", "backward", "optimizer")},
                  dispatch=lambda r, s: 4e-4 * (1 + ramp(s)))
    f = diagnose_run(d)
    drift = [x for x in f if x.kind == "drift"]
    assert drift and drift[0].layer == "dispatch" and drift[0].ranks == []
    assert drift[0].detected_step <= 300 + 300  # goal: within 300 steps of crossing 1%
    assert not any(x.kind == "straggler" for x in f)


def test_dispatch_drift_says_whether_the_host_core_slowed(tmp_path):
    ramp = lambda s: 0.02 * max(s - 100, 0) / 100  # +14% at the end
    common = dict(steps=800, noise=0.01, dispatch=lambda r, s: 4e-4 * (1 + ramp(s)),
                  extra=lambda r, s: {p: PH[p] * ramp(s) for p in ("forward", "backward", "optimizer")})
    flat = [x for x in diagnose_run(write_run(str(tmp_path / "flat"), reference=lambda r, s: 1e-4, **common))
            if x.kind == "drift"]
    assert [x.layer for x in flat] == ["dispatch"] and "CPU runs slower" not in flat[0].summary
    assert any("the dispatch path did" in e for e in flat[0].evidence)
    # the same growth with the plain-Python reference slowing alike: the core itself got slower
    core = [x for x in diagnose_run(write_run(str(tmp_path / "core"), reference=lambda r, s: 1e-4 * (1 + ramp(s)),
                                              **common)) if x.kind == "drift"]
    assert [x.layer for x in core] == ["dispatch"] and "host's CPU runs slower" in core[0].summary
    assert any("the core itself slowed" in e for e in core[0].evidence)


def test_compute_drift_without_dispatch_canary_is_compute(tmp_path):
    ramp = lambda s: 0.04 * max(s - 100, 0) / 100  # backward +24% at the end
    d = write_run(str(tmp_path / "big"), steps=700, noise=0.01,
                  extra=lambda r, s: {"backward": PH["backward"] * ramp(s)})
    drift = [x for x in diagnose_run(d) if x.kind == "drift"]
    assert [(x.layer, x.ranks) for x in drift] == [("compute", [])] and drift[0].magnitude >= 0.1
    # a few % of compute growth with a flat dispatch canary is within a shared host's own wander
    small = write_run(str(tmp_path / "small"), steps=700, noise=0.01,
                      extra=lambda r, s: {"backward": PH["backward"] * ramp(s) / 4})
    assert not [x for x in diagnose_run(small) if x.kind == "drift"]


def test_slow_link_names_both_ends(tmp_path):
    d = write_run(str(tmp_path), link_delay=lambda r, s: 0.002 if r == 2 and s >= 100 else 0.0)
    f = [x for x in diagnose_run(d) if x.layer == "communication"]
    assert [(x.kind, x.ranks) for x in f] == [("straggler", [1, 2])]
    assert "rank 1 -> rank 2" in f[0].summary


def test_load_run_reads_all_ranks_and_missing_dir_errors(tmp_path):
    data = load_run(write_run(str(tmp_path / "r"), steps=50, ranks=3))
    assert data.world_size == 3 and data.sig["step"].shape == (3, 50) and data.can_steps.tolist() == [25, 50]
    with pytest.raises(FileNotFoundError, match="no telemetry"):
        load_run(str(tmp_path / "nothing"))


def test_peer_excess_and_cusum():
    m = np.array([[1.0, 1.0], [1.0, 2.0], [1.1, 1.0]])
    assert np.allclose(peer_excess(m), [[-0.05, -0.5], [-0.05, 1.0], [0.1, -0.5]])  # 2 peers: their mean
    z = np.array([0.0] * 5 + [0.05] * 10)
    alarm, start = cusum(z, k=0.01, h=0.1)
    assert (alarm, start) == (7, 5)  # 0.04 per point over k: crosses 0.1 on the third
    assert cusum(np.zeros(20), 0.01, 0.1)[0] is None


def test_online_detector_warns_once_about_a_straggler():
    det = OnlineDetector(4)
    base = np.array([[0.02, 0.002, 0.012, 0.0, 0.004, 0.0]] * 4)
    assert ONLINE_SIGNALS[2] == "compute"
    msgs = []
    for i in range(10):
        m = base.copy()
        if i >= 5:
            m[3, 2] *= 1.3  # 30% slower compute = 18% of a step
        msgs += det.update(10 * (i + 1), m)
    assert len(msgs) == 1 and "rank 3 is a straggler in compute" in msgs[0]


def test_online_detector_warns_about_a_drift_on_every_rank():
    det = OnlineDetector(4)
    base = np.array([[0.02, 0.002, 0.012, 0.0, 0.004, 0.0]] * 4)
    msgs = []
    for i in range(30):
        m = base.copy()
        m[:, 2] *= 1 + 0.01 * max(i - 5, 0)  # compute grows 1% per window on every rank
        got = det.update(10 * (i + 1), m)
        msgs += [(i, x) for x in got]
    assert len(msgs) == 1 and "compute on every rank drifted" in msgs[0][1]
    assert msgs[0][0] <= 20  # 8% CUSUM level reached after ~10 windows of growth
