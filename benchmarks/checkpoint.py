"""How much do checkpoints cost the loop? feixing vs DCP async_save vs synchronous dcp.save, one run.

A model of `--params` fp32 (or `--dtype bf16`) parameters with AdamW state (12 or 6 bytes per parameter) is saved
every `--interval` steps of a fixed compute loop that stands for training steps (matmuls on the
state's device). Per method: time the loop is blocked per save, extra step time while a save
persists (summed over the steps it overlaps, and the worst single step), persist GB/s, host
memory (RSS of the process and its writer children) per save, and the loop's total overhead.
`--every-step-saves N` then saves a small state after each of N steps (overhead; is memory flat?).
`--interference` only measures how much the writer process slows the loop's work while it
persists (writer switched on and off every 0.5 s, ABBA), which a noisy host's step times cannot
show; a thread running dcp.save in the loop's process is measured the same way for comparison.

    PYTHONPATH=src python benchmarks/checkpoint.py --params 50e6 --saves 4 --interval 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from feixing.checkpoint import Manager
from feixing.config.schema import CheckpointConfig
from feixing.distributed.launch import free_port


def build_state(n_params: float, device: str, block: int = 1 << 22, dtype=torch.float32):
    """ParameterList of `block`-sized tensors + AdamW with its state created by one real step
    (AdamW's moments take the parameters' dtype: 12 bytes per parameter in fp32, 6 in bf16)."""
    n = int(n_params)
    sizes = [block] * (n // block) + ([n % block] if n % block else [])
    model = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02)
                                   for s in sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    for p in model:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    nbytes = sum(p.numel() * p.element_size() * 3 for p in model)
    return {"model": model, "optim": opt, "loader": {"sample": 0}}, nbytes


class Work:
    """A fixed amount of work per step on `device`, calibrated to about `ms`: matmuls (compute-
    bound, L2-resident) or, with memory=True, passes over a 64 MB tensor (memory-bound)."""

    def __init__(self, device: str, ms: float, memory: bool = False):
        self.device, self.memory = device, memory
        n = 2048 if device == "cuda" else 384
        if memory:
            self.x = torch.zeros(16 << 20, device=device)
        else:
            self.a = torch.randn(n, n, device=device)
            self.b = torch.randn(n, n, device=device)
        self.k = 10
        self.run()  # warm up (library init, caches)
        t = self.run() / 10
        self.k = max(1, int(ms / 1000 / max(t, 1e-6)))

    def run(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.k):
            if self.memory:
                self.x.add_(1.0)
            else:
                self.a = torch.tanh(self.a @ self.b * 1e-3)
        if self.device == "cuda":  # this stream only, as the trainer: not the side stream of a save
            torch.cuda.current_stream().synchronize()
        return time.perf_counter() - t0


def abba(i: int) -> bool:
    """Whether slot i of an A-B-B-A-... alternation is B: slow changes of the host's speed fall
    on both sides alike."""
    return i % 4 in (1, 2)


def kernel_cpu() -> tuple[int, int]:
    """(system + irq + softirq, all) CPU ticks of the whole machine so far (Linux; else zeros):
    the kernel's own work, e.g. flushing and reclaiming the page cache while a save is written."""
    try:
        with open("/proc/stat") as f:
            t = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return t[2] + t[5] + t[6], sum(t)


def rss_gb() -> float:
    """Memory (PSS) of this process and its children (the feixing writer), in GB."""
    def rss(pid):  # proportional set size: the shared staging buffer is not counted twice
        for name, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS")):
            try:
                with open(name) as f:
                    return next(int(x.split()[1]) * 1024 for x in f if x.startswith(key))
            except (OSError, StopIteration):
                continue
        return 0
    total, me = rss(os.getpid()), os.getpid()
    try:
        for tid in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{tid}/children") as f:
                total += sum(rss(int(c)) for c in f.read().split())
    except OSError:
        pass
    return total / 1e9


