"""HF parity: feixing's logits equal transformers' for tiny random Llama/Qwen2, both directions."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from feixing.models.llama.hf import args_from_hf_config, export_hf, load_hf, load_hf_state_dict

torch.set_num_threads(1)
# fp32 logits of a 2-layer model with O(1) weights: both sides run the same math in a different
# op order (fused matmuls, sdpa vs einsum softmax), so differences are a few ulps of |logit|~10.
ATOL, RTOL = 1e-4, 1e-4
V, S = 96, 24


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1) random weights (HF's 0.02 init makes logits ~0, which would hide RoPE/layout bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def _llama(**kw) -> LlamaForCausalLM:
    cfg = {
        "vocab_size": V,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    }
    cfg.update(kw)
    m = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    _randomize(m, 1)
    return m


def _qwen2(**kw) -> Qwen2ForCausalLM:
    cfg = {
        "vocab_size": V,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "use_sliding_window": False,
    }
    cfg.update(kw)
    m = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    _randomize(m, 2)
    if m.config.tie_word_embeddings:
        m.tie_weights()
    return m


CASES = {
    "llama-gqa": lambda: _llama(),
    "llama3-scaling": lambda: _llama(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-linear": lambda: _llama(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-yarn": lambda: _llama(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    ),
    "llama-tied-mha": lambda: _llama(num_key_value_heads=4, tie_word_embeddings=True),
    "qwen2-bias": lambda: _qwen2(),
    "qwen2-tied": lambda: _qwen2(tie_word_embeddings=True, num_key_value_heads=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_and_export_match_transformers(case, tmp_path):
    hf = CASES[case]()
    hf.save_pretrained(tmp_path / "hf")
    ours, args = load_hf(tmp_path / "hf")
    tokens = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
    assert want.abs().max() > 1.0  # the check is meaningful only with non-trivial logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)

    export_hf(ours, args, tmp_path / "out")
    back = type(hf).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, want, atol=ATOL, rtol=RTOL)
    assert args_from_hf_config(json.loads((tmp_path / "out" / "config.json").read_text())) == args


def test_dynamic_ntk_matches_transformers_beyond_original_context(tmp_path):
    # HF evaluates dynamic NTK at the longest position of the batch; feixing at the run's
    # max_seq_len, so they agree when that length is the batch length (here 40 > 16).
    hf = _llama(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    hf.save_pretrained(tmp_path)
    ours, args = load_hf(tmp_path, max_seq_len=40)
    assert args.rope_scaling.original_max_seq_len == 16
    tokens = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=ATOL, rtol=RTOL)


def test_sharded_checkpoint_and_packed_positions(tmp_path):
    hf = _llama()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours, _ = load_hf(tmp_path)
    # Explicit position ids (as packing produces) must reach RoPE exactly as in HF.
    tokens = torch.randint(0, V, (1, S), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(7, 7 + S).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(tokens, positions=pos), hf(tokens, position_ids=pos).logits, atol=ATOL, rtol=RTOL
        )


def test_bad_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    hf = _llama()
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_state_dict(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        args_from_hf_config({"model_type": "gpt2"})
    cfg = hf.config.to_dict() | {"attention_bias": True}
    with pytest.raises(ValueError, match="attention_bias"):
        args_from_hf_config(cfg)
    cfg = _qwen2().config.to_dict() | {"use_sliding_window": True}
    with pytest.raises(ValueError, match="use_sliding_window"):
        args_from_hf_config(cfg)


def test_shape_mismatch_names_the_tensor(tmp_path):
    hf = _llama()
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mlp.gate_proj"):
        load_hf_state_dict(tmp_path)


def test_build_from_hf_checkpoint_config(tmp_path):
    from feixing.config.schema import ModelConfig
    from feixing.models import build

    hf = _qwen2(tie_word_embeddings=True, num_key_value_heads=2)
    hf.save_pretrained(tmp_path)
    model = build(ModelConfig(flavor="ignored", hf_checkpoint=str(tmp_path)))
    assert model.tok_embeddings.weight.is_meta and model.args.qkv_bias and model.args.tie_embeddings
    model.to_empty(device="cpu")
    model.load_state_dict(load_hf_state_dict(tmp_path, model.args))
    tokens = torch.randint(0, V, (1, S), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="model.vocab_size"):
        build(ModelConfig(hf_checkpoint=str(tmp_path), vocab_size=V + 64))
