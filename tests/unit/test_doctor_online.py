"""Online detection through a real TCPStore queue: windows assembled per step, judged on rank 0."""

import time

import numpy as np
import torch.distributed as dist

from feixing.diagnose.detect import ONLINE_ROWS
from feixing.diagnose.online import OnlineGather, decode, encode
from feixing.diagnose.telemetry import ONLINE_SIGNALS
from tests._dist import free_port


def _window(step, rank, compute):
    vals = {"step": 0.1, "data": 0.01, "compute": compute, "gc": 0.0, "comm": 0.01, "checkpoint": 0.0}
    return encode(step, rank, [vals[n] for n in ONLINE_SIGNALS])


def test_rank0_judges_complete_windows_from_the_store_queue(tmp_path):
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True, wait_for_workers=False)
    g = OnlineGather(str(tmp_path), 0, 4, store=store)
    try:
        assert g._thread is not None and g._thread.name == "feixing-doctor"
        for step in (50, 100, 150):
            for rank in (1, 2, 3):  # rank 3 computes 50% longer from the window ending at step 100
                store.queue_push(g.key, _window(step, rank, 0.06 if rank == 3 and step >= 100 else 0.04))
        store.queue_push(g.key, _window(200, 1, 0.04))  # a window only one rank has reached so far
        for step in (50, 100, 150):
            g.push(step, [0.1, 0.01, 0.04, 0.0, 0.01, 0.0])  # rank 0's own, which also wakes the thread
        deadline = time.time() + 10
        while not g.messages and time.time() < deadline:
            time.sleep(0.05)
        assert [s for s, _ in g.messages] == [150]  # flagged in two consecutive windows (100, 150)
        assert g.messages[0][1].startswith("rank 3 is a straggler in compute: 50% slower")
        assert list(g._pending) == [200]  # incomplete: kept until every rank reported it
    finally:
        g.close()
    assert g._thread is None and store.queue_len(g.key) == 0


def test_per_step_rows_give_the_offline_straggler_one_window_later(tmp_path):
    """With per-step rows, rank 0 runs the offline straggler rule on the latest steps: rank 3,
    25% slower in compute from step 60, is named in the window ending at step 100 with its onset,
    though only one window (51-100) shows it."""
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True, wait_for_workers=False)
    g = OnlineGather(str(tmp_path), 0, 4, store=store)
    rng = np.random.default_rng(0)
    try:
        for end in (50, 100):
            for rank in range(4):
                rows = []
                for s in range(end - 49, end + 1):
                    compute = 0.04 * rng.lognormal(0, 0.02) + (0.01 if rank == 3 and s >= 60 else 0.0)
                    rows.append((s, 0.05 + compute, 0.01, compute, 0.0, 0.0))  # detect.ONLINE_ROWS
                vec = [float(np.median([r[i] for r in rows])) for i in (1, 2, 3)] + [0.0, 0.0, 0.0]
                line = encode(end, rank, vec, rows, compute_cpu=True)
                if rank == 0:
                    assert decode(line)[4].shape == (50, len(ONLINE_ROWS))
                    g.push(end, vec, rows, compute_cpu=True)
                else:
                    store.queue_push(g.key, line)
        deadline = time.time() + 10
        while not g.messages and time.time() < deadline:
            time.sleep(0.05)
        assert len(g.messages) == 1 and g.messages[0][0] == 100, g.messages
        msg = g.messages[0][1]
        assert msg.startswith("rank 3 is a straggler in compute: 25% slower than its peers since step 60 "), msg
    finally:
        g.close()
