"""HF adapter: read and write Llama / Qwen2 checkpoint folders (config.json + safetensors).

HF stores q/k projections already permuted for `rotate_half` RoPE (first half, second half),
which is what ops.reference.apply_rope implements, so weights are copied without permutation;
the parity tests check this against transformers' own forward.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from feixing.models.llama.args import LlamaArgs
from feixing.models.llama.model import _WRAPPER_PARTS, Llama
from feixing.ops.rope import RopeScaling

_LAYER_MAP = {  # feixing name inside layers.{i} -> HF name inside model.layers.{i}
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


# ----------------------------------------------------------------------------- names
def to_hf_name(name: str) -> str:
    """feixing parameter name -> HF name (wrapper prefixes such as `_orig_mod.` removed)."""
    name = _WRAPPER_PARTS.sub("", name)
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None or m.group(2) not in _LAYER_MAP:
        raise KeyError(f"no HF name for parameter {name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"


def from_hf_name(name: str) -> str | None:
    """HF name -> feixing name; None for entries feixing does not keep (e.g. rotary inv_freq)."""
    inverse = {v: k for k, v in _TOP_MAP.items()}
    if name in inverse:
        return inverse[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        for ours, theirs in _LAYER_MAP.items():
            if m.group(2) == theirs:
                return f"layers.{m.group(1)}.{ours}.{m.group(3)}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise KeyError(
        f"HF checkpoint entry {name!r} has no feixing counterpart (unsupported architecture?)"
    )


# ----------------------------------------------------------------------------- config
def args_from_hf_config(cfg: dict, source: str = "config.json") -> LlamaArgs:
    """LlamaArgs from a HF Llama/Qwen2 config dict (4.x `rope_scaling` or 5.x `rope_parameters`)."""
    mtype = cfg.get("model_type")
    if mtype not in _ARCH:
        raise ValueError(
            f"{source}: model_type {mtype!r} is not supported; feixing reads llama and qwen2"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU needs silu)"
        )
    if mtype == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ValueError(
            f"{source}: attention_bias/mlp_bias are not supported for llama "
            "(only Qwen2's q/k/v bias)"
        )
    if mtype == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError(
            f"{source}: use_sliding_window=true is not supported; set it to false to load"
        )
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind in ("linear", "dynamic", "yarn", "llama3"):
        original = rope.get("original_max_position_embeddings")
        if kind == "dynamic" or (kind in ("yarn", "llama3") and original is None):
            original = max_pos  # HF's meaning: the pre-training context
        keys = (
            "low_freq_factor",
            "high_freq_factor",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "mscale",
            "mscale_all_dim",
            "truncate",
        )
        extra = {k: rope[k] for k in keys if rope.get(k) is not None}
        if kind == "yarn":  # HF treats beta 0/None as the default
            extra["beta_fast"] = rope.get("beta_fast") or 32.0
            extra["beta_slow"] = rope.get("beta_slow") or 1.0
        scaling = RopeScaling(
            kind, factor=rope.get("factor"), original_max_seq_len=original, **extra
        )
    elif kind != "default":
        raise ValueError(
            f"{source}: rope type {kind!r} is not supported; "
            "use default, linear, dynamic, yarn or llama3"
        )
    n_heads = int(cfg["num_attention_heads"])
    return LlamaArgs(
        dim=int(cfg["hidden_size"]),
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        ffn_dim=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        head_dim=int(cfg.get("head_dim") or 0),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=max_pos,
        qkv_bias=(mtype == "qwen2"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        family=mtype,
    )


def hf_config(args: LlamaArgs, dtype: torch.dtype = torch.float32) -> dict:
    """A HF config.json dict for `args`, readable by transformers 4.x and 5.x."""
    if args.family == "llama" and args.qkv_bias:
        raise ValueError(
            "q/k/v bias without o_proj bias has no HF Llama equivalent; use family='qwen2'"
        )
    if args.family == "qwen2" and not args.qkv_bias:
        raise ValueError(
            "HF Qwen2 always has q/k/v bias; use family='llama' for a model without it"
        )
    max_pos, scaling = args.max_seq_len, None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        scaling = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "dynamic":
            max_pos = s.original_max_seq_len or max_pos  # HF reads the original context from here
        if s.kind in ("llama3", "yarn"):
            scaling["original_max_position_embeddings"] = s.original_max_seq_len or max_pos
        if s.kind == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.kind == "yarn":
            scaling.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(s, k) is not None:
                    scaling[k] = getattr(s, k)
            if not s.truncate:
                scaling["truncate"] = False
    cfg = {
        "architectures": [_ARCH[args.family]],
        "model_type": args.family,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": max_pos,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": args.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if args.family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_layers)
    return cfg


# ----------------------------------------------------------------------------- read
def read_hf_args(folder: str | Path) -> LlamaArgs:
    """LlamaArgs from `folder/config.json`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a HF checkpoint folder needs config.json")
    return args_from_hf_config(json.loads(path.read_text()), source=str(path))


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {folder}: feixing reads safetensors only; convert *.bin with "
            "transformers (`model.save_pretrained(dir, safe_serialization=True)`)"
        )
    return files


def load_hf_state_dict(
    folder: str | Path, args: LlamaArgs | None = None
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under feixing names (CPU, stored dtype); checks names and shapes.

    Use it to fill a parallelised model, e.g. with torch.distributed.checkpoint.state_dict.
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True)).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    args = args or read_hf_args(folder)
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        for name, t in load_file(str(f)).items():
            ours = from_hf_name(name)
            if ours is not None:
                sd[ours] = t
    if args.tie_embeddings:
        sd.pop("output.weight", None)  # some tied checkpoints store lm_head anyway; it equals embed
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Llama(args).state_dict().items()}
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{folder}: checkpoint does not match its config.json: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise ValueError(
                f"{folder}: {to_hf_name(k)} has shape {tuple(sd[k].shape)}, "
                f"config.json implies {tuple(shape)}"
            )
    return sd


def load_hf(
    folder: str | Path, device="cpu", dtype: torch.dtype = torch.float32, max_seq_len: int = 0
):
    """(model, args): a single-device feixing model with the weights of a HF Llama/Qwen2 folder."""
    args = read_hf_args(folder)
    if max_seq_len:
        args = replace(args, max_seq_len=max_seq_len)
    sd = load_hf_state_dict(folder, args)
    with torch.device("meta"):
        model = Llama(args)
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict(sd, strict=True)
    return model, args


# ----------------------------------------------------------------------------- write
def export_hf(
    model_or_state_dict: nn.Module | dict,
    args: LlamaArgs,
    out_folder: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `out_folder/config.json` and `model.safetensors` that transformers loads.

    A state dict of DTensors (FSDP2) is gathered with full_tensor(), a collective: call this on
    every rank then, and pass a different folder or write only from rank 0 by gathering first.
    dtype None keeps each tensor's dtype.
    """
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    sd = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if args.tie_embeddings and _WRAPPER_PARTS.sub("", name) == "output.weight":
            continue
        t = t.detach().to("cpu", dtype=dtype or t.dtype).contiguous()
        tensors[to_hf_name(name)] = t
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(tensors.values()))
    (out / "config.json").write_text(
        json.dumps(hf_config(args, dtype or first.dtype), indent=2) + "\n"
    )
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
