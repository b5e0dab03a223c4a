"""HF config.json <-> LlamaArgs: published configs parse to our flavors; every flavor round-trips."""

from __future__ import annotations

import pytest

from feixing.models.llama.args import FLAVORS, get_args
from feixing.models.llama.hf import args_from_hf_config, from_hf_name, hf_config, to_hf_name
from feixing.ops.rope import RopeScaling

# transformers 4.x style config.json files as published on the Hub (unused keys trimmed).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}  # fmt: skip
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 896,
    "intermediate_size": 4864, "max_position_embeddings": 131072, "max_window_layers": 24,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip


def test_published_configs_parse_to_flavors():
    assert args_from_hf_config(LLAMA_31_8B) == get_args("8b")
    assert args_from_hf_config(QWEN2_05B) == get_args("qwen2-0.5b")


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_every_flavor_round_trips_through_hf_config(flavor):
    args = get_args(flavor)
    assert args_from_hf_config(hf_config(args)) == args


def test_transformers5_rope_parameters_and_legacy_type_key():
    v5 = dict(LLAMA_31_8B, rope_scaling=None)
    v5["rope_parameters"] = dict(LLAMA_31_8B["rope_scaling"], rope_theta=500000.0)
    del v5["rope_theta"]
    assert args_from_hf_config(v5) == get_args("8b")
    legacy = dict(LLAMA_31_8B, rope_scaling={"type": "linear", "factor": 2.0})
    assert args_from_hf_config(legacy).rope_scaling == RopeScaling("linear", 2.0)
    dyn = dict(
        LLAMA_31_8B, max_position_embeddings=4096, rope_scaling={"type": "dynamic", "factor": 2.0}
    )
    assert args_from_hf_config(dyn).rope_scaling.original_max_seq_len == 4096
    with pytest.raises(ValueError, match="longrope"):
        args_from_hf_config(dict(LLAMA_31_8B, rope_scaling={"rope_type": "longrope"}))


def test_name_mapping_is_a_bijection_and_strips_wrappers():
    names = [
        "tok_embeddings.weight", "norm.weight", "output.weight",
        "layers.3.attention.wq.bias", "layers.3.attention.wo.weight", "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w2.weight", "layers.0.feed_forward.w3.weight",
        "layers.1.attention_norm.weight", "layers.1.ffn_norm.weight",
    ]  # fmt: skip
    hf = [to_hf_name(n) for n in names]
    assert len(set(hf)) == len(names) and [from_hf_name(h) for h in hf] == names
    assert to_hf_name("layers.2._checkpoint_wrapped_module.feed_forward.w2.weight") == (
        "model.layers.2.mlp.down_proj.weight"
    )
    assert from_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(KeyError, match="no feixing counterpart"):
        from_hf_name("model.layers.0.block_sparse_moe.gate.weight")


def test_hf_config_rejects_unrepresentable_models():
    with pytest.raises(ValueError, match="qwen2"):
        hf_config(get_args("tiny", qkv_bias=True))
    with pytest.raises(ValueError, match="q/k/v bias"):
        hf_config(get_args("tiny", family="qwen2"))
