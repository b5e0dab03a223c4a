"""Progress line, metrics.jsonl and TensorBoard; tokens/s, MFU (stated convention), memory, ETA."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("feixing")

# Dense bf16 peak (TFLOPS) by device-name fragment; fp32 runs use the TF32 peak (half of bf16).
_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                  "L40S": 362e12, "L20": 119.5e12, "4090": 165e12, "910B": 313e12}


def measured_cpu_peak_flops(n: int = 512, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of this process (its threads) on CPU, used as the MFU peak.

    There is no vendor peak for a shared CPU; the achievable GEMM rate is the honest ceiling.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAK_BF16.items():
            if key in name:
                return (peak if dtype == "bf16" else peak / 2), f"{name} datasheet"
    if device.type == "npu":
        return (_GPU_PEAK_BF16["910B"] if dtype == "bf16" else _GPU_PEAK_BF16["910B"] / 2), "910B"
    return measured_cpu_peak_flops(), "measured fp32 GEMM peak of this process"


def memory_gb(device: torch.device) -> float:
    """Peak device memory (accelerators) or peak resident set size (CPU), in GB."""
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Metrics:
    """Rank 0 writes metrics.jsonl (appended across resumes) and prints the progress line."""

    def __init__(self, run_dir: str, total_steps: int, log_interval: int, is_main: bool,
                 flops_per_token: float, peak: float, n_devices: int, tensorboard: bool = False):
        self.total_steps, self.log_interval, self.is_main = total_steps, log_interval, is_main
        self.flops_per_token, self.peak, self.n_devices = flops_per_token, peak, n_devices
        self._times: list[float] = []
        self._file = None
        self._tb = None
        if is_main:
            path = Path(run_dir) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # line-buffered: a crash loses no line
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise RuntimeError("metrics.tensorboard = true needs the tensorboard package: "
                                       "pip install 'feixing[tensorboard]'") from e
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def record(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int,
               step_time_s: float, skipped: bool, memory: float) -> dict | None:
        """Log one optimizer step; returns the record when it was written."""
        self._times.append(step_time_s)
        if step % self.log_interval and step != self.total_steps:
            return None
        recent = self._times[-self.log_interval:]
        mean_time = sum(recent) / len(recent)
        tokens_per_s = tokens / mean_time
        mfu = tokens_per_s * self.flops_per_token / (self.peak * self.n_devices)
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": tokens_per_s, "step_time_s": mean_time, "mfu": mfu,
               "memory_gb": memory, "skipped": skipped, "time": time.time()}
        if self.is_main:
            self._file.write(json.dumps(rec) + "\n")
            if self._tb is not None:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                    self._tb.add_scalar(f"train/{key}", rec[key], step)
            eta = format_eta(mean_time * (self.total_steps - step))
            line = (f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} | loss "
                    f"{loss:7.4f} | lr {lr:.2e} | grad {grad_norm:6.3f} | {tokens_per_s:,.0f} tok/s "
                    f"| MFU {100 * mfu:5.2f}% | mem {memory:.2f} GB | {mean_time:.3f} s/step "
                    f"| ETA {eta}{' | SKIPPED' if skipped else ''}")
            print(line, file=sys.stdout, flush=True)
        return rec

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        if self._tb is not None:
            self._tb.close()
