"""A gloo process pool for tests: spawn N ranks once per test module, run many functions on them.

Usage in a test module:

    pool = pytest.fixture(scope="module")(lambda: ...)  # see conftest.py: dist_pool(n)

    def _check(rank, world_size, x):        # module-level so the workers can import it
        ...                                 # runs on every rank inside the process group
        return value                        # picklable; collected as a list indexed by rank

    def test_something(pool4):
        results = pool4.run(_check, 3)

An exception on any rank fails the test with that rank's traceback. A rank that does not
answer within `timeout_s` (e.g. a hang in a collective) kills the pool; the next `run` starts
a fresh one, so one hang costs one test, not the module.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import sys
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, sys_path: list[str], tasks, results) -> None:
    sys.path[:] = sys_path
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    from feixing.distributed.env import enable_flight_recorder

    torch.set_num_threads(1)
    enable_flight_recorder()  # as the trainer does: the hang watchdog reads it
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        task = tasks.get()
        if task is None:
            break
        module, name, args, kwargs = task
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, fn(rank, world_size, *args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    """N gloo ranks on localhost that run module-level functions on request."""

    def __init__(self, world_size: int, timeout_s: float = 300.0):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, daemon=True,
                        args=(r, self.world_size, port, list(sys.path), self._tasks[r], self._results))
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, **kwargs) -> list:
        """Run fn(rank, world_size, *args, **kwargs) on every rank; return results by rank."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._tasks:
            q.put((fn.__module__, fn.__qualname__, args, kwargs))
        out: dict[int, object] = {}
        errors: dict[int, str] = {}
        timeout = self.timeout_s
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(self.world_size)) - set(out) - set(errors))
                self.close(graceful=False)
                msg = [f"{fn.__qualname__}: ranks {missing} did not finish in {timeout:.0f} s"]
                msg += [f"rank {r} failed:\n{t}" for r, t in sorted(errors.items())]
                raise (AssertionError if errors else TimeoutError)("\n".join(msg)) from None
            if ok:
                out[rank] = value
            else:
                errors[rank] = value
                # The other ranks may now wait forever in a collective: give them a short grace.
                timeout = min(self.timeout_s, 20.0)
        if errors:
            self.close(graceful=False)
            raise AssertionError("\n".join(f"rank {r} failed:\n{t}" for r, t in sorted(errors.items())))
        return [out[r] for r in range(self.world_size)]

    def close(self, graceful: bool = True) -> None:
        """Stop the ranks: ask them to leave the group, or kill them (after a failure or hang,
        when some may be stuck in a collective)."""
        if not graceful:
            for p in self._procs:
                p.kill()
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except Exception:  # noqa: BLE001 - queue may be broken after a crash
                pass
        for p in self._procs:
            p.join(timeout=5 if graceful else 1)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
