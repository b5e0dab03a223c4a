"""One short GPU session, within a time budget: what the CPU machines cannot check or time.

Sections, in order of priority; each runs only if its estimated time still fits the budget, and
gpu_check.json is rewritten after each one (a session cut short keeps what it measured):

1. `ceilings`: the card as found: bf16 matmul TFLOP/s, device-to-device copy and pinned
   host<->device copy GB/s (the ceilings the numbers below are read against).
2. `tests`: `pytest tests/gpu` (CUDA attention backend against the reference; CUDA staging, the
   device snapshot, exact save/resume on the GPU).
3. `attention`: fwd+bwd time of feixing's `cuda` backend against torch SDPA (the baseline),
   Llama-3-8B heads, causal and with packed documents; and an experiment for a faster backend,
   aten's varlen flash kernel (its parity against the reference, and its time).
4. `train_telemetry`: `feixing train` on configs/gpu_1b.toml (Llama-3.2-1B shape, bf16) with
   telemetry on and off in alternate steps (benchmarks/trainer_tele_ab.py): single-GPU
   throughput and MFU, and telemetry's cost in the real trainer on a GPU.
5. `checkpoint`: 12 GB of state (1B fp32 parameters + AdamW) on the GPU, ~100 ms steps:
   feixing with the device snapshot, without it, and DCP async_save (benchmarks/checkpoint.py).
6. `train_checkpoint`: the 1B trainer itself saving its ~15 GB of state every 40 steps, with
   and without the device snapshot: the loop time of the steps right after each save.
7. `resume`: the 1B trainer's first 10 steps after a resume against steady state
   (benchmarks/resume_rampup.py).
8. `train_compile`: the 1B trainer with torch.compile (not run yet: the first session's lease
   ended before it).

Run on a CUDA machine from the repository root:

    python benchmarks/gpu_check.py [--out DIR] [--budget-s 450] [--only a,b]

The estimates (from one H200) add up to ~14 minutes: two calls of a 10-minute limit, e.g.
`--budget-s 420 --only ceilings,tests,attention,train_telemetry,checkpoint` and
`--budget-s 420 --only train_checkpoint,resume,train_compile`.

Prints each section's table and writes gpu_check.json (plus the sections' own JSON) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
TRAIN_CONFIG, TRAIN_NPROC = "configs/gpu_1b.toml", 1  # the trainer sections' model and processes
SAVE_STEPS, SAVE_EVERY = 120, 40  # train_checkpoint: the trainer's steps and checkpoint interval
CKPT_METHODS = "feixing,feixing_no_snapshot,dcp_async"  # --checkpoint-methods
SNAPSHOTS = "auto,off"  # --train-snapshots: train_checkpoint's checkpoint.device_snapshot values
ENV = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}", PYTHONUNBUFFERED="1")


def _time_cuda(fn, warmup: int = 3, iters: int = 10) -> float:
    """Seconds per call: CUDA events around `iters` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def _sh(cmd: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    """Run a command from the repository root; its output goes to `log` and its tail is printed."""
    print("running:", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log.write_text(out)
        raise RuntimeError(f"timed out after {timeout:.0f} s: {out[-1500:]}") from None
    log.write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    print(proc.stdout[-2500:], flush=True)
    if proc.returncode:
        print(proc.stderr[-2500:], flush=True)
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-1500:]}")
    return proc


def ceilings(out: Path, left: float) -> dict:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm = _time_cuda(lambda: a @ b)
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    d2d = _time_cuda(lambda: y.copy_(x))
    h = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    d2h = _time_cuda(lambda: h.copy_(x, non_blocking=True), 1, 3)
    h2d = _time_cuda(lambda: y.copy_(h, non_blocking=True), 1, 3)
    nb = x.numel() * x.element_size()
    r = {"bf16_matmul_tflops": 2 * n**3 / mm / 1e12, "d2d_copy_gbs_read_plus_write": 2 * nb / d2d / 1e9,
         "d2h_pinned_gbs": nb / d2h / 1e9, "h2d_pinned_gbs": nb / h2d / 1e9}
    print("ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()), flush=True)
    return r


def tests(out: Path, left: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=left)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    print(proc.stdout[-3000:], flush=True)
    return {"returncode": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:]}


