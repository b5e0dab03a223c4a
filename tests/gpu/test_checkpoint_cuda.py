"""CUDA staging: pinned (registered) host buffer, side-stream copies, exact save/resume on the GPU."""

from __future__ import annotations

import pytest
import torch

from feixing.checkpoint import Manager
from feixing.config.schema import CheckpointConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _app(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 64)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {"model": model, "optim": opt, "loader": {"pos": 0}}


def _train(ck, app, first, last):
    for step in range(first, last + 1):
        app["model"](torch.randn(32, 64, device="cuda")).pow(2).mean().backward()
        ck.wait_staging()  # the side-stream copy of the last save must finish before the update
        app["optim"].step()
        app["optim"].zero_grad()
        app["loader"]["pos"] = step
        ck.maybe_save(step, app)


def test_cuda_save_resume_exact_with_pinned_staging(tmp_path):
    app = _app(0)
    ck = Manager(CheckpointConfig(interval=2), str(tmp_path), 0, 1)
    _train(ck, app, 1, 6)
    buf = ck.stager.buffer
    assert buf.pinned or buf.bounce is not None  # DMA-able staging, registered or bounced
    pinned = buf.pinned
    ck.close()
    assert ck.errors == []
    fresh = _app(1)
    ck2 = Manager(CheckpointConfig(interval=2), str(tmp_path), 0, 1)
    assert ck2.resume(fresh, "auto") == 6
    ck2.close()
    for p, q in zip(app["model"].parameters(), fresh["model"].parameters()):
        assert p.device.type == "cuda" and torch.equal(p, q)
    sa, sb = app["optim"].state_dict()["state"], fresh["optim"].state_dict()["state"]
    for k in sa:
        for n in sa[k]:
            assert torch.equal(sa[k][n].cpu(), sb[k][n].cpu()), (k, n)
    assert fresh["loader"] == {"pos": 6}
    print(f"cuda staging: registered={pinned}")


@pytest.mark.parametrize("snapshot", ["on", "off"])
def test_cuda_device_snapshot_saves_the_state_of_its_step(tmp_path, snapshot):
    """The optimizer runs right after wait_staging(); with a snapshot the copy to the host is still
    going on then, and the checkpoint must still hold the state of the step it was taken at."""
    app = _app(0)
    ck = Manager(CheckpointConfig(interval=3, device_snapshot=snapshot), str(tmp_path), 0, 1)
    _train(ck, app, 1, 6)  # saves at 3 and 6
    at6 = [p.detach().clone() for p in app["model"].parameters()]
    _train(ck, app, 7, 8)  # two more updates while the save of step 6 may still be copying
    ck.close()
    assert ck.errors == [] and all(r["snapshot"] == (snapshot == "on") for r in ck.stats)
    fresh = _app(1)
    ck2 = Manager(CheckpointConfig(interval=3), str(tmp_path), 0, 1)
    assert ck2.resume(fresh, "auto") == 6
    ck2.close()
    for p, q in zip(at6, fresh["model"].parameters()):
        assert torch.equal(p, q)
