"""`export_hf`: a feixing checkpoint becomes a HF folder that transformers loads with equal logits."""

from __future__ import annotations

import pytest
import torch

from feixing.checkpoint import CheckpointError, Manager, export_hf
from feixing.config.load import to_toml
from feixing.config.schema import CheckpointConfig, Config, ModelConfig

transformers = pytest.importorskip("transformers")

# fp32 logits of a 2-layer model: same math in a different op order on both sides (see
# test_hf_parity.py), so a few ulps of |logit| ~ 1.
ATOL, RTOL = 1e-4, 1e-4


def test_export_checkpoint_to_hf_loads_in_transformers(tmp_path):
    from feixing import models

    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(flavor="tiny"))
    model = models.build(cfg.model)
    model.to_empty(device="cpu")
    model.init_weights(3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ck = Manager(CheckpointConfig(interval=1), str(tmp_path), 0, 1, resolved_config=to_toml(cfg))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    model(tokens).float().pow(2).mean().backward()
    ck.wait_staging()
    opt.step()
    ck.maybe_save(1, {"model": model, "optim": opt})
    ck.close()

    out = export_hf(str(tmp_path / "checkpoints"), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=RTOL)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        export_hf(str(tmp_path / "hf"), str(tmp_path / "x"))