def _attention_row(S: int, B: int = 1, H: int = 32, Hkv: int = 8, D: int = 128) -> dict:
    """fwd+bwd of feixing's cuda backend vs torch SDPA at one length, Llama-3-8B heads."""
    import torch.nn.functional as F

    from feixing.ops.attention import attention as attn

    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    docs = (torch.arange(S, device="cuda") * 4 // S).expand(B, S).contiguous()  # 4 packed documents

    def ours(doc=None):
        attn(q, k, v, causal=True, document_ids=doc, backend="cuda").backward(dout)

    def sdpa():
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        o.transpose(1, 2).backward(dout)

    t = {"feixing_causal_s": _time_cuda(ours), "sdpa_causal_s": _time_cuda(sdpa)}
    if S <= 8192:  # the documents path builds a dense (S, S) bias
        t["feixing_documents_s"] = _time_cuda(lambda: ours(docs))
    flops = 4 * B * H * D * S * S / 2 * 3.5  # causal: fwd 2 matmuls + bwd 5, half the pairs
    return {"seq_len": S, **t, "ratio_vs_sdpa": t["feixing_causal_s"] / t["sdpa_causal_s"],
            "feixing_causal_tflops": flops / t["feixing_causal_s"] / 1e12,
            "sdpa_causal_tflops": flops / t["sdpa_causal_s"] / 1e12}


def _flash_varlen(q, k, v, dout, cu: torch.Tensor, max_len: int):
    """Experiment, not a feixing backend yet: aten's flash kernel in its varlen form, which takes
    packed documents as cumulative lengths (no dense mask), handles GQA natively and returns the
    lse ring attention needs. q (T, H, D), k/v (T, Hkv, D); returns out, lse, dq, dk, dv."""
    scale = q.shape[-1] ** -0.5
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, True, rng, unused, scale=scale)
    return out, lse, dq, dk, dv


