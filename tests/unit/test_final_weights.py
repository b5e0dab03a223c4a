"""The final-weights export at the end of `feixing train` when the disk refuses the write.

A real refusal from the kernel: the process's file-size limit (RLIMIT_FSIZE, with SIGXFSZ
ignored) makes writing the weights fail with EFBIG, as a full disk fails with ENOSPC. Runs in a
child process, so the limit never touches pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import resource, signal, sys
from pathlib import Path
import torch, torch.distributed as dist
from feixing import config, models
from feixing.distributed.env import Env
from feixing.distributed.launch import free_port
from feixing.train.trainer import _save_final_weights

run_dir, on_error = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
model = models.build(config.load("configs/demo.toml").model, vocab_size=256)
model.to_empty(device="cpu")
model.init_weights(0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    _save_final_weights(model, model.args, run_dir, Env(0, 1, 0, torch.device("cpu"), "gloo"), 7, on_error)
    print("RETURNED")
except OSError as e:
    print("RAISED", e)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("on_error", ["continue", "stop"])
def test_final_weights_write_refused_keeps_previous_final(tmp_path, on_error):
    final = tmp_path / "final"
    final.mkdir()
    (final / "step.txt").write_text("3")  # an earlier run's weights
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), on_error], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "RETURNED" if on_error == "continue" else "RAISED"
    assert proc.stdout.startswith(expected), proc.stdout + proc.stderr[-2000:]
    assert "final weights (step 7) not written" in proc.stderr and "File too large" in proc.stderr
    assert (final / "step.txt").read_text() == "3"  # the previous weights are intact
    assert not (tmp_path / "final.tmp").exists()  # nothing half-written is left