class Feixing:
    def __init__(self, root: str, app: dict, parallel_hash: bool | None = None, write_behind_mb: int = 32,
                 device_snapshot: str = "auto", when_busy: str = "wait", max_overhead: float = 0.0):
        # interval: never by itself; saves are forced below. maybe_save() after each step lets
        # the manager allocate its buffer ahead of the first save, as in the trainer.
        # when_busy = "skip": every step is due (interval 1) and save() skips while one is in flight.
        self.skip = when_busy == "skip"
        self.ck = Manager(CheckpointConfig(interval=1 if self.skip else 10**9, keep=1, verify_checksums=False,
                                           write_behind_mb=write_behind_mb, device_snapshot=device_snapshot,
                                           when_busy=when_busy, max_overhead=max_overhead), root, 0, 1)
        self.name = "feixing" if write_behind_mb else "feixing(no write-behind)"
        if self.skip:
            self.name += "(when_busy skip)"
        self.budgeted = max_overhead > 0
        if self.budgeted:
            self.name += f"(max_overhead {max_overhead:g})"
        if device_snapshot != "auto":
            self.name += f"(device snapshot {device_snapshot})"
        if parallel_hash is not None:  # force the writer's hashing mode (default: by core count)
            self.ck._parallel_hash = parallel_hash
            self.name += "(2 writer threads)" if parallel_hash else "(1 writer thread)"

    def after_step(self, step: int, app: dict) -> None:
        if not self.skip:  # with interval 1 this would be a save
            self.ck.maybe_save(step, app)

    def save(self, step: int, app: dict) -> None:
        if self.skip:
            self.ck.maybe_save(step, app)
        else:
            self.ck.save(step, app)

    def save_now(self, step: int, app: dict) -> None:
        """A save whatever when_busy and max_overhead say (the benchmark's setup)."""
        self.ck.maybe_save(step, app, force=True)

    def before_optimizer(self) -> None:
        self.ck.wait_staging()

    def done(self) -> bool:
        return not self.ck.busy()

    def flush(self) -> None:
        self.ck.flush()

    def close(self) -> list[dict]:
        self.ck.close()
        keep = ("stage_s", "snapshot", "previous_s", "capture_s", "buffer_s", "start_s", "wait_s", "blocked_s",
                "loop_cost_s")  # see Manager.stats
        return [{"persist_s": r.get("persist_s", 0) + r.get("commit_s", 0), **{k: r.get(k) for k in keep}}
                for r in self.ck.stats]


