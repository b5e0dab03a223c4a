"""One short GPU session: CUDA parity tests, the checkpoint device snapshot at 12 GB, attention
fwd+bwd timing, single-GPU training throughput.

Run on a CUDA machine from the repository root:  python benchmarks/gpu_check.py [--out DIR]
Prints tables and writes gpu_check.json (to --out, default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _time_cuda(fn, warmup: int = 3, iters: int = 10) -> float:
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


def attention_timing(seq_lens: list[int]) -> list[dict]:
    """fwd+bwd seconds of feixing's cuda backend vs torch SDPA (the baseline), Llama-3-8B heads."""
    import torch.nn.functional as F

    from feixing.ops.attention import attention

    rows = []
    B, H, Hkv, D = 1, 32, 8, 128
    for S in seq_lens:
        q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)

        def ours(q=q, k=k, v=v, dout=dout):
            attention(q, k, v, causal=True, backend="cuda").backward(dout)

        def sdpa(q=q, k=k, v=v, dout=dout):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=True, enable_gqa=True)
            out.transpose(1, 2).backward(dout)

        t_ours, t_sdpa = _time_cuda(ours), _time_cuda(sdpa)
        flops = 4 * B * H * D * S * S / 2 * 3.5  # causal fwd (2 matmuls) + bwd (5 matmuls)
        rows.append({"seq_len": S, "feixing_s": t_ours, "sdpa_s": t_sdpa,
                     "ratio_vs_sdpa": t_ours / t_sdpa, "feixing_tflops": flops / t_ours / 1e12})
        print(f"attention S={S:>6}: feixing {t_ours * 1e3:8.2f} ms  sdpa {t_sdpa * 1e3:8.2f} ms  "
              f"ratio {t_ours / t_sdpa:5.2f}  {flops / t_ours / 1e12:6.1f} TFLOP/s", flush=True)
    return rows


def train_throughput(extra: list[str], name: str) -> dict:
    """Run `feixing train` on configs/gpu_1b.toml; steady-state = records after step 10."""
    run_dir = ROOT / "runs" / f"gpu_{name}"
    cmd = [sys.executable, "-m", "feixing", "train", "--config", "configs/gpu_1b.toml",
           "--set", f"run.dir={run_dir}", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
    if proc.returncode:
        return {"name": name, "error": proc.stderr[-2000:]}
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["step"] > 10]
    return {"name": name, "extra": extra, "wall_s": time.time() - t0,
            "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "mfu": sum(r["mfu"] for r in steady) / len(steady),
            "memory_gb": max(r["memory_gb"] for r in recs), "first_loss": recs[0]["loss"],
            "last_loss": recs[-1]["loss"]}


def checkpoint_snapshot(out: Path) -> dict:
    """12 GB of state (1B fp32 parameters + AdamW) on the GPU, ~100 ms steps: the loop with the
    device snapshot against the direct device-to-host copy, in one run (benchmarks/checkpoint.py)."""
    path = out / "checkpoint_gpu_snapshot.json"
    cmd = [sys.executable, "benchmarks/checkpoint.py", "--params", "1e9", "--saves", "3", "--interval", "150",
           "--warmup", "50", "--step-ms", "100", "--methods", "feixing,feixing_no_snapshot,feixing",
           "--out", str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                          capture_output=True, text=True, timeout=420)
    print(proc.stdout[-4000:], proc.stderr[-2000:] if proc.returncode else "", flush=True)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    return {"summary": json.loads(path.read_text())["summary"], "command": " ".join(cmd[1:])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-checkpoint", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(result, flush=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/gpu", "-x"], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                           capture_output=True, text=True)
    result["gpu_tests"] = tests.stdout.strip().splitlines()[-1:]
    print(tests.stdout[-3000:], flush=True)
    if not a.skip_checkpoint:
        result["checkpoint"] = checkpoint_snapshot(out)
    result["attention"] = attention_timing([2048, 8192, 32768])
    subprocess.run([sys.executable, "-m", "feixing", "prepare", "--demo", "--quiet", "--out",
                    "data/gpu_demo", "--max-bytes", "20000000"], cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), check=True)
    runs = [train_throughput([], "eager")]
    if "error" in runs[0]:  # keep the session's one GPU run useful: retry without telemetry
        runs.append(train_throughput(["--set", "telemetry.enabled=false"], "eager_no_telemetry"))
    if not a.skip_compile:
        runs.append(train_throughput(["--set", "parallel.compile=true"], "compile"))
    result["training"] = runs
    for r in runs:
        if "error" not in r:
            print(f"train {r['name']:>8}: {r['tokens_per_s']:,.0f} tok/s  MFU {100 * r['mfu']:.1f}%  "
                  f"mem {r['memory_gb']:.1f} GB  loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
