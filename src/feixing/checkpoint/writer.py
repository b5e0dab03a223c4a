"""The background writer process: persists a staged host buffer to disk at low CPU and I/O priority.

A process, not a thread, so persisting never competes with the training loop for the GIL. It
imports only the standard library (no torch): it starts in tens of milliseconds and stays small.

Protocol (JSON lines): the parent writes jobs to the child's stdin, the child answers on stdout.
The staging buffer is a memfd shared by file descriptor, so no byte is copied between processes.

    parent -> child  {"op": "save", "step", "tmp", "root", "rank", "world_size", "header",
                      "nbytes", "index", "commit": {...} | null}      |  {"op": "exit"}
    child -> parent  {"op": "ready"}  |  {"op": "done", "step", "ok", "error", "committed",
                      "pruned", "persist_s", "commit_s", "bytes"}
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import platform
import queue
import struct
import subprocess
import sys
import threading
import time
import traceback

from feixing.checkpoint import commit as _commit

_CHUNK = 16 << 20  # per write when another thread hashes
_PIECE = 1 << 20  # hash-then-write piece: stays in a core's L2 between the two reads
_WRITE_BEHIND = 32 << 20  # default write-behind window (checkpoint.write_behind_mb)
_IOPRIO_SYSCALL = {"x86_64": 251, "aarch64": 30}


def lower_priority(nice: int = 10) -> str:
    """Lower this process's CPU (nice) and I/O (best-effort class, lowest level) priority."""
    done = []
    try:
        os.nice(nice)
        done.append(f"nice+{nice}")
    except OSError:
        pass
    nr = _IOPRIO_SYSCALL.get(platform.machine())
    if sys.platform.startswith("linux") and nr is not None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            # ioprio_set(IOPRIO_WHO_PROCESS=1, self=0, class BE=2 << 13 | level 7 = lowest)
            if libc.syscall(nr, 1, 0, (2 << 13) | 7) == 0:
                done.append("ioprio=be/7")
        except OSError:
            pass
    return ",".join(done)


def _libc_sync_file_range():
    """glibc's sync_file_range (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


class _WriteBehind:
    """Keeps a large write from piling up dirty pages in the page cache.

    Left alone, the kernel holds the whole checkpoint as dirty pages until the final fsync or
    its background flush, then writes and reclaims them in its own threads, at normal priority
    and on any core. Saving 6 GB that way on the 2-core VM kept the kernel busy for 8-13% of both
    cores, against 4-6% this way, and the save took 23-26 s instead of 18 (docs/BENCHMARKS.md,
    "write-behind"). So every `window` bytes (`checkpoint.write_behind_mb`) this starts the disk
    write of the window just written, waits (in this low-priority process) for the one before it
    and drops that one from the page cache: the disk works while the next window is hashed, and
    at most two windows are dirty."""

    SYNC_WAIT_BEFORE, SYNC_WRITE, SYNC_WAIT_AFTER = 1, 2, 4
    _sync = _libc_sync_file_range()

    def __init__(self, fd: int, window: int):
        self.fd, self.window, self.started = fd, window, 0

    def written(self, end: int) -> None:
        """The file now holds `end` bytes."""
        if self._sync is None or self.window <= 0:
            return
        w = self.window
        while end - self.started >= w:
            start = self.started
            self._sync(self.fd, start, w, self.SYNC_WRITE)  # start it, do not wait
            if start >= w:
                prev = start - w
                self._sync(self.fd, prev, w, self.SYNC_WAIT_BEFORE | self.SYNC_WRITE | self.SYNC_WAIT_AFTER)
                os.posix_fadvise(self.fd, prev, w, os.POSIX_FADV_DONTNEED)
            self.started += w


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def hash_in_parallel(local_world_size: int | None = None) -> bool:
    """Whether the writer may hash on a second thread: only where each rank has 4 cores or more
    (its loop, staging, writer, hasher). Below that a second writer thread takes CPU time from
    the training loop, which on a 2-core machine cost far more than the slower save saves."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return cpus >= 4 * max(local_world_size, 1)