def _flash_probe(S: int, B: int = 1, H: int = 32, Hkv: int = 8, D: int = 128, docs: int = 4) -> dict:
    """Parity of the varlen flash experiment against the reference at 512 tokens (bf16 inputs, the
    reference in fp32 on the same values), then its fwd+bwd time at S, causal and with documents."""
    from feixing.ops import reference

    def bounds(n_docs, s):
        return torch.tensor([s * i // n_docs for i in range(n_docs + 1)], device="cuda", dtype=torch.int32)

    r = {}
    s = 512
    q, k, v, do = (torch.randn(s, h, D, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv, H))
    cu = bounds(docs, s)
    out, lse, dq, dk, dv = _flash_varlen(q, k, v, do, cu, s // docs)
    doc = (torch.arange(s, device="cuda") * docs // s)[None]
    qf, kf, vf = (t.float()[None].requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention(qf, kf, vf, q_doc=doc, k_doc=doc)
    ref.backward(do.float()[None])
    err = lambda a, b: float((a.float() - b.detach()).norm() / b.detach().norm())
    r["parity_rel_err"] = {"out": err(out, ref[0]), "dq": err(dq, qf.grad[0]), "dk": err(dk, kf.grad[0]),
                           "dv": err(dv, vf.grad[0])}
    r["lse_shape"] = list(lse.shape)
    if lse.numel() == H * s:  # (H, T): compare with the reference's (1, H, T)
        r["parity_rel_err"]["lse"] = err(lse.reshape(H, s), ref_lse[0])
    q, k, v, do = (torch.randn(B * S, h, D, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv, H))
    one, many = bounds(B, B * S), bounds(B * docs, B * S)
    r["flash_varlen_causal_s"] = _time_cuda(lambda: _flash_varlen(q, k, v, do, one, S))
    r["flash_varlen_documents_s"] = _time_cuda(lambda: _flash_varlen(q, k, v, do, many, S // docs))
    return r


def attention(out: Path, left: float) -> dict:
    rows = []
    for S in (2048, 8192, 32768):
        row = _attention_row(S)
        rows.append(row)
        print(f"attention S={S:>6}: feixing {row['feixing_causal_s'] * 1e3:8.2f} ms ({row['feixing_causal_tflops']:5.0f} "
              f"TFLOP/s)  sdpa {row['sdpa_causal_s'] * 1e3:8.2f} ms ({row['sdpa_causal_tflops']:5.0f})  ratio "
              f"{row['ratio_vs_sdpa']:.2f}  documents {1e3 * row.get('feixing_documents_s', float('nan')):.2f} ms",
              flush=True)
        try:  # an experiment for the next backend: its failure must not cost the section
            row["flash_varlen"] = f = _flash_probe(S)
            print(f"  flash varlen (experiment): causal {1e3 * f['flash_varlen_causal_s']:.2f} ms, documents "
                  f"{1e3 * f['flash_varlen_documents_s']:.2f} ms; parity {f['parity_rel_err']}", flush=True)
        except Exception as e:  # noqa: BLE001
            row["flash_varlen"] = {"error": f"{type(e).__name__}: {str(e)[-500:]}"}
            print(f"  flash varlen (experiment) failed: {row['flash_varlen']['error']}", flush=True)
    return {"rows": rows}


def _prepare_data() -> str:
    path = ROOT / "data" / "gpu_demo"
    if not (path / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "feixing", "prepare", "--demo", "--quiet", "--out", str(path),
                        "--max-bytes", "8000000"], cwd=ROOT, env=ENV, check=True)
    return str(path)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steady(recs: list[dict], after: int = 20) -> dict:
    """Mean throughput and MFU of the steps after `after`; the run's peak memory."""
    steady = [x for x in recs if x["step"] > after]
    return {"tokens_per_s": sum(x["tokens_per_s"] for x in steady) / len(steady),
            "mfu_mean": sum(x["mfu"] for x in steady) / len(steady), "memory_gb": max(x["memory_gb"] for x in recs)}


def train_telemetry(out: Path, left: float) -> dict:
    """160 steps of the 1B trainer, telemetry on/off/off/on per step: throughput, MFU, and cost."""
    _prepare_data()
    path = out / "trainer_tele_ab_gpu.json"
    _sh([sys.executable, "benchmarks/trainer_tele_ab.py", "--config", TRAIN_CONFIG, "--nproc", str(TRAIN_NPROC),
         "--steps", "160", "--warmup", "20", "--no-keep-awake", "--set", "metrics.log_interval=1",
         "--out", str(path)], left, out / "train_telemetry.log")
    res = json.loads(path.read_text())
    run = res["runs"][0]
    run_dir = Path(run["walls"][: -len(".walls.json")])
    recs = _metrics(run_dir)
    tokens = recs[-1]["tokens_per_s"] * recs[-1]["step_time_s"]  # per step, all ranks
    steady = _steady(recs)
    r = {"step_off_ms": run["step_off_ms"], "tokens_per_s_off": tokens / run["step_off_ms"] * 1e3,
         "mfu_mean": steady["mfu_mean"], "memory_gb": steady["memory_gb"],
         "loss_first_last": [recs[0]["loss"], recs[-1]["loss"]], "telemetry_frac": run["frac"],
         "telemetry_ci95_frac": run["ci95_frac"], "cpu_frac": run["cpu"][0]["diff_us"] / 1e3 / run["step_off_ms"],
         "background_cpu_per_step_us": run["cpu"][0]["background_cpu_per_step_us"]}
    tele = run_dir / "telemetry"
    if tele.is_dir():  # device-time records: the CUDA-event path of telemetry ran
        lines = [x for p in tele.glob("*.jsonl") for x in p.read_text().splitlines()]
        r["device_records"] = sum(json.loads(x).get("type") == "device" for x in lines)
    print(f"train {TRAIN_CONFIG}: {r['tokens_per_s_off']:,.0f} tok/s, MFU {100 * r['mfu_mean']:.1f}%, mem {r['memory_gb']:.1f} GB; "
          f"telemetry on - off {r['telemetry_frac']:+.3%} ({r['telemetry_ci95_frac'][0]:+.3%} .. "
          f"{r['telemetry_ci95_frac'][1]:+.3%})", flush=True)
    return r


def checkpoint(out: Path, left: float) -> dict:
    path = out / "checkpoint_gpu.json"
    _sh([sys.executable, "benchmarks/checkpoint.py", "--params", "1e9", "--saves", "3", "--interval", "120",
         "--warmup", "80", "--step-ms", "100", "--methods", CKPT_METHODS,
         "--out", str(path)], left, out / "checkpoint.log")
    return {"summary": json.loads(path.read_text())["summary"]}


def _save_steps(run_dir: Path, every: int) -> dict:
    """Per-step loop time from metrics.jsonl's wall-clock stamps (they include the time
    `maybe_save` blocks, which `step_time_s` leaves out); steps 1-3 after each save against the
    median of the steps no save touches."""
    recs = _metrics(run_dir)
    dt = {b["step"]: b["time"] - a["time"] for a, b in zip(recs, recs[1:])}
    saves = [s for s in dt if s % every == 0]
    near = {s + i for s in saves for i in range(1, 4)}
    base = sorted(v for s, v in dt.items() if s > 10 and s not in near)
    base = base[len(base) // 2]
    after = {s: [dt[s + i] / base - 1 for i in (1, 2, 3) if s + i in dt] for s in saves}
    return {"base_step_s": base, "after_save_slowdown": after,
            "worst_after_save": max((max(v) for v in after.values() if v), default=None)}


def train_checkpoint(out: Path, left: float) -> dict:
    """The 1B trainer saving its ~15 GB of state every SAVE_EVERY steps, with and without the device snapshot."""
    _prepare_data()
    res, t_end = {}, time.time() + left
    for snap in SNAPSHOTS.split(","):
        run_dir = Path("/tmp", f"gpu_ckpt_{snap}")
        shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends across runs
        left = t_end - time.time()
        if left < 60:
            res[snap] = {"skipped": f"{left:.0f} s left"}
            continue
        proc = _sh([sys.executable, "-m", "feixing", "train", "--config", TRAIN_CONFIG, "--nproc", str(TRAIN_NPROC),
             "--set", f"run.dir={run_dir}", "--set", f"train.steps={SAVE_STEPS}", "--set", f"checkpoint.interval={SAVE_EVERY}",
             "--set", f"checkpoint.device_snapshot={snap}", "--set", "checkpoint.keep=1",
             "--set", "metrics.log_interval=1"],
            left, out / f"train_checkpoint_{snap}.log")
        r = res[snap] = _save_steps(run_dir, SAVE_EVERY)
        # the commit log lines: what each save cost the loop, part by part (Manager.loop_cost)
        r["loop_cost"] = re.findall(r"checkpoint step \d+ committed: .*?; (the loop waited .*)\)",
                                    proc.stdout + proc.stderr)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 15 GB each: the disk has 64 GB
        print(f"trainer, device snapshot {snap}: step {r['base_step_s'] * 1e3:.0f} ms; steps 1-3 after each save "
              + "; ".join(f"{s}: " + " ".join(f"{x:+.1%}" for x in v) for s, v in r["after_save_slowdown"].items()),
              flush=True)
    return res


def resume(out: Path, left: float) -> dict:
    data = _prepare_data()
    path = out / "resume_rampup_gpu.json"
    _sh([sys.executable, "benchmarks/resume_rampup.py", "--config", TRAIN_CONFIG, "--nproc", str(TRAIN_NPROC),
         "--data", data, "--warmup-pass", "on", "--resumed-interval", "0", "--out", str(path)],
        left, out / "resume.log")
    return {"summary": json.loads(path.read_text())["summary"]}


def train_compile(out: Path, left: float) -> dict:
    """The 1B trainer with torch.compile (each block compiled): steady throughput and compile time."""
    _prepare_data()
    run_dir = Path("/tmp", "gpu_compile")
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    _sh([sys.executable, "-m", "feixing", "train", "--config", TRAIN_CONFIG, "--nproc", str(TRAIN_NPROC),
         "--set", f"run.dir={run_dir}", "--set", "train.steps=60", "--set", "parallel.compile=true",
         "--set", "metrics.log_interval=1"], left, out / "train_compile.log")
    r = {"wall_s": time.time() - t0, **_steady(_metrics(run_dir))}
    print(f"train {TRAIN_CONFIG}, compiled: {r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu_mean']:.1f}%, "
          f"{r['wall_s']:.0f} s in all", flush=True)
    return r


# name -> (function, estimated seconds)
SECTIONS = {"ceilings": (ceilings, 15), "tests": (tests, 30), "attention": (attention, 40),
            "train_telemetry": (train_telemetry, 100), "checkpoint": (checkpoint, 230),
            "train_checkpoint": (train_checkpoint, 150), "resume": (resume, 115), "train_compile": (train_compile, 150)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--budget-s", type=float, default=450, help="skip sections whose estimate no longer fits")
    ap.add_argument("--only", default="", help="comma-separated section names (default: all)")
    ap.add_argument("--checkpoint-methods", default=CKPT_METHODS, help="the checkpoint section's methods")
    ap.add_argument("--train-snapshots", default=SNAPSHOTS, help="train_checkpoint's device_snapshot values")
    a = ap.parse_args()
    globals().update(CKPT_METHODS=a.checkpoint_methods, SNAPSHOTS=a.train_snapshots)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_end = time.time() + a.budget_s
    names = a.only.split(",") if a.only else list(SECTIONS)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cpus": os.cpu_count(),
              "argv": sys.argv[1:], "sections": {}}
    print({k: v for k, v in result.items() if k != "sections"}, flush=True)
    for name in names:
        fn, estimate = SECTIONS[name]
        left = t_end - time.time()
        if left < estimate:
            result["sections"][name] = {"skipped": f"{left:.0f} s left, estimate {estimate} s"}
            print(f"== {name}: skipped ({left:.0f} s left)", flush=True)
            continue
        print(f"== {name} ({left:.0f} s left)", flush=True)
        t0 = time.time()
        try:
            r = fn(out, left)
        except Exception as e:  # noqa: BLE001 - report it and go on to the next section
            r = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
            print(f"== {name} failed: {r['error']}", flush=True)
        r["section_s"] = time.time() - t0
        result["sections"][name] = r
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
