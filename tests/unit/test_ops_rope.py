"""RoPE: each scaling variant equals transformers' rope init functions; apply equals HF's."""

from __future__ import annotations

import pytest
import torch

from feixing.ops import reference
from feixing.ops.rope import RopeScaling, apply_rope, cos_sin, inv_freq

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

HEAD_DIM, MAX_POS = 64, 4096

# (HF rope dict, feixing RopeScaling, seq_len HF evaluates at)
VARIANTS = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, RopeScaling("linear", 4.0), None),
    "dynamic-short": (
        {"rope_type": "dynamic", "factor": 2.0},
        RopeScaling("dynamic", 2.0, original_max_seq_len=MAX_POS),
        MAX_POS,
    ),
    "dynamic-long": (
        {"rope_type": "dynamic", "factor": 2.0},
        RopeScaling("dynamic", 2.0, original_max_seq_len=MAX_POS),
        3 * MAX_POS,
    ),
    "yarn": (
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512},
        RopeScaling("yarn", 8.0, original_max_seq_len=512),
        None,
    ),
    "yarn-mscale": (
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 1024,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "beta_fast": 24,
            "beta_slow": 2,
            "truncate": False,
        },
        RopeScaling(
            "yarn",
            16.0,
            original_max_seq_len=1024,
            mscale=0.707,
            mscale_all_dim=0.707,
            beta_fast=24,
            beta_slow=2,
            truncate=False,
        ),
        None,
    ),
    "yarn-attention-factor": (
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "attention_factor": 1.3,
        },
        RopeScaling("yarn", 4.0, original_max_seq_len=1024, attention_factor=1.3),
        None,
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
        RopeScaling("llama3", 8.0, original_max_seq_len=1024),
        None,
    ),
    "llama3-2": (
        {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 2048,
        },
        RopeScaling(
            "llama3", 32.0, original_max_seq_len=2048, low_freq_factor=2.0, high_freq_factor=8.0
        ),
        None,
    ),
}


def _hf_config(rope: dict | None, theta: float = 500000.0) -> LlamaConfig:
    params = {"rope_theta": theta, **(rope or {"rope_type": "default"})}
    return LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        rope_parameters=params,
    )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_inv_freq_matches_transformers(name):
    rope, ours, seq_len = VARIANTS[name]
    want, want_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](
        _hf_config(dict(rope)), "cpu", seq_len=seq_len
    )
    got, scale = inv_freq(HEAD_DIM, 500000.0, ours, max_seq_len=seq_len or MAX_POS)
    # Same fp32 formulas in the same order: equal up to pow/log rounding (1 ulp).
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)


def test_scaling_changes_frequencies():
    plain, _ = inv_freq(HEAD_DIM, 500000.0)
    for name, (_, ours, seq_len) in VARIANTS.items():
        got, _ = inv_freq(HEAD_DIM, 500000.0, ours, max_seq_len=seq_len or MAX_POS)
        if name != "dynamic-short":  # within the original context dynamic NTK is plain RoPE
            assert not torch.allclose(got, plain), name


@pytest.mark.parametrize("name", ["default", "llama3", "yarn-mscale"])
def test_cos_sin_and_rotation_match_hf(name):
    rope, ours = (None, None) if name == "default" else VARIANTS[name][:2]
    cfg = _hf_config(dict(rope) if rope else None)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 5000, 9000]])  # packed restart and long positions
    x = torch.randn(1, 8, 4, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(x, pos)  # (B, S, D), halves duplicated
    freqs, scale = inv_freq(HEAD_DIM, 500000.0, ours, MAX_POS)
    cos, sin = cos_sin(pos, freqs, scale)
    torch.testing.assert_close(torch.cat([cos, cos], -1), hf_cos, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([sin, sin], -1), hf_sin, rtol=0, atol=0)
    want, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), hf_cos, hf_sin)
    # fp32 rotate: same two products and one add per element as HF -> exact or 1 ulp.
    torch.testing.assert_close(apply_rope(x, cos, sin), want.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_apply_rope_dispatch_is_the_reference_and_checks_backend():
    x = torch.randn(2, 5, 3, 8)
    cos, sin = cos_sin(torch.arange(5), inv_freq(8, 10000.0)[0])
    assert torch.equal(apply_rope(x, cos, sin), reference.apply_rope(x, cos, sin))
    with pytest.raises(ValueError, match="backend"):
        apply_rope(x, cos, sin, backend="fused")


def test_bad_scaling_arguments_raise():
    with pytest.raises(ValueError, match="unknown"):
        RopeScaling("ntk-by-parts", 2.0)
    with pytest.raises(ValueError, match="factor"):
        RopeScaling("linear")
    with pytest.raises(ValueError, match="even"):
        inv_freq(7, 10000.0)


def test_inv_freq_works_under_meta_device():
    with torch.device("meta"):
        freqs, _ = inv_freq(16, 10000.0, RopeScaling("yarn", 4.0, original_max_seq_len=64))
    assert freqs.device.type == "cpu" and torch.isfinite(freqs).all()