class Dcp:
    def __init__(self, root: str, app: dict, asynchronous: bool, process: bool = False):
        self.root, self.asynchronous, self.process = root, asynchronous, process
        self.name = "dcp.async_save" + ("(process)" if process else "") if asynchronous else "dcp.save"
        self.fut, self.records, self.folders = None, [], []

    def save(self, step: int, app: dict) -> None:
        if self.fut is not None:
            self.fut.result()  # one save in flight, as torchtitan does
        msd, osd = get_state_dict(app["model"], [app["optim"]])
        sd = {"model": msd, "optim": osd, "loader": dict(app["loader"])}
        folder = os.path.join(self.root, f"step-{step}")
        rec = {"t0": time.perf_counter()}
        self.records.append(rec)
        if not self.asynchronous:
            dcp.save(sd, checkpoint_id=folder)
            rec["persist_s"] = time.perf_counter() - rec["t0"]
        else:
            kw = {}
            if self.process:
                from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
                kw["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
            self.fut = dcp.async_save(sd, checkpoint_id=folder, **kw)
            self.fut.add_done_callback(lambda f: rec.setdefault("persist_s",
                                                                time.perf_counter() - rec["t0"]))
        self.folders.append(folder)
        if len(self.folders) > 2:  # keep disk use bounded like keep=1
            shutil.rmtree(self.folders.pop(0), ignore_errors=True)

    def before_optimizer(self) -> None:
        pass

    def after_step(self, step: int, app: dict) -> None:
        pass

    def done(self) -> bool:
        return self.fut is None or self.fut.done()

    def flush(self) -> None:
        if self.fut is not None:
            self.fut.result()

    def close(self) -> list[dict]:
        self.flush()
        return self.records


def run_method(method, app: dict, work: Work, saves: int, interval: int, base: float,
               warmup: int = 0) -> dict:
    """Steps with saves. The baseline step time is this method's own: the median of its steps
    with no save in flight (warm-up steps and steps after a save finished), so slow drifts of
    the machine's load between methods do not show up as cost."""
    blocked, rss, over_dts, idle, kernel = [], [], [], [], []
    step = 1  # as in the trainer: maybe_save(0) would be a save (0 % interval == 0)
    p0 = app["model"][0]
    for _ in range(warmup):  # training before the first save, as in a real run
        idle.append(work.run())
        method.after_step(step, app)
        step += 1
    t_loop = time.perf_counter()
    measuring = 0.0
    for _ in range(saves):
        k0 = kernel_cpu()
        t0 = time.perf_counter()
        method.save(step, app)
        b = time.perf_counter() - t0
        dts = []
        for _ in range(interval):
            dt = work.run()
            t1 = time.perf_counter()
            method.before_optimizer()
            b += time.perf_counter() - t1
            with torch.no_grad():
                p0.add_(1e-6)  # the "optimizer" changes a parameter after wait_staging
            method.after_step(step, app)
            step += 1
            app["loader"]["sample"] = step
            if not method.done() or not dts:  # persisting (or done within the first step)
                dts.append(dt)
            else:
                idle.append(dt)
        over_dts.append(dts)
        blocked.append(b)
        t2 = time.perf_counter()
        k1 = kernel_cpu()
        kernel.append(100 * (k1[0] - k0[0]) / max(k1[1] - k0[1], 1))
        rss.append(rss_gb())
        done = len(blocked)
        if saves >= 20 and done % 10 == 0:  # long runs: progress with an ETA
            per = (t2 - t_loop) / done
            print(f"{method.name}: save {done}/{saves}, blocked {b:.3f} s, memory {rss[-1]:.2f} GB, "
                  f"ETA {per * (saves - done) / 60:.0f} min", file=sys.stderr, flush=True)
        measuring += time.perf_counter() - t2  # reading /proc is the benchmark's, not the save's
    loop_s = time.perf_counter() - t_loop - measuring
    records = method.close()
    persist = [r["persist_s"] for r in records if r.get("persist_s")]
    own = statistics.median(idle) if len(idle) >= 3 else base
    return {"method": method.name, "blocked_s": blocked, "base_s": own, "idle_steps": len(idle), "idle_s": idle,
            "extra_step_s": [sum(d - own for d in dts) for dts in over_dts],
            "worst_step_slowdown": [max(d / own - 1 for d in dts) for dts in over_dts],
            "steps_overlapped": [len(dts) for dts in over_dts], "step_s": over_dts,
            "persist_s": persist, "rss_gb": rss, "kernel_cpu_pct": kernel,
            "overhead": loop_s / (saves * interval * own) - 1, "saves": records}


def every_step_ab(method, app: dict, work: Work, blocks: int, block_steps: int) -> dict:
    """Saving after every step against not saving, in alternating blocks of `block_steps` steps
    (ABBA) in one loop, so the host's slow changes of speed fall on both alike. A saving block
    ends by waiting for its last save, and that wait counts as its time, except for a method that
    never waits (`skip`: checkpoint.when_busy = 'skip'), whose saves run back to back in a real
    run: there the save still in flight is waited for outside the timing, so that it slows
    neither block."""
    step, p0 = 1, app["model"][0]
    t = {True: [], False: []}
    for _ in range(3):  # warm-up, and the manager allocates its buffer
        work.run()
        method.after_step(step, app)
        step += 1
    # The first save allocates (the skip method has no earlier chance). A budgeted method
    # (checkpoint.max_overhead) would charge that one-time cost to the measured saves, so it
    # gets a second, ordinary setup save: the one its budget starts from.
    budgeted = getattr(method, "budgeted", False)
    setup = 2 if budgeted else 1
    for _ in range(setup):
        (method.save_now if budgeted else method.save)(step, app)
        method.flush()
        step += 1
        work.run()
    for b in range(blocks):
        saving = abba(b)
        t0 = time.perf_counter()
        for _ in range(block_steps):
            work.run()
            method.before_optimizer()
            with torch.no_grad():
                p0.add_(1e-6)
            method.after_step(step, app)
            if saving:
                method.save(step, app)
            step += 1
        t_end = time.perf_counter()
        if saving:
            method.flush()
            if not getattr(method, "skip", False):
                t_end = time.perf_counter()
        t[saving].append(t_end - t0)
    recs = method.close()
    saves = len(recs) - setup  # saves taken (with when_busy = 'skip', fewer than the saving steps)
    med = {k: statistics.median(v) for k in ("blocked_s", "wait_s", "stage_s", "persist_s")
           if (v := [r[k] for r in recs[setup:] if r.get(k) is not None])}  # per save, setup left out
    pairs = [t[True][i] / t[False][i] - 1 for i in range(min(len(t[True]), len(t[False])))]
    out = {"method": method.name, "blocks": blocks, "block_steps": block_steps, "saves_taken": saves,
           "saving_steps": block_steps * len(t[True]),
           "overhead_pct": 100 * (sum(t[True]) / sum(t[False]) - 1),
           "pair_overhead_pct": sorted(100 * x for x in pairs), "block_s": {"saving": t[True], "not": t[False]},
           "per_save_median_s": med}
    if budgeted:  # the budget's share is of the whole loop, idle blocks too
        total = sum(t[True]) + sum(t[False])
        out["whole_loop_pct"] = 100 * (total / (2 * sum(t[False])) - 1)
        out["budget_cost_pct"] = 100 * sum(r.get("loop_cost_s") or 0 for r in recs[setup:]) / total
    q = out["pair_overhead_pct"]
    print(f"{method.name}: saving after every step ({saves} saves taken in {out['saving_steps']} saving steps) "
          f"costs {out['overhead_pct']:+.2f} % "
          f"(block pairs: median {statistics.median(q):+.1f} %, range {q[0]:+.1f} .. {q[-1]:+.1f} %); per save "
          + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
          + ("; over the whole loop {whole_loop_pct:+.2f} %, the saves' cost as the budget measured it "
             "{budget_cost_pct:.2f} % of the loop".format(**out) if "whole_loop_pct" in out else ""), flush=True)
    return out


def _at(xs: list[float], q: float) -> float:
    """The q quantile of sorted `xs` (nearest rank below)."""
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def worst_vs_idle(r: dict) -> float:
    """The slowest step while a save persisted against the slowest of as many steps without one.

    On a noisy host the slowest of N ordinary steps is already well above the median (on this
    VM identical steps vary by +-25%), so "no single step slower by more than 5%" is judged
    against the expected maximum of N idle steps: their 1 - 1/(N+1) quantile."""
    over = [d for dts in r["step_s"] for d in dts]
    idle = sorted(r["idle_s"])
    if not over or len(idle) < 5:
        return float("nan")
    return 100 * (max(over) / _at(idle, 1 - 1 / (len(over) + 1)) - 1)


def quantiles_vs_idle(r: dict, qs=(0.5, 0.9)) -> dict:
    """Steps that overlapped a persist against steps that did not, quantile by quantile (%): with
    many saves this shows whether the whole distribution moved, not only its single worst step."""
    over = sorted(d for dts in r["step_s"] for d in dts)
    idle = sorted(r["idle_s"])
    if len(over) < 5 or len(idle) < 5:
        return {}
    return {f"step_q{round(q * 100)}_vs_idle_pct": 100 * (_at(over, q) / _at(idle, q) - 1) for q in qs}


def summarize(r: dict, nbytes: int, base: float, interval: int) -> dict:
    base = r["base_s"]
    later = r["blocked_s"][1:] or r["blocked_s"]
    persist = statistics.median(r["persist_s"]) if r["persist_s"] else float("nan")
    over = [e / (n * base) for e, n in zip(r["extra_step_s"], r["steps_overlapped"]) if n]
    return {"method": r["method"], "base_step_s": base, "blocked_first_s": r["blocked_s"][0],
            "blocked_median_s": statistics.median(later),
            "blocked_pct_of_step": 100 * statistics.median(later) / base,
            "lost_pct_of_interval": 100 * statistics.median(r["extra_step_s"]) / (interval * base),
            "lost_pct_of_overlapped": 100 * statistics.median(over) if over else 0.0,
            "worst_step_slowdown_pct": 100 * max(r["worst_step_slowdown"]),
            "worst_step_vs_idle_pct": worst_vs_idle(r), **quantiles_vs_idle(r),
            "persist_s": persist, "persist_gbps": nbytes / 1e9 / persist,
            "persist_gbps_first": nbytes / 1e9 / r["persist_s"][0] if r["persist_s"] else 0.0,
            "persist_gbps_last": nbytes / 1e9 / r["persist_s"][-1] if r["persist_s"] else 0.0,
            "rss_first_gb": r["rss_gb"][0], "rss_last_gb": r["rss_gb"][-1],
            "kernel_cpu_pct": statistics.median(r["kernel_cpu_pct"]),
            "loop_overhead_pct": 100 * r["overhead"]}


def _while_on(on, stop, work) -> None:
    """Background load for interference(): repeat `work()` while `on` is set, until `stop`."""
    while not stop.is_set():
        if on.wait(0.05):
            work()


def _writer_loop(path: str, on, stop) -> None:
    """Child process: the real writer's persist() of a 16 MiB buffer, over and over, while `on`."""
    from feixing.checkpoint.writer import lower_priority, persist

    lower_priority()
    buf = os.urandom(16 << 20)
    _while_on(on, stop, lambda: persist(buf, len(buf), b"{}", path))


def _dcp_thread_loop(root: str, on, stop) -> None:
    """Thread in the loop's own process: dcp.save of a 16 MiB state, over and over, while `on`
    (what DCP's default async_save runs in the background)."""
    sd = {"w": torch.randn(4 << 20)}
    count = [0]

    def save():
        folder = os.path.join(root, f"dcp-{count[0] % 2}")
        shutil.rmtree(folder, ignore_errors=True)
        dcp.save(sd, checkpoint_id=folder, no_dist=True)
        count[0] += 1

    _while_on(on, stop, save)


def interference(root: str, unit_ms: float = 20.0, cycles: int = 40, window_s: float = 0.5) -> dict:
    """How much slower the loop's work runs while a save persists in the background, alternating
    the background work on and off every `window_s` (ABBA) so that the host's own slow changes of
    speed cancel out; for a compute-bound unit (the stand-in step's matmuls) and a memory-bound
    one. Background: feixing's writer process, and for comparison a thread running dcp.save."""
    import multiprocessing as mp
    import threading

    ctx = mp.get_context("spawn")
    os.makedirs(root, exist_ok=True)
    units = (("compute", Work("cpu", unit_ms)), ("memory", Work("cpu", unit_ms, memory=True)))
    out = {}
    for writer in ("feixing_process", "dcp_thread"):
        if writer == "feixing_process":
            on, stop = ctx.Event(), ctx.Event()
            bg = ctx.Process(target=_writer_loop, args=(os.path.join(root, "interference.bin"), on, stop))
        else:
            on, stop = threading.Event(), threading.Event()
            bg = threading.Thread(target=_dcp_thread_loop, args=(root, on, stop), daemon=True)
        bg.start()
        try:
            for name, unit in units:
                times = {True: [], False: []}
                for c in range(cycles):
                    state = abba(c)
                    on.set() if state else on.clear()
                    t_end = time.perf_counter() + window_s
                    unit.run()  # the switch's own transition
                    while time.perf_counter() < t_end:
                        times[state].append(unit.run())
                on.clear()
                on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
                key = name if writer == "feixing_process" else f"{name}_dcp_thread"
                out[key] = {"unit_ms_off": 1e3 * off_s, "unit_ms_on": 1e3 * on_s,
                            "slowdown_pct": 100 * (on_s / off_s - 1),
                            "units": {"on": len(times[True]), "off": len(times[False])}}
                print(f"{name}-bound work next to {writer}: {1e3 * on_s:.2f} ms vs {1e3 * off_s:.2f} ms "
                      f"without ({out[key]['slowdown_pct']:+.1f} %)", flush=True)
        finally:
            stop.set()
            on.set()
            bg.join(30)
    return out


def _repeat(fn, stop) -> None:
    while not stop.is_set():
        fn()


def gil_check(n_tensors: int = 3000, reps: int = 5) -> dict:
    """How much does a staging thread slow a launch-bound loop (many small ops, the GIL taken
    between each)? One `copy_` per tensor from Python against one `torch._foreach_copy_` call."""
    import threading

    srcs = [torch.randn(4096) for _ in range(n_tensors)]
    dsts = [torch.empty(4096) for _ in range(n_tensors)]
    x = torch.randn(64, 64)

    def step() -> float:
        t0, y = time.perf_counter(), x
        for _ in range(3000):
            y = torch.tanh(y @ x * 1e-2)
        return time.perf_counter() - t0

    def per_tensor():
        for d, src in zip(dsts, srcs):
            d.copy_(src)

    for _ in range(3):
        step()
    out = {"alone_s": statistics.median(step() for _ in range(reps))}
    for name, copy in (("per_tensor_copy", per_tensor),
                       ("foreach_copy", lambda: torch._foreach_copy_(dsts, srcs))):
        times = []
        for _ in range(reps):
            stop = threading.Event()
            th = threading.Thread(target=_repeat, args=(copy, stop))
            th.start()
            times.append(step())
            stop.set()
            th.join()
        out[name + "_s"] = statistics.median(times)
        print(f"loop next to a staging thread doing {name}: {1e3 * out[name + '_s']:.1f} ms, "
              f"alone {1e3 * out['alone_s']:.1f} ms (+{100 * (out[name + '_s'] / out['alone_s'] - 1):.0f} %)")
    return out


def set_autogroup_nice(nice: int) -> None:
    """New session (so a new scheduler autogroup, which the feixing writer inherits) at `nice`."""
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError as e:
        print(f"cannot set the autogroup nice value: {e}", file=sys.stderr)


def init_pg(device: str) -> None:
    port = free_port()
    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="parameters and AdamW moments (bf16: a 1B-parameter state fits this machine)")
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--interval", type=int, default=6, help="steps between saves")
    ap.add_argument("--warmup", type=int, default=5, help="steps before the first save")
    ap.add_argument("--step-ms", type=float, default=0, help="0: 300 on CPU, 100 on CUDA")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", default="feixing,dcp_async,dcp_sync")
    ap.add_argument("--every-step-saves", type=int, default=0,
                    help="then save a small state after every step this many times")
    ap.add_argument("--every-step-params", type=float, default=2e6)
    ap.add_argument("--every-step-block", type=int, default=10, help="steps per block of --every-step-ab")
    ap.add_argument("--every-step-ab", type=int, default=0,
                    help="also: this many alternating blocks of 10 steps with and without a save after every step")
    ap.add_argument("--autogroup-nice", type=int, default=None,
                    help="run in a new session whose scheduler autogroup has this nice value "
                         "(e.g. -20 as root): with kernel.sched_autogroup_enabled=1, nice alone "
                         "does not make other sessions' background jobs yield to this one")
    ap.add_argument("--gil-check", action="store_true",
                    help="only measure how a staging thread's copy calls slow a Python loop")
    ap.add_argument("--interference", action="store_true",
                    help="only measure how much slower the loop's work runs while the writer persists")
    ap.add_argument("--interference-cycles", type=int, default=40, help="writer on/off windows of 0.5 s")
    ap.add_argument("--dir", default="/tmp/feixing-ckpt-bench")
    ap.add_argument("--out", default="benchmarks/results/checkpoint.json")
    a = ap.parse_args()
    if a.autogroup_nice is not None:
        set_autogroup_nice(a.autogroup_nice)
    torch.set_num_threads(1)
    if a.gil_check or a.interference:  # measurements of their own, without the save loop
        res = gil_check() if a.gil_check else \
            interference(os.path.join(a.dir, "interference"), cycles=a.interference_cycles)
        with open(a.out, "w") as f:
            json.dump(dict(res, loadavg=os.getloadavg(), torch=torch.__version__, argv=sys.argv[1:]), f, indent=1)
        return
    load_before = os.getloadavg()
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    init_pg(device)
    shutil.rmtree(a.dir, ignore_errors=True)
    app, nbytes = build_state(a.params, device, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype])
    work = Work(device, a.step_ms or (100 if device == "cuda" else 300))
    for _ in range(2):
        work.run()
    base = statistics.median(work.run() for _ in range(8))
    makers = {"feixing": lambda d: Feixing(d, app),
              "feixing_1thread": lambda d: Feixing(d, app, parallel_hash=False),
              "feixing_2threads": lambda d: Feixing(d, app, parallel_hash=True),
              "feixing_no_write_behind": lambda d: Feixing(d, app, write_behind_mb=0),
              "feixing_no_snapshot": lambda d: Feixing(d, app, device_snapshot="off"),
              "feixing_skip": lambda d: Feixing(d, app, when_busy="skip"),
              "feixing_budget": lambda d: Feixing(d, app, when_busy="skip", max_overhead=0.05),
              "dcp_async": lambda d: Dcp(d, app, True),
              "dcp_async_process": lambda d: Dcp(d, app, True, process=True),
              "dcp_sync": lambda d: Dcp(d, app, False)}
    results, table = [], []
    for m in a.methods.split(",") if a.saves > 0 else []:
        folder = os.path.join(a.dir, m)
        try:
            r = run_method(makers[m](folder), app, work, a.saves, a.interval, base, a.warmup)
        except Exception as e:  # noqa: BLE001 - a baseline that fails here is reported, not fatal
            results.append({"method": m, "error": f"{type(e).__name__}: {e}"})
            print(f"{m}: failed: {e}", file=sys.stderr)
            continue
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        results.append(r)
        table.append(summarize(r, nbytes, base, a.interval))
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in table[-1].items()},
              flush=True)
    every = []
    if a.every_step_saves:  # a small state saved after every step: overhead and memory over time
        small, small_bytes = build_state(a.every_step_params, device)
        for m in a.methods.split(","):
            if m == "dcp_sync":
                continue
            folder = os.path.join(a.dir, "every-" + m)
            r = run_method(makers[m](folder), small, work, a.every_step_saves, 1, base,
                           warmup=max(a.warmup, 10))  # its steps without saves: the baseline
            shutil.rmtree(folder, ignore_errors=True)
            row = summarize(r, small_bytes, base, 1)
            row["rss_max_gb"] = max(r["rss_gb"])
            row["rss_at_10_gb"] = r["rss_gb"][min(9, len(r["rss_gb"]) - 1)]
            every.append(row)
    every_ab = []
    if a.every_step_ab:
        small, _ = build_state(a.every_step_params, device)
        for m in a.methods.split(","):
            if m != "dcp_sync":
                every_ab.append(every_step_ab(makers[m](os.path.join(a.dir, "ab-" + m)), small, work,
                                              a.every_step_ab, a.every_step_block))
                shutil.rmtree(os.path.join(a.dir, "ab-" + m), ignore_errors=True)
    cols = ["method", "base_step_s", "blocked_first_s", "blocked_median_s", "blocked_pct_of_step",
            "lost_pct_of_interval", "lost_pct_of_overlapped", "worst_step_slowdown_pct", "worst_step_vs_idle_pct",
            "persist_s", "persist_gbps",
            "rss_first_gb", "rss_last_gb", "kernel_cpu_pct", "loop_overhead_pct"]
    print(f"device {device}, state {nbytes / 1e9:.2f} GB ({a.params / 1e6:.0f}M {a.dtype} params + AdamW), "
          f"step {base * 1000:.0f} ms, save every {a.interval} steps, {a.saves} saves")
    print(" | ".join(cols))
    for row in table:
        print(" | ".join(row["method"] if c == "method" else f"{row[c]:.3f}" for c in cols))
    if every:
        print(f"\nsaving after every step, {a.every_step_saves} saves of "
              f"{a.every_step_params / 1e6:.0f}M params + AdamW:")
        cols2 = cols + ["persist_gbps_first", "persist_gbps_last", "rss_at_10_gb", "rss_max_gb"]
        print(" | ".join(cols2))
        for row in every:
            print(" | ".join(row["method"] if c == "method" else f"{row[c]:.3f}" for c in cols2))
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    out = {"device": device, "torch": torch.__version__, "state_gb": nbytes / 1e9,
           "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
           "autogroup_nice": a.autogroup_nice,
           "params": a.params, "dtype": a.dtype, "step_s": base, "interval": a.interval, "saves": a.saves,
           "summary": table, "raw": results, "every_step": every, "every_step_ab": every_ab,
           "argv": sys.argv[1:]}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
