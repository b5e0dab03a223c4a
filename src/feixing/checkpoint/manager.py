"""Checkpoint policy for the training loop: when to save, staging, the writer, resume and fallback.

    ckpt = Manager(cfg.checkpoint, run_dir, rank, world_size, group, layout, resolved_config)
    step = ckpt.resume(app_state, resume)       # 0 if nothing was loaded
    for step in range(step + 1, steps + 1):
        ... forward / backward / clip ...
        ckpt.wait_staging()                     # the previous save's copy must finish first
        optimizer.step(); scheduler.step()
        ckpt.maybe_save(step, app_state)        # blocks only to capture; copy + persist run behind
    ckpt.close()

No collective runs during a save: rank 0's writer commits once every rank's files are on disk
(or gives up after `commit_timeout_s`). Collectives run only in `__init__` and `resume`, which
every rank calls.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import set_state_dict

from feixing.checkpoint import commit as C
from feixing.checkpoint.budget import LoopBudget
from feixing.checkpoint.capture import Capture, sharded_state, split
from feixing.checkpoint.load import Reader
from feixing.checkpoint.stage import Stager, decode, encode
from feixing.checkpoint.writer import WriterProcess, hash_in_parallel

log = logging.getLogger(__name__)


def _versions() -> dict:
    try:
        from importlib.metadata import version
        fx = version("feixing")
    except Exception:  # noqa: BLE001 - running from a source tree without installing
        fx = "0.1.0+src"
    return {"torch": torch.__version__, "feixing": fx, "python": platform.python_version()}


def waited_s(rec: dict) -> float:
    """What the loop waited for one save itself: blocked in the save call + before the optimizer."""
    return rec.get("blocked_s", 0.0) + rec.get("wait_s", 0.0)


def loop_cost(rec: dict, async_save: bool = True) -> str:
    """What one save cost the training loop, for the commit log line (times of `rec`, a stats record)."""
    if not async_save:  # the commit is logged inside the loop's wait for it
        return "checkpoint.async = false: the loop waited for the whole save"
    parts = [(k, label) for k, label in (("previous_s", "waiting for the previous save"),
                                         ("capture_s", "gathering the state"),
                                         ("buffer_s", "for the staging buffer"), ("start_s", "starting the copy"),
                                         ("wait_s", "before the optimizer")) if k in rec]
    total = waited_s(rec)
    text = f"the loop waited {1e3 * total:.0f} ms: " + ", ".join(f"{1e3 * rec[k]:.0f} ms {label}" for k, label in parts)
    return text + (f"; {rec['skipped_before']} due saves skipped before it" if rec.get("skipped_before") else "")


class Manager:
    """Saves and restores `app_state` (name -> object with state_dict/load_state_dict)."""

    def __init__(self, cfg, run_dir: str, rank: int, world_size: int, group=None,
                 layout: dict | None = None, resolved_config: str = ""):
        if cfg.interval < 0 or cfg.keep < 1 or cfg.keep_every < 0:
            raise ValueError("checkpoint.interval and checkpoint.keep_every must be >= 0 and "
                             f"checkpoint.keep >= 1 (got {cfg.interval}, {cfg.keep_every}, {cfg.keep})")
        if cfg.on_error not in ("continue", "stop"):
            raise ValueError(f"checkpoint.on_error must be 'continue' or 'stop', got {cfg.on_error!r}")
        if cfg.when_busy not in ("wait", "skip"):
            raise ValueError(f"checkpoint.when_busy must be 'wait' or 'skip', got {cfg.when_busy!r}")
        self.cfg = cfg
        self.rank, self.world_size, self.group = rank, world_size, group
        self.root = os.path.join(run_dir, "checkpoints")
        self.meta = {"layout": layout or {}, "resolved_config": resolved_config,
                     "versions": _versions()}
        self._dist = world_size > 1 and dist.is_available() and dist.is_initialized()
        # One id per attempt, the same on all ranks, names this attempt's temporary folders.
        self.token = self._bcast_json(secrets.token_hex(4) if rank == 0 else None)
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            removed = C.remove_stale_temps(self.root, keep_token=self.token)
            if removed:
                log.warning("removed %d unfinished checkpoint folder(s) left by an interrupted run: %s",
                            len(removed), ", ".join(sorted(removed)))
        self.stager: Stager | None = None
        self.writer: WriterProcess | None = None
        self._writer_fd = -1
        self._inflight: dict | None = None  # the save whose answer has not come back yet
        self._prealloc_failed = False
        self._parallel_hash = hash_in_parallel()  # a second writer thread only with cores to spare
        self.last_committed: str | None = None
        self.errors: list[str] = []
        self.stats: list[dict] = []  # one record per save: blocked_s, wait_s, persist_s, ...
        self.skipped: list[int] = []  # steps whose save was skipped (checkpoint.when_busy = 'skip')
        self._skips_reported = 0
        self.capture = Capture(rank, world_size)  # what a save gathers; cheap after the first save
        self.budget = LoopBudget(cfg.max_overhead)  # skips due saves beyond that share of the loop

    # ---- collectives (in __init__, resume and the due steps of when_busy = 'skip': every rank calls them)

    def _device(self) -> torch.device:
        backend = str(dist.get_backend(self.group))
        if "gloo" in backend or backend not in ("nccl", "hccl"):
            return torch.device("cpu")
        kind = "cuda" if backend == "nccl" else "npu"
        return torch.device(kind, torch.get_device_module(kind).current_device())

    def _bcast_json(self, obj):
        if not self._dist:
            return obj
        dev = self._device()
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        data = json.dumps(obj).encode() if self.rank == 0 else b""
        n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        dist.broadcast(n, src=src, group=self.group)
        buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=dev)
        if self.rank == 0:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=src, group=self.group)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def _all_ok(self, ok: bool) -> bool:
        if not self._dist:
            return ok
        t = torch.tensor([int(ok)], dtype=torch.int32, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    # ---- what to save ------------------------------------------------------------------------

    # ---- saving ------------------------------------------------------------------------------

    def wait_staging(self) -> None:
        """Call right before optimizer.step(): returns once the pending save no longer needs the
        parameters as they are (copied to the host, or to the device snapshot: see stage.py)."""
        self._wait_staging(everything=False)

    def _note_cost(self) -> None:
        """With checkpoint.max_overhead: the latest save's measured cost to the loop, on its record."""
        if self.stats and self.budget.share > 0:
            self.stats[-1]["loop_cost_s"] = self.budget.cost(waited_s(self.stats[-1]))

    def _wait_staging(self, everything: bool) -> None:
        t0 = time.perf_counter()
        if self.stager is not None:
            try:
                self.stager.wait(everything)
            except Exception as e:  # noqa: BLE001 - reported according to on_error
                self._inflight = None
                self._failed(f"staging failed: {type(e).__name__}: {e}")
        if self.stats and "wait_s" not in self.stats[-1]:
            self.stats[-1]["wait_s"] = time.perf_counter() - t0
        self._poll(block=False)

    def maybe_save(self, step: int, app_state: dict, force: bool = False) -> bool:
        """After optimizer step `step`: save if `step % interval == 0` (or `force`)."""
        in_flight = None  # polled once per step, and only where a rule below needs it
        if self.budget.share > 0:  # off by default: nothing added to the step
            in_flight = self.busy()
            self.budget.step(in_flight)
        if not force and (self.cfg.interval == 0 or step % self.cfg.interval != 0):
            if self.stager is None and self.cfg.interval > 0 and not self._prealloc_failed:
                self._preallocate(app_state)
            self._poll(block=False)
            return False
        t0 = time.perf_counter()
        if not force and (self.cfg.when_busy == "skip" or self.budget.share > 0):
            busy = self.cfg.when_busy == "skip" and (self.busy() if in_flight is None else in_flight)
            ok = not busy and self.budget.allows(waited_s(self.stats[-1]) if self.stats else 0.0)
            if not self._all_ok(ok):
                if not self.skipped:
                    log.info("checkpoint at step %d skipped: %s; each commit line counts the skips before it", step,
                             "the previous save is still being written (checkpoint.when_busy = 'skip')" if busy else
                             f"the previous save cost the loop more than checkpoint.max_overhead = "
                             f"{self.budget.share:g} of the time since it began")
                self.skipped.append(step)
                return False
        self._wait_staging(everything=True)
        waited = self._poll(block=True)  # one save in flight: the previous must be done
        if waited > 0.05:
            log.warning("checkpoint at step %d waited %.2f s for the previous save to persist; "
                        "checkpoint.interval is shorter than a save takes (checkpoint.when_busy = "
                        "'skip' skips such saves instead)", step, waited)
        _, okey, _ = split(app_state)
        if okey is not None and not app_state[okey].state:
            # get_state_dict would create AdamW state with a fake step, changing later updates.
            log.warning("checkpoint at step %d skipped: the optimizer has not stepped yet", step)
            return False
        t_capture = time.perf_counter()
        try:
            index, sources = self.capture(app_state, step)
        except Exception as e:
            raise C.CheckpointError(f"checkpoint at step {step}: {e}") from e
        if self.stager is None:
            self.stager = Stager(self._source_device(sources), self.cfg.device_snapshot)
        record = {"step": step, "bytes": sum(t.numel() * t.element_size() for t in sources.values()),
                  "previous_s": t_capture - t0, "capture_s": time.perf_counter() - t_capture,
                  "skipped_before": len(self.skipped) - self._skips_reported}
        self._skips_reported = len(self.skipped)
        self._note_cost()
        self.stats.append(record)
        self.budget.began(t0)
        self._inflight = {"step": step, "t0": time.perf_counter()}
        items = [(k, t.dtype, tuple(t.shape)) for k, t in sources.items()]
        background = self.cfg.async_save

        def staged():  # runs in the staging thread once the bytes are in the host buffer
            record["stage_s"] = time.perf_counter() - t_stage
            self._ensure_writer()
            self.writer.send(self._job(step, index))

        t_stage = time.perf_counter()
        try:
            realloc = self.stager.prepare(items)
            record["snapshot"] = self.stager.snap is not None
            if realloc and self.writer is not None:
                self.writer.close()
                self.writer = None
            record["buffer_s"] = time.perf_counter() - t_stage
            self.stager.start(sources, then=staged, background=background)
        except Exception as e:  # noqa: BLE001 - e.g. out of host memory: reported per on_error
            self._inflight = None
            self._failed(f"staging at step {step} failed: {type(e).__name__}: {e}")
            return False
        record["blocked_s"] = time.perf_counter() - t0
        record["start_s"] = record["blocked_s"] - record["previous_s"] - record["capture_s"] - record["buffer_s"]
        if not background:
            self._poll(block=True)
            record["sync_s"] = time.perf_counter() - t0 - record["blocked_s"]
            record["blocked_s"] += record["sync_s"]
        return True

    @staticmethod
    def _source_device(sources: dict) -> torch.device:
        return next((t.device for t in sources.values() if t.device.type != "cpu"), torch.device("cpu"))

    def _preallocate(self, app_state: dict) -> None:
        """Size, allocate, pin the staging buffer and start the writer in the background, so the
        first save does not pay for them (called at the first non-saving step and after resume)."""
        _, okey, _ = split(app_state)
        if okey is not None and not app_state[okey].state:
            return  # sizes unknown until the optimizer's first step creates its state
        try:
            _, sources = self.capture(app_state, 0)
        except Exception:  # noqa: BLE001 - the first real save reports it
            self._prealloc_failed = True  # do not pay for get_state_dict at every step
            return
        self.stager = Stager(self._source_device(sources), self.cfg.device_snapshot)
        self.stager.prepare_async([(k, t.dtype, tuple(t.shape)) for k, t in sources.items()],
                                  then=self._ensure_writer)

    def save(self, step: int, app_state: dict) -> bool:
        """Save now regardless of the interval (e.g. the last step)."""
        return self.maybe_save(step, app_state, force=True)

    def _ensure_writer(self) -> None:
        fd = self.stager.buffer.fd
        if self.writer is None or not self.writer.alive() or self._writer_fd != fd:
            if self.writer is not None:
                self.writer.close()
            self.writer = WriterProcess(fd, self.stager.buffer.nbytes)
            self._writer_fd = fd

    def _job(self, step: int, index: dict) -> dict:
        job = {"op": "save", "step": step, "rank": self.rank, "world_size": self.world_size,
               "root": self.root, "tmp": os.path.join(self.root, C.temp_dirname(step, self.token)),
               "header": self.stager.layout.header, "nbytes": self.stager.layout.nbytes,
               "index": index, "commit": None, "parallel_hash": self._parallel_hash,
               "write_behind": self.cfg.write_behind_mb << 20}
        if self.rank == 0:
            job["commit"] = {"meta": self.meta, "timeout_s": self.cfg.commit_timeout_s,
                             "keep": self.cfg.keep, "keep_every": self.cfg.keep_every}
        return job

    def _poll(self, block: bool) -> float:
        """Collect the writer's answers; with block=True wait until no save is in flight."""
        t0 = time.perf_counter()
        while self._inflight is not None and self.writer is not None:
            writer = self.writer
            ans = writer.get(timeout=None if block else 0)
            if ans is None:
                break
            if ans["op"] not in ("done", "died"):
                continue
            inflight, self._inflight = self._inflight, None
            rec = next((r for r in reversed(self.stats) if r["step"] == inflight["step"]), {})
            rec.update({k: ans[k] for k in ("persist_s", "commit_s") if k in ans})
            rec["total_s"] = time.perf_counter() - inflight["t0"]
            if ans["op"] == "died" and self.writer is writer:
                self.writer = None
            if ans.get("prune_error"):
                log.warning("checkpoint retention could not delete old checkpoints: %s",
                            ans["prune_error"])
            if ans.get("ok"):
                if ans.get("committed"):
                    self.last_committed = ans["committed"]
                    log.info("checkpoint step %d committed: %s (%.2f GB, persist %.2f s; %s)",
                             ans["step"], ans["committed"], ans["bytes"] / 1e9, ans["persist_s"],
                             loop_cost(rec, self.cfg.async_save))
            else:
                self._failed(f"checkpoint at step {inflight['step']} failed on rank {self.rank}: "
                             f"{ans['error']}")
        return time.perf_counter() - t0

    def _failed(self, msg: str) -> None:
        prev = self.last_committed or "none yet"
        msg = f"{msg}. The previous checkpoint ({prev}) is intact."
        self.errors.append(msg)
        if self.cfg.on_error == "stop":
            raise C.CheckpointError(msg + " Stopping (checkpoint.on_error = 'stop').")
        log.warning("%s Training continues (checkpoint.on_error = 'continue').", msg)

    def attempted(self, step: int) -> bool:
        """Whether a save of `step` was started (not skipped, not off the interval)."""
        return bool(self.stats) and self.stats[-1]["step"] == step

    def busy(self) -> bool:
        """Whether a save is still staging or persisting (never blocks)."""
        self._poll(block=False)
        return self._inflight is not None

    def flush(self) -> None:
        """Block until the save in flight (if any) is persisted and, on rank 0, committed."""
        self._wait_staging(everything=True)
        self._poll(block=True)
        self._note_cost()
        self.budget.pause()

    def close(self) -> None:
        """Finish the save in flight, stop the writer process, free the staging buffer."""
        try:
            self.flush()
        finally:
            if self.stager is not None:
                self.stager.close()  # joins a preallocation that may still start the writer
                self.stager = None
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    # ---- resuming ----------------------------------------------------------------------------

    def resume(self, app_state: dict, resume: str = "auto") -> int:
        """Load the newest valid checkpoint (or PATH) into `app_state` in place; return its step."""
        if resume in ("none", "", None):
            return 0
        plan = None
        if self.rank == 0:
            plan = self._candidates(resume)
        plan = self._bcast_json(plan)
        if plan["error"]:
            raise C.CheckpointError(plan["error"])
        failures = []
        for folder in plan["candidates"]:
            manifest, reason = self._verify(folder)
            if self._all_ok(manifest is not None):
                step = self._load(folder, manifest, app_state)
                if failures and self.rank == 0:
                    log.warning("resumed from %s after skipping invalid newer checkpoint(s): %s",
                                folder, "; ".join(failures))
                if self.stager is None and self.cfg.interval > 0:
                    self._preallocate(app_state)
                return step
            why = reason or "verification failed on another rank"
            failures.append(f"{os.path.basename(folder)} ({why})")
            log.warning("checkpoint %s is invalid on rank %d: %s; falling back to the previous one",
                        folder, self.rank, why)
            if self.rank == 0 and resume == "auto":
                C.quarantine(self.root, folder, self.token)
        if failures:
            raise C.CheckpointError(f"no valid checkpoint to resume from: {'; '.join(failures)}. "
                                    "Move them away and use --resume none to start fresh.")
        if resume != "auto":
            raise C.CheckpointError(f"--resume {resume}: no committed checkpoint there")
        return 0

    def _candidates(self, resume: str) -> dict:
        if resume == "auto":
            return {"candidates": [p for _, p in C.list_committed(self.root)], "error": ""}
        if os.path.isfile(os.path.join(resume, C.MANIFEST)):
            return {"candidates": [resume], "error": ""}
        found = [p for _, p in C.list_committed(resume)]
        err = "" if found else (f"--resume {resume}: not a checkpoint folder (no {C.MANIFEST}) and "
                                "no step-* checkpoints inside; pass a step-NNNNNNNN folder or auto")
        return {"candidates": found, "error": err}

    def _verify(self, folder: str):
        """Sizes on every rank; each rank checksums its share of the files."""
        try:
            names = sorted(C.read_manifest(folder)["files"])
            mine = names[self.rank::self.world_size]
            return C.verify(folder, self.cfg.verify_checksums, only=mine), ""
        except (C.CheckpointInvalid, OSError, KeyError, TypeError) as e:
            return None, str(e)

    def _load(self, folder: str, manifest: dict, app_state: dict) -> int:
        t0 = time.perf_counter()
        error = ""
        try:
            reader = Reader(folder, manifest)
            mkey, okey, others = split(app_state)
            sharded = sharded_state(app_state)
            targets: dict = {}
            for k, v in sharded.items():
                encode(v, k, targets)
            saved = reader.sharded_skeleton()
            for path, t in targets.items():
                reader.fill(path, t)
            extra = sorted(set(reader.global_shapes) - set(targets))
            if extra:
                raise C.CheckpointError(f"{folder}: tensors not in the live state: {extra[:5]}")
            same = manifest["world_size"] == self.world_size
            local = reader.local_state(self.rank if same else 0)
            reader.close()
            missing = [k for k in [mkey, okey, *others] if k is not None
                       and k not in (saved if k in (mkey, okey) else local)]
            if missing:
                raise C.CheckpointError(f"{folder}: no saved state for {missing} (saved: "
                                        f"{sorted(saved) + sorted(local)}); app_state keys must "
                                        "match the run that saved it")
            msd = decode(saved[mkey], lambda key: targets[key]) if mkey else {}
            osd = decode(saved[okey], lambda key: targets[key]) if okey else {}
        except Exception as e:  # noqa: BLE001 - raised below on every rank, after agreeing
            error = f"{type(e).__name__}: {e}"
        if not self._all_ok(not error):
            raise C.CheckpointError(f"loading {folder} failed on rank {self.rank}: "
                                    f"{error or 'failed on another rank'}")
        self.capture.forget()  # its views alias the state being replaced
        if mkey is not None:
            set_state_dict(app_state[mkey], [app_state[okey]] if okey else [],
                           model_state_dict=msd, optim_state_dict=osd)
        for k in others:
            obj = app_state[k]
            if hasattr(obj, "load_state_dict"):
                obj.load_state_dict(local[k])
            else:
                obj.clear()
                obj.update(local[k])
        if (not same or manifest["layout"] != self.meta["layout"]) and self.rank == 0:
            log.warning("resharding %s: saved on world size %d layout %s, loading on %d layout %s",
                        folder, manifest["world_size"], manifest["layout"], self.world_size,
                        self.meta["layout"])
        log.info("resumed from %s (step %d) in %.2f s", folder, manifest["step"],
                 time.perf_counter() - t0)
        return int(manifest["step"])
