"""Checkpoint commit, manifest, verify, retention and resume fallback on one process (CPU)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import threading

import numpy as np
import pytest
import safetensors.torch
import torch

from feixing.checkpoint import CheckpointError, Manager
from feixing.checkpoint import commit as C
from feixing.checkpoint.stage import decode, encode, snapshot_fits
from feixing.config.schema import CheckpointConfig


def _app(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return {"model": model, "optim": opt, "sched": sched, "loader": {"pos": 0, "epoch": 0}}


def _train(ck: Manager, app: dict, first: int, last: int) -> None:
    for step in range(first, last + 1):
        app["model"](torch.randn(4, 8)).pow(2).mean().backward()
        ck.wait_staging()
        app["optim"].step()
        app["sched"].step()
        app["optim"].zero_grad()
        app["loader"]["pos"] = step * 4
        ck.maybe_save(step, app)


def _same_state(a: dict, b: dict) -> None:
    for (n, p), (_, q) in zip(a["model"].named_parameters(), b["model"].named_parameters()):
        assert torch.equal(p, q), n
    sa, sb = a["optim"].state_dict(), b["optim"].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for n, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][n]), (k, n)
    assert a["sched"].state_dict() == b["sched"].state_dict()
    assert a["loader"] == b["loader"]


def _run(tmp_path, steps: int = 4, **cfg) -> tuple[dict, Manager]:
    ck = Manager(CheckpointConfig(**{"interval": 2, "keep": 5, **cfg}), str(tmp_path), 0, 1)
    app = _app()
    _train(ck, app, 1, steps)
    ck.close()
    return app, ck


def _root(tmp_path) -> str:
    return os.path.join(tmp_path, "checkpoints")


def test_save_resume_roundtrip_is_exact_and_pickle_free(tmp_path, monkeypatch):
    app, ck = _run(tmp_path)
    assert ck.errors == [] and ck.last_committed.endswith("step-00000004")
    folder = ck.last_committed
    assert sorted(os.listdir(folder)) == ["manifest.json", "rank-00000.json", "rank-00000.safetensors"]
    body = C.read_manifest(folder)
    assert body["step"] == 4 and body["world_size"] == 1 and body["versions"]["torch"]
    # The data file is a plain safetensors file any tool can read.
    tensors = safetensors.torch.load_file(os.path.join(folder, "rank-00000.safetensors"))
    assert torch.equal(tensors["sharded/model/0.weight"], app["model"][0].weight)

    def no_pickle(*a, **k):
        raise AssertionError("checkpoint loading must not unpickle")
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    fresh = _app(seed=1)
    ck2 = Manager(CheckpointConfig(interval=2), str(tmp_path), 0, 1)
    assert ck2.resume(fresh, "auto") == 4
    _same_state(app, fresh)
    assert ck2.resume(_app(seed=2), "none") == 0
    ck2.close()


def test_async_and_sync_saves_write_identical_files(tmp_path):
    _run(tmp_path / "a", async_save=True)
    _run(tmp_path / "s", async_save=False)
    for step in ("step-00000002", "step-00000004"):
        fa = C.read_manifest(os.path.join(_root(tmp_path / "a"), step))["files"]
        fs = C.read_manifest(os.path.join(_root(tmp_path / "s"), step))["files"]
        assert fa == fs


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "no_manifest"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage, caplog):
    _run(tmp_path, steps=4)
    root = _root(tmp_path)
    newest = os.path.join(root, "step-00000004")
    target = os.path.join(newest, "rank-00000.safetensors")
    if damage == "flip":
        with open(target, "r+b") as f:
            f.seek(os.path.getsize(target) - 7)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x01]))
    elif damage == "truncate":
        os.truncate(target, os.path.getsize(target) - 3)
    elif damage == "manifest":
        path = os.path.join(newest, "manifest.json")
        with open(path) as f:
            text = f.read().replace('"step": 4', '"step": 5')
        with open(path, "w") as f:
            f.write(text)
    else:
        os.remove(os.path.join(newest, "manifest.json"))
    fresh = _app(seed=1)
    ck = Manager(CheckpointConfig(interval=2, verify_checksums=damage != "truncate"), str(tmp_path), 0, 1)
    with caplog.at_level(logging.WARNING):
        assert ck.resume(fresh, "auto") == 2
    ck.close()
    if damage != "no_manifest":  # a folder without manifest is not even a candidate
        assert "falling back" in caplog.text and "step-00000004" in caplog.text
        assert any(n.startswith("corrupt-step-00000004") for n in os.listdir(root))
    assert fresh["loader"]["pos"] == 8
    with pytest.raises(CheckpointError, match="not a checkpoint folder|no committed"):
        Manager(CheckpointConfig(), str(tmp_path), 0, 1).resume(_app(), str(tmp_path / "nowhere"))


def test_explicit_path_and_all_invalid_is_an_error(tmp_path):
    _run(tmp_path, steps=4)
    fresh = _app(seed=1)
    ck = Manager(CheckpointConfig(), str(tmp_path), 0, 1)
    assert ck.resume(fresh, os.path.join(_root(tmp_path), "step-00000002")) == 2
    ck.close()
    for name in os.listdir(_root(tmp_path)):
        os.truncate(os.path.join(_root(tmp_path), name, "rank-00000.json"), 5)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        Manager(CheckpointConfig(), str(tmp_path), 0, 1).resume(_app(), "auto")


def test_retention_keeps_last_k_and_every_n(tmp_path):
    _run(tmp_path, steps=7, interval=1, keep=2, keep_every=3)
    assert sorted(os.listdir(_root(tmp_path))) == ["step-00000003", "step-00000006", "step-00000007"]
    # newest is never pruned, even when older ones have higher steps (resumed from an old one)
    assert C.select_prunable([1, 2, 3, 9], newest=3, keep=1, keep_every=0) == [2, 1]
    assert C.select_prunable([5], newest=5, keep=1, keep_every=0) == []


def test_interrupted_save_leaves_only_a_temp_folder_removed_at_start(tmp_path, caplog):
    _run(tmp_path, steps=2)
    root = _root(tmp_path)
    stale = os.path.join(root, ".tmp-step-00000004-deadbeef")
    os.makedirs(stale)
    with open(os.path.join(stale, "rank-00000.safetensors"), "wb") as f:
        f.write(b"partial")
    os.makedirs(os.path.join(root, "step-00000006"))  # renamed but manifest lost: not loadable
    with caplog.at_level(logging.WARNING):
        ck = Manager(CheckpointConfig(interval=2), str(tmp_path), 0, 1)
    assert not os.path.exists(stale) and "interrupted" in caplog.text
    assert ck.resume(_app(seed=3), "auto") == 2
    ck.close()


def test_disk_full_keeps_previous_and_continues(tmp_path, caplog):
    ck = Manager(CheckpointConfig(interval=2), str(tmp_path), 0, 1)
    app = _app()
    _train(ck, app, 1, 2)
    ck.flush()
    # The kernel's own ENOSPC: the rank file of the next save is /dev/full.
    tmp = os.path.join(_root(tmp_path), C.temp_dirname(4, ck.token))
    os.makedirs(tmp)
    os.symlink("/dev/full", os.path.join(tmp, "rank-00000.safetensors"))
    with caplog.at_level(logging.WARNING):
        _train(ck, app, 3, 4)
        ck.flush()
    assert len(ck.errors) == 1 and "No space left on device" in ck.errors[0]
    assert "step-00000002" in ck.errors[0] and "Training continues" in caplog.text
    assert not os.path.exists(tmp)  # the failed save is cleaned up
    _train(ck, app, 5, 6)  # the next save works again
    ck.close()
    assert sorted(os.listdir(_root(tmp_path))) == ["step-00000002", "step-00000006"]


def test_vanished_folder_and_on_error_stop(tmp_path):
    ck = Manager(CheckpointConfig(interval=2, on_error="stop"), str(tmp_path), 0, 1)
    app = _app()
    _train(ck, app, 1, 1)
    os.rmdir(_root(tmp_path))
    _train(ck, app, 2, 2)
    with pytest.raises(CheckpointError, match="vanished.*on_error = 'stop'"):
        ck.flush()
    ck.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_is_a_clear_error(tmp_path):
    ck = Manager(CheckpointConfig(interval=2), str(tmp_path), 0, 1)
    app = _app()
    _train(ck, app, 1, 2)
    ck.flush()
    os.chmod(_root(tmp_path), 0o555)
    try:
        _train(ck, app, 3, 4)
        ck.flush()
    finally:
        os.chmod(_root(tmp_path), 0o755)
    ck.close()
    assert len(ck.errors) == 1 and "Permission denied" in ck.errors[0]
    assert C.list_committed(_root(tmp_path))[0][0] == 2


def test_codec_roundtrip_and_unsupported_types():
    state = {"betas": (0.9, 0.95), 3: "int key", "nan": float("nan"), "none": None,
             "np": np.arange(5, dtype=np.uint32), "t": torch.ones(2), "nested": [{"a": (1, [2])}]}
    tensors: dict = {}
    text = json.dumps(encode(state, "x", tensors))
    back = decode(json.loads(text), lambda k: tensors[k])
    assert back["betas"] == (0.9, 0.95) and back[3] == "int key" and back["none"] is None
    assert np.isnan(back["nan"]) and back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3, 4]
    assert back["t"] is state["t"] and back["nested"] == [{"a": (1, [2])}]
    with pytest.raises(CheckpointError, match="'x/f'.*function"):
        encode({"f": lambda: 0}, "x", {})


def test_state_that_changes_shape_reallocates_and_still_saves(tmp_path, caplog):
    ck = Manager(CheckpointConfig(interval=1), str(tmp_path), 0, 1)
    app = _app()
    app["extra"] = {"buf": torch.arange(3.0)}
    _train(ck, app, 1, 1)
    app["extra"]["buf"] = torch.arange(1000.0)  # a bigger buffer: the staging layout changes
    with caplog.at_level(logging.WARNING):
        _train(ck, app, 2, 2)
    ck.close()
    assert ck.errors == [] and "reallocating" in caplog.text
    fresh = _app(seed=4)
    fresh["extra"] = {}
    ck2 = Manager(CheckpointConfig(interval=1), str(tmp_path), 0, 1)
    assert ck2.resume(fresh, "auto") == 2
    ck2.close()
    assert torch.equal(fresh["extra"]["buf"], torch.arange(1000.0))
    _same_state(app, fresh)


def test_loading_into_different_app_state_keys_is_a_clear_error(tmp_path):
    _run(tmp_path, steps=2)
    app = _app(seed=5)
    app["data"] = app.pop("loader")  # renamed entry: nothing saved under "data"
    ck = Manager(CheckpointConfig(interval=2), str(tmp_path), 0, 1)
    with pytest.raises(CheckpointError, match=r"no saved state for \['data'\]"):
        ck.resume(app, "auto")
    ck.close()


@pytest.mark.parametrize("parallel", [False, True])
def test_writer_one_pass_and_parallel_hash_write_the_same_file(tmp_path, parallel, monkeypatch):
    import hashlib

    from feixing.checkpoint import writer
    from feixing.checkpoint.writer import hash_in_parallel, persist

    calls = []
    if writer._WriteBehind._sync is not None:  # Linux: flush and drop behind the writes every 1 MiB
        real = writer._WriteBehind._sync
        monkeypatch.setattr(writer._WriteBehind, "_sync", staticmethod(
            lambda fd, off, n, flags: calls.append((off, n, flags)) or real(fd, off, n, flags)))
    data = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB + a tail: several 1 MiB pieces, a partial one
    header = b'{"__metadata__":{}}     '
    size, digest = persist(data, len(data), header, str(tmp_path / "f"), parallel=parallel, write_behind=1 << 20)
    raw = (tmp_path / "f").read_bytes()
    assert size == len(raw) == 8 + len(header) + len(data) and raw[8 + len(header):] == data
    assert digest == hashlib.sha256(raw).hexdigest()
    if writer._WriteBehind._sync is not None:  # every whole 1 MiB window started once, and waited for
        wb = writer._WriteBehind
        started = [off for off, n, f in calls if f == wb.SYNC_WRITE]
        waited = [off for off, n, f in calls if f != wb.SYNC_WRITE]
        assert started == [i << 20 for i in range(size >> 20)] and waited == started[:-1]
    assert hash_in_parallel(local_world_size=10**6) is False  # never more ranks than cores


def test_device_snapshot_frees_the_sources_before_the_host_copy_ends(monkeypatch):
    """With a snapshot, wait() returns while the copy to the host still runs, and changing the
    sources then does not change what is saved (on CPU the snapshot path runs as on a device,
    with the device-to-device copy done in place of being queued)."""
    from feixing.checkpoint import stage

    srcs = {"a": torch.arange(1000.0), "b": torch.arange(10, dtype=torch.int64)}
    items = [(k, t.dtype, tuple(t.shape)) for k, t in srcs.items()]
    want = {k: t.clone() for k, t in srcs.items()}
    gate = threading.Event()
    real = stage._copy_all

    def held(dsts, s, non_blocking):  # the staging thread's copy waits until the loop moved on
        if threading.current_thread().name == "feixing-ckpt-stage":
            assert gate.wait(10)
        real(dsts, s, non_blocking)
    monkeypatch.setattr(stage, "_copy_all", held)
    st = stage.Stager("cpu", snapshot="on")
    st.prepare(items)
    assert st.snap is not None
    done = []
    st.start(srcs, then=lambda: done.append(1))
    st.wait(everything=False)  # what wait_staging() does before the optimizer
    assert not done  # the host copy is still held
    for t in srcs.values():
        t.add_(1)  # the "optimizer" changes the parameters
    gate.set()
    st.wait(everything=True)
    assert done == [1]
    for k in srcs:
        assert torch.equal(st.view(k), want[k]), k
    st.close()
    off = stage.Stager("cpu", snapshot="auto")
    off.prepare(items)
    assert off.snap is None  # auto never snapshots on CPU
    off.close()


def test_snapshot_fits_keeps_a_margin():
    gib = 1 << 30
    assert snapshot_fits(12 * gib, free=30 * gib, total=80 * gib)  # 12 + 8 (10% of 80) <= 30
    assert not snapshot_fits(12 * gib, free=19 * gib, total=80 * gib)
    assert not snapshot_fits(1 * gib, free=2 * gib, total=8 * gib)  # the 2 GiB floor


def test_device_snapshot_saves_the_same_files(tmp_path):
    _run(tmp_path / "off", device_snapshot="off")
    app, ck = _run(tmp_path / "on", device_snapshot="on")
    assert ck.errors == [] and all(r["snapshot"] for r in ck.stats)
    for step in ("step-00000002", "step-00000004"):
        fa = C.read_manifest(os.path.join(_root(tmp_path / "off"), step))["files"]
        fs = C.read_manifest(os.path.join(_root(tmp_path / "on"), step))["files"]
        assert fa == fs
    fresh = _app(seed=1)
    ck2 = Manager(CheckpointConfig(interval=2), str(tmp_path / "on"), 0, 1)
    assert ck2.resume(fresh, "auto") == 4
    ck2.close()
    _same_state(app, fresh)


@pytest.mark.parametrize("background", [True, False])
def test_commit_log_says_what_the_save_cost_the_loop(tmp_path, caplog, background):
    with caplog.at_level(logging.INFO, logger="feixing.checkpoint.manager"):
        _, ck = _run(tmp_path, steps=4, async_save=background)
    lines = [r.getMessage() for r in caplog.records if "committed" in r.getMessage()]
    assert len(lines) == 2 and "step-00000004" in lines[1], lines
    if not background:
        assert all(line.endswith("; checkpoint.async = false: the loop waited for the whole save)") for line in lines)
        lines = []
    parts = ("waiting for the previous save", "gathering the state", "for the staging buffer", "starting the copy",
             "before the optimizer")
    pattern = r"persist [0-9.]+ s; the loop waited (\d+) ms: " + ", ".join(rf"(\d+) ms {p}" for p in parts) + r"\)$"
    for line in lines:
        m = re.search(pattern, line)
        assert m, line
        total, *each = (int(g) for g in m.groups())
        assert abs(total - sum(each)) <= len(each)  # the parts add up (each rounded to 1 ms)
    keys = ("previous_s", "capture_s", "buffer_s", "start_s") + (() if background else ("sync_s",))
    for rec in ck.stats:  # blocked time = its parts, exactly
        assert rec["blocked_s"] == pytest.approx(sum(rec[k] for k in keys))
        assert min(rec[k] for k in keys + ("wait_s",)) >= 0


def test_when_busy_skip_saves_as_often_as_the_writer_allows(tmp_path, caplog):
    """interval = 1 with when_busy = 'skip': a save that falls due while the previous one is still
    being written is skipped, never waited for; every due step is either saved or skipped, and
    every committed checkpoint holds the state of its own step."""
    ck = Manager(CheckpointConfig(interval=1, keep=1000, when_busy="skip"), str(tmp_path), 0, 1)
    app, states = _app(), {}
    with caplog.at_level(logging.INFO, logger="feixing.checkpoint.manager"):
        for step in range(1, 41):
            _train(ck, app, step, step)
            states[step] = [p.detach().clone() for p in app["model"].parameters()]
        ck.close()
    saved = [r["step"] for r in ck.stats]
    assert ck.errors == [] and ck.skipped, "tiny steps must outrun the writer (fsync per save)"
    assert sorted(saved + ck.skipped) == list(range(1, 41)) and len(saved) >= 2
    assert all(r["previous_s"] < 0.05 for r in ck.stats)  # never waited for the previous save
    assert ck.attempted(40) == (40 in saved)  # the trainer saves its last step if it was skipped
    assert sum(r["skipped_before"] for r in ck.stats) == len([s for s in ck.skipped if s < saved[-1]])
    assert re.search(r"\d+ due saves skipped before it\)$", caplog.text, re.M)
    committed = C.list_committed(_root(tmp_path))
    assert sorted(s for s, _ in committed) == saved
    for step, folder in committed[:1] + committed[len(committed) // 2: len(committed) // 2 + 1]:
        fresh = _app(seed=step)
        ck2 = Manager(CheckpointConfig(interval=1), str(tmp_path), 0, 1)
        assert ck2.resume(fresh, folder) == step
        ck2.close()
        for p, q in zip(states[step], fresh["model"].parameters()):
            assert torch.equal(p, q)


def test_when_busy_must_be_wait_or_skip(tmp_path):
    with pytest.raises(ValueError, match="when_busy must be 'wait' or 'skip'"):
        Manager(CheckpointConfig(interval=1, when_busy="drop"), str(tmp_path), 0, 1)
