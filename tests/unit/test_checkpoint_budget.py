"""checkpoint.max_overhead: due saves are skipped so that the saves cost the loop at most that
share of its time, measured from the steps the manager sees."""

from __future__ import annotations

import time

import pytest
import torch

from feixing.checkpoint import Manager
from feixing.checkpoint.budget import LoopBudget
from feixing.config.schema import CheckpointConfig


def test_the_rule_on_given_step_times():
    b = LoopBudget(0.05)
    t = 0.0
    for _ in range(10):  # idle steps of 0.1 s
        b.step(False, t)
        t += 0.1
    b.step(False, t)
    b.began(t)
    began = t
    for _ in range(3):  # a save in flight makes 3 steps 0.4 s long: 0.9 s of cost
        t += 0.4
        b.step(True, t)
    t += 0.1
    b.step(False, t)  # the save committed during the previous step
    assert b.cost(timed=0.05) == pytest.approx(0.9)
    assert not b.allows(0.05, now=began + 17.9)  # 0.9 s > 5% of 17.9 s
    assert b.allows(0.05, now=began + 18.1)
    assert b.cost(timed=2.0) == 2.0  # never less than what the manager timed itself
    # no second save before there are steps without a save to compare with
    fresh = LoopBudget(0.05)
    fresh.began(0.0)
    for i in range(5):  # 4 steps without a save
        fresh.step(False, float(i))
    assert not fresh.allows(0.0, now=1000.0)
    fresh.step(False, 5.0)  # the 5th
    assert fresh.allows(0.0, now=1000.0)
    assert LoopBudget(0.0).allows(100.0, now=0.0)  # off
    with pytest.raises(ValueError, match="max_overhead"):
        LoopBudget(1.5)


def _run(root, max_overhead: float, steps: int = 80):
    """A loop whose steps take 5 ms, and 30 ms while a save is in flight (the slowdown a save
    inflicts, made explicit so that the share it costs is known): saving after every step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    app = {"model": model, "optim": opt, "loader": {"pos": 0}}
    ck = Manager(CheckpointConfig(interval=1, keep=2, verify_checksums=False, max_overhead=max_overhead),
                 str(root), 0, 1)
    slow = 0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        in_flight = ck.busy()
        slow += in_flight
        time.sleep(0.030 if in_flight else 0.005)
        model(torch.randn(2, 64)).sum().backward()
        ck.wait_staging()
        opt.step()
        opt.zero_grad()
        ck.maybe_save(step, app)
    total = time.perf_counter() - t0
    ck.close()
    assert ck.errors == []
    return ck, slow * 0.025, total


def test_saves_stay_within_the_share(tmp_path):
    ck, lost, total = _run(tmp_path / "b", 0.25, steps=250)
    saves = len(ck.stats)
    assert saves >= 3 and len(ck.skipped) > 0 and saves + len(ck.skipped) == 250
    longest = max(round(r["loop_cost_s"] / 0.025) for r in ck.stats if "loop_cost_s" in r)
    # the last save's steps come after its check: one save's worth of slack
    assert lost <= 0.25 * total + 0.025 * (longest + 1), (lost, total, saves)
    assert all("loop_cost_s" in r for r in ck.stats)  # the last one too, at the closing flush
    assert all(r["loop_cost_s"] >= 0.02 for r in ck.stats[:-1])  # its slow steps were counted
    # the same loop without the budget: every step waits for or overlaps a save
    off, lost_off, total_off = _run(tmp_path / "o", 0.0)
    assert len(off.stats) == 80 and lost_off > 0.3 * total_off
