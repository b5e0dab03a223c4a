"""LR schedule, metrics line/records, non-finite guard policy, train-state RNG round trip."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from feixing.config.schema import Config, OptimConfig
from feixing.train.metrics import Metrics, format_eta
from feixing.train.optim import Schedule, build_optimizer, lr_at
from feixing.train.state import TrainState
from feixing.train.step import StepResult
from feixing.train.trainer import NonFiniteLossError, _handle_nonfinite


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(1, cfg, 110) == pytest.approx(0.1)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos = 0
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)  # past the end stays at the floor


def test_optimizer_groups_and_schedule_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert len(decay["params"]) == 1 and decay["weight_decay"] == 0.1  # the Linear weight only
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    sched = Schedule(opt, OptimConfig(lr=2.0, warmup_steps=4), 10)
    assert sched.set_step(2) == pytest.approx(1.0) and opt.param_groups[1]["lr"] == pytest.approx(1.0)
    other = Schedule(opt, OptimConfig(), 10)
    other.load_state_dict(sched.state_dict())
    assert other.last_step == 2


def test_metrics_writes_records_at_the_interval(tmp_path, capsys):
    m = Metrics(str(tmp_path), total_steps=5, log_interval=2, is_main=True, flops_per_token=100.0,
                peak=1e6, n_devices=2)
    for step in range(1, 6):
        m.record(step, loss=2.0 / step, lr=1e-3, grad_norm=0.5, tokens=1000, step_time_s=0.5,
                 skipped=False, memory=0.1)
    m.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 5]  # every 2 steps, and the last one
    assert recs[0]["tokens_per_s"] == pytest.approx(2000.0)
    assert recs[0]["mfu"] == pytest.approx(2000.0 * 100 / (1e6 * 2))
    out = capsys.readouterr().out
    assert "step 2/5" in out and "ETA 0:00:01" in out and "tok/s" in out
    assert format_eta(3725) == "1:02:05"


def test_nonfinite_policy_skip_then_stop():
    cfg, state = Config(), TrainState()
    bad = StepResult(loss=math.nan, grad_norm=1.0, tokens=10, skipped=True)
    cfg.train.max_skipped_steps = 2
    _handle_nonfinite(cfg, state, 1, bad)  # skip mode: warns, continues
    assert state.consecutive_skips == 1
    with pytest.raises(NonFiniteLossError, match="consecutive non-finite"):
        _handle_nonfinite(cfg, state, 2, bad)
    cfg.train.nonfinite_loss = "stop"
    with pytest.raises(NonFiniteLossError, match="nonfinite_loss = 'stop'"):
        _handle_nonfinite(cfg, TrainState(), 3, bad)


def test_train_state_restores_all_rng_streams():
    state = TrainState()
    state.step = 7
    saved = state.state_dict()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restored = TrainState()
    restored.load_state_dict(saved)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert restored.step == 7
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


_COMPILE_TWICE = """
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from feixing.train.trainer import keep_compile_cache

print(keep_compile_cache(Path(sys.argv[1])))
f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
assert torch.equal(f(torch.ones(8)), torch.sin(torch.ones(8)) * 2 + 1)
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_compile_cache_is_kept_with_the_run_and_hit_by_the_next_process(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from feixing.train import trainer

    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(trainer.__file__).parents[2]), env.get("PYTHONPATH", "")])
    run_dir = tmp_path / "run"
    outs = [subprocess.run([sys.executable, "-c", _COMPILE_TWICE, str(run_dir)], env=env, check=True,
                           capture_output=True, text=True).stdout.split("\n") for _ in range(2)]
    assert outs[0][0] == outs[1][0] == str((run_dir / "compile_cache").resolve())
    assert any((run_dir / "compile_cache").rglob("*"))  # the compiled graph lives in the run dir
    assert outs[0][1] == "0 1" and outs[1][1] == "1 0"  # the second process compiled nothing
    # a place the user chose wins; torch's own default and an earlier run's cache do not
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # restored after the test
    assert trainer.keep_compile_cache(run_dir) == str(tmp_path / "mine")
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert trainer.keep_compile_cache(tmp_path / "a") == str((tmp_path / "a" / "compile_cache").resolve())
    assert trainer.keep_compile_cache(tmp_path / "b") == str((tmp_path / "b" / "compile_cache").resolve())
