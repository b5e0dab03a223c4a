"""FSDP2 checkpoints on gloo: save on 4 ranks, load on 2 (and back) exactly; a killed writer loses nothing."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from feixing.checkpoint import Manager
from feixing.checkpoint import commit as C
from feixing.config.schema import CheckpointConfig


def _build(world_size: int, seed: int):
    torch.manual_seed(seed)
    # Odd sizes: dim 0 of 6 and 10 over 4 ranks gives uneven shards and an empty one.
    model = torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.Tanh(), torch.nn.Linear(6, 10),
                                torch.nn.LayerNorm(10))
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return {"model": model, "optim": opt, "sched": sched, "loader": {"sample": 0, "rank": 0}}


def _steps(ck, app, rank, first, last):
    for step in range(first, last + 1):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(3, 10, generator=g)
        app["model"](x).pow(2).mean().backward()
        ck.wait_staging()
        app["optim"].step()
        app["sched"].step()
        app["optim"].zero_grad()
        app["loader"].update(sample=step * 12, rank=rank)
        ck.maybe_save(step, app)


def _full(app) -> dict:
    """Every parameter and optimizer tensor gathered to full size, plus the small state."""
    msd, osd = get_state_dict(app["model"], [app["optim"]])
    out = {"m/" + k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        for n, v in st.items():
            out[f"o/{fqn}/{n}"] = (v.full_tensor() if isinstance(v, DTensor) else v).clone()
    out["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
    out["sched"] = app["sched"].state_dict()
    out["loader"] = dict(app["loader"])
    return out


def _save(rank, world_size, run_dir, async_save=True):
    app = _build(world_size, seed=0)
    ck = Manager(CheckpointConfig(interval=2, async_save=async_save), run_dir, rank, world_size,
                 layout={"dp_shard": world_size})
    _steps(ck, app, rank, 1, 4)
    ck.close()
    assert ck.errors == [], ck.errors
    return _full(app)


def _load(rank, world_size, run_dir):
    app = _build(world_size, seed=123)  # different init: everything must come from the checkpoint
    ck = Manager(CheckpointConfig(interval=2), run_dir, rank, world_size)
    step = ck.resume(app, "auto")
    ck.close()
    return step, _full(app)


def _assert_same(saved: dict, loaded: dict, loader_rank: int) -> None:
    assert saved.keys() == loaded.keys()
    for k, v in saved.items():
        if k == "loader":
            assert loaded[k] == {"sample": v["sample"], "rank": loader_rank}
        elif isinstance(v, torch.Tensor):
            assert torch.equal(v, loaded[k]), k  # a copy of bytes: exact
        else:
            assert v == loaded[k], k


def test_reshard_4_to_2_and_2_to_4(pool4, pool2, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    saved4 = pool4.run(_save, a)
    saved2 = pool2.run(_save, b)
    # Same model, data and steps on 4 and on 2 ranks: the saved states differ only by
    # reduction order; each load below is compared with the run that saved it.
    for step, full in pool2.run(_load, a):
        assert step == 4
        _assert_same(saved4[0], full, loader_rank=0)  # other world size: rank 0's loader state
    loaded4 = pool4.run(_load, b)
    for step, full in loaded4:
        assert step == 4
        _assert_same(saved2[0], full, loader_rank=0)
    for r, (_, full) in enumerate(pool4.run(_load, a)):
        _assert_same(saved4[0], full, loader_rank=r)  # same world size: each rank its own


def test_async_save_equals_sync_save(pool4, tmp_path):
    pool4.run(_save, str(tmp_path / "async"), True)
    pool4.run(_save, str(tmp_path / "sync"), False)
    for step in ("step-00000002", "step-00000004"):
        fa = C.read_manifest(str(tmp_path / "async" / "checkpoints" / step))["files"]
        fs = C.read_manifest(str(tmp_path / "sync" / "checkpoints" / step))["files"]
        assert fa == fs  # every rank's file, byte for byte (sha256)


def _kill_writer_mid_save(rank, world_size, run_dir):
    app = _build(world_size, seed=0)
    cfg = CheckpointConfig(interval=2, commit_timeout_s=3.0)
    ck = Manager(cfg, run_dir, rank, world_size)
    _steps(ck, app, rank, 1, 2)
    ck.flush()
    dist.barrier()
    if rank == 1:  # freeze, then kill -9, rank 1's writer with the step-4 save inside it
        os.kill(ck.writer.pid, signal.SIGSTOP)
    _steps(ck, app, rank, 3, 4)
    if rank == 1:
        ck.stager.wait()  # the step-4 job is now in the frozen writer's input
        os.kill(ck.writer.pid, signal.SIGKILL)
    ck.flush()  # rank 1: writer died; rank 0: rank 1's part never came, commit times out
    errors = list(ck.errors)
    _steps(ck, app, rank, 5, 6)  # the writer is restarted and the next save commits
    ck.close()
    names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    fresh = _build(world_size, seed=5)
    ck2 = Manager(cfg, run_dir, rank, world_size)
    step6 = ck2.resume(fresh, "auto")
    step2 = ck2.resume(_build(world_size, seed=6), os.path.join(run_dir, "checkpoints", "step-00000002"))
    ck2.close()
    return errors, names, step6, step2, ck.errors[len(errors):]


def test_killed_writer_leaves_previous_checkpoint_loadable(pool2, tmp_path):
    res = pool2.run(_kill_writer_mid_save, str(tmp_path))
    (err0, names, step6, step2, later0), (err1, _, _, _, later1) = res
    assert len(err0) == 1 and "ranks [1] did not write" in err0[0] and "step-00000002" in err0[0]
    assert len(err1) == 1 and "writer process died" in err1[0]
    assert names == ["step-00000002", "step-00000006"]  # no trace of the failed step-4 save
    assert (step6, step2) == (6, 2) and later0 == [] and later1 == []


class _LateRank0(Manager):
    """Rank 0 reaches each save 30 ms after the others: alone it would often find its writer done
    while theirs are still busy, and decide differently."""

    def maybe_save(self, step, app_state, force=False):
        if self.rank == 0:
            time.sleep(0.03)
        return super().maybe_save(step, app_state, force)


def _every_step_skip(rank, world_size, run_dir):
    app = _build(world_size, seed=0)
    ck = _LateRank0(CheckpointConfig(interval=1, keep=100, when_busy="skip", commit_timeout_s=20.0), run_dir,
                    rank, world_size)  # a save that some ranks skipped fails fast instead of waiting 600 s
    _steps(ck, app, rank, 1, 12)
    ck.close()
    return [r["step"] for r in ck.stats], ck.skipped, ck.errors


def test_when_busy_skip_decides_alike_on_every_rank(pool4, tmp_path):
    """A rank whose writer is still busy makes every rank skip that save (one all_reduce per due
    step): a save taken by some ranks only would never commit."""
    res = pool4.run(_every_step_skip, str(tmp_path))
    saved, skipped, errors = res[0]
    assert all(r == res[0] for r in res), res
    assert errors == [] and skipped and len(saved) >= 2 and sorted(saved + skipped) == list(range(1, 13))
    committed = sorted(s for s, _ in C.list_committed(str(tmp_path / "checkpoints")))
    assert committed == saved
    assert all(step == saved[-1] for step, _ in pool4.run(_load, str(tmp_path)))
