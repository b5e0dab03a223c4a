"""The checkpoint capture cache: every save after the first reuses the remembered capture, and
must gather exactly what a full capture would (same files), follow replaced state, and turn
itself off when it disagrees."""

from __future__ import annotations

import copy
import logging
import os

import torch

from feixing.checkpoint import Manager
from feixing.checkpoint import commit as C
from feixing.checkpoint.capture import Capture
from feixing.config.schema import CheckpointConfig


def _app(opt_cls=torch.optim.AdamW, **kw) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # lr changes between saves
    return {"model": model, "optim": opt, "sched": sched, "loader": {"pos": 0}}


def _step(app: dict, ck: Manager | None = None, step: int = 0) -> None:
    app["model"](torch.randn(4, 8)).pow(2).mean().backward()
    if ck is not None:
        ck.wait_staging()
    app["optim"].step()
    app["sched"].step()
    app["optim"].zero_grad()
    app["loader"]["pos"] += 4
    if ck is not None:
        ck.maybe_save(step, app)


def _train(root, cached: bool, steps: int = 6) -> Manager:
    ck = Manager(CheckpointConfig(interval=1, keep=steps), str(root), 0, 1)
    ck.capture.enabled = cached
    app = _app()
    for step in range(1, steps + 1):
        _step(app, ck, step)
    ck.close()
    assert ck.errors == []
    return ck


def test_cached_saves_write_the_same_files_as_full_ones(tmp_path):
    cached, full = _train(tmp_path / "c", True), _train(tmp_path / "f", False)
    # one full capture (the preallocation's or the first save's), the check at the next save, then cached
    assert cached.capture.full == 1 and cached.capture.cached >= 4
    assert full.capture.cached == 0
    for step in range(1, 7):
        name = f"step-{step:08d}"
        fc = C.read_manifest(os.path.join(tmp_path / "c", "checkpoints", name))["files"]
        ff = C.read_manifest(os.path.join(tmp_path / "f", "checkpoints", name))["files"]
        assert fc == ff, step  # sizes and sha256 of the data and of the index (learning rate included)


def _ptrs(sources: dict) -> dict:
    return {k: t.data_ptr() for k, t in sources.items() if k.startswith("sharded/")}


def test_capture_follows_replaced_state():
    app = _app()
    _step(app)
    cap = Capture(0, 1)
    index, sources = cap(app, 1)
    _step(app)
    assert cap(app, 2)[0] == cap._full(app, 2, None, remember=False)[0] and cap.cached == 1
    # load_state_dict gives the optimizer new state tensors: the next capture must name them
    app["optim"].load_state_dict(copy.deepcopy(app["optim"].state_dict()))
    index, sources = cap(app, 3)
    assert cap.full == 2
    live = app["optim"].state[app["model"][0].weight]["exp_avg"]
    assert sources["sharded/optim/state/0.weight/exp_avg"].data_ptr() == live.data_ptr()
    # a replaced parameter, likewise
    old = app["model"][2].weight
    new = app["model"][2].weight = torch.nn.Parameter(old.detach().clone())
    params = app["optim"].param_groups[0]["params"]
    params[next(i for i, p in enumerate(params) if p is old)] = new
    app["optim"].state[new] = app["optim"].state.pop(old)
    index, sources = cap(app, 4)
    assert cap.full == 3
    assert sources["sharded/model/2.weight"].data_ptr() == app["model"][2].weight.data_ptr()
    assert _ptrs(sources) == _ptrs(cap._full(app, 4, None, remember=False)[1])
    # and the learning rate a scheduler changed is read again at every cached capture
    before = cap(app, 5)[0]["sharded"]["optim"]["param_groups"][0]["lr"]
    _step(app)
    _step(app)
    assert cap(app, 6)[0]["sharded"]["optim"]["param_groups"][0]["lr"] == before / 2 == app["optim"].param_groups[0]["lr"]


def test_a_cache_that_disagrees_turns_itself_off(caplog):
    app = _app()
    _step(app)
    cap = Capture(0, 1)
    cap(app, 1)
    fp, skel, chunks, srcs, names = cap._memo
    stale = {k: t.clone() for k, t in srcs.items()}  # views that no longer alias the live state
    cap._memo = (fp, skel, chunks, stale, names)
    with caplog.at_level(logging.WARNING):
        _, sources = cap(app, 2)
    assert "disagreed" in caplog.text and not cap.enabled
    assert sources["sharded/model/0.weight"].data_ptr() == app["model"][0].weight.data_ptr()  # the full one
    cap(app, 3)
    assert cap.cached == 0 and cap.full == 2


class _CountingSGD(torch.optim.SGD):
    """An optimizer whose state holds a plain number, which changes without any tensor changing."""

    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                self.state[p]["updates"] = self.state[p].get("updates", 0) + 1
        return super().step(closure)


def test_optimizer_state_with_plain_values_is_not_cached():
    app = _app(_CountingSGD)
    _step(app)
    cap = Capture(0, 1)
    cap(app, 1)
    _step(app)
    cap(app, 2)
    assert not cap.enabled and cap.cached == 0 and cap.full == 2
    assert cap(app, 3)[0]["sharded"]["optim"]["state"]["0.weight"]["updates"] == 2