def persist(buf, nbytes: int, header: bytes, path: str, parallel: bool = False,
            write_behind: int = _WRITE_BEHIND) -> tuple[int, str]:
    """Write a safetensors file (header + buffer bytes) and its sha256, reading the buffer once.

    parallel=False: one thread hashes each 1 MiB piece, then writes it while it is still in the
    core's cache; the writer never uses more than one core. parallel=True: a second thread hashes
    the whole buffer while this one writes (hashlib and os.write release the GIL), so a save
    takes max(write, hash) instead of their sum, at the price of a second busy core.
    write_behind: bytes per write-behind window (see _WriteBehind); 0 = off.
    """
    h = hashlib.sha256()
    prefix = struct.pack("<Q", len(header)) + header
    h.update(prefix)
    view = memoryview(buf)[:nbytes] if nbytes else memoryview(b"")
    hasher = None
    if parallel:
        hasher = threading.Thread(target=h.update, args=(view,), name="feixing-ckpt-sha256")
        hasher.start()
    chunk = _CHUNK if parallel else _PIECE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(prefix))
        behind = _WriteBehind(fd, write_behind)
        for off in range(0, nbytes, chunk):
            piece = view[off: off + chunk]
            if hasher is None:
                h.update(piece)
            _write_all(fd, piece)
            behind.written(len(prefix) + off + len(piece))
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            # Nobody reads a checkpoint back soon: do not push training data out of the page cache.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
        if hasher is not None:
            hasher.join()
    return len(prefix) + nbytes, h.hexdigest()


def run_job(buf, job: dict) -> dict:
    """Persist this rank's part of one checkpoint; on rank 0 also commit it and apply retention."""
    step, rank, tmp = job["step"], job["rank"], job["tmp"]
    stem = os.path.join(tmp, _commit.rank_stem(rank))
    out = {"op": "done", "step": step, "ok": False, "error": "", "committed": "", "pruned": [],
           "persist_s": 0.0, "commit_s": 0.0, "bytes": 0}
    t0 = time.monotonic()
    try:
        try:
            os.mkdir(tmp)  # no parents: a vanished checkpoints folder is an error, not recreated
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise _commit.CheckpointError(
                f"checkpoint folder {job['root']} vanished (deleted or unmounted during the run)"
            ) from None
        size, digest = persist(buf, job["nbytes"], job["header"].encode(), stem + ".safetensors",
                               job.get("parallel_hash", False), job.get("write_behind", _WRITE_BEHIND))
        index = dict(job["index"], size=size, sha256=digest)
        _commit.write_durable(stem + ".json", json.dumps(index).encode())
        _commit.fsync_dir(tmp)
        out["bytes"] = size
        out["persist_s"] = time.monotonic() - t0
        if job.get("commit") is not None:
            c = job["commit"]
            t1 = time.monotonic()
            out["committed"] = _commit.commit(job["root"], tmp, step, job["world_size"],
                                              c["meta"], c["timeout_s"])
            out["commit_s"] = time.monotonic() - t1
            try:  # the checkpoint is committed; failing to delete old ones must not undo that
                out["pruned"] = _commit.prune(job["root"], step, c["keep"], c["keep_every"])
            except OSError as e:
                out["prune_error"] = f"{type(e).__name__}: {e}"
        out["ok"] = True
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the trainer
        out["error"] = f"{type(e).__name__}: {e}"
        try:  # tell rank 0's commit not to wait for this rank
            if os.path.isdir(tmp):
                _commit.write_durable(stem + ".error", out["error"].encode())
        except OSError:
            pass
        if job.get("commit") is not None:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str]) -> None:
    fd, size = int(argv[0]), int(argv[1])
    buf = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else b""
    prio = lower_priority()
    out = sys.stdout
    out.write(json.dumps({"op": "ready", "priority": prio, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        job = json.loads(line)
        if job["op"] == "exit":
            break
        out.write(json.dumps(run_job(buf, job)) + "\n")
        out.flush()


class WriterProcess:
    """Parent side: start the child, send jobs, collect answers without blocking the loop."""

    def __init__(self, fd: int, size: int):
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
        args = [sys.executable, "-u", "-m", "feixing.checkpoint.writer", str(fd), str(size)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     pass_fds=(fd,) if size else (), env=env, text=True)
        self.answers: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True, name="feixing-ckpt-reader")
        self._reader.start()
        self.ready = self.get(timeout=120.0)
        if self.ready is None or self.ready.get("op") != "ready":
            raise _commit.CheckpointError(f"checkpoint writer process failed to start: {self.ready}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.answers.put(json.loads(line))
        code = self.proc.wait()
        self.answers.put({"op": "died", "ok": False, "returncode": code,
                          "error": f"checkpoint writer process died (exit code {code})"})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, job: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            self.answers.put({"op": "died", "ok": False, "returncode": self.proc.poll(),
                              "error": f"checkpoint writer process is gone ({e})"})

    def get(self, timeout: float | None = None) -> dict | None:
        try:
            return self.answers.get(timeout=timeout)
        except queue.Empty:
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.send({"op": "exit"})
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5.0)  # it ends at the child's end of output
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        """Stop the child at once (SIGKILL), as a crash would."""
        self.proc.kill()
        self.proc.wait()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BrokenPipeError:  # the trainer is gone; the job it handed over was still finished
        os._exit(0)  # not sys.exit: flushing stdout at exit would raise again
    except Exception:  # noqa: BLE001 - the parent sees the exit code and this traceback on stderr
        traceback.print_exc()
        sys.exit(1)
