"""Model construction: `build(cfg, vocab_size)` returns a meta-device, single-device model."""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch import nn

from feixing.models.llama.args import LlamaArgs
from feixing.models.llama.args import get_args as _llama_args

FAMILIES = ("llama",)


def round_vocab(n: int, multiple: int = 64) -> int:
    """Round a tokenizer's vocabulary up to a multiple of 64 (matmul-friendly shapes)."""
    return -(-n // multiple) * multiple


def get_args(flavor: str, **overrides) -> LlamaArgs:
    """Architecture of a named flavor (see models/llama/args.py), with optional field overrides."""
    return _llama_args(flavor, **overrides)


def resolve_args(cfg, vocab_size: int = 0) -> LlamaArgs:
    """The architecture `cfg` (a config.schema.ModelConfig) describes.

    Vocabulary: cfg.vocab_size if set, else `vocab_size` (the tokenizer's) rounded up to a
    multiple of 64, else the flavor's. With cfg.hf_checkpoint the shape comes from that
    folder's config.json and cfg.flavor is ignored. cfg.max_seq_len > 0 sets the context that
    dynamic/yarn RoPE scaling are evaluated at.
    """
    if cfg.family not in FAMILIES:
        raise ValueError(f"model.family {cfg.family!r} is unknown; choose one of {FAMILIES}")
    if cfg.hf_checkpoint:
        from feixing.models.llama.hf import read_hf_args

        args = read_hf_args(cfg.hf_checkpoint)
        if cfg.vocab_size and cfg.vocab_size != args.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size} differs from {cfg.hf_checkpoint}'s "
                f"vocab_size={args.vocab_size}; set model.vocab_size = 0 to use the checkpoint's"
            )
    else:
        args = get_args(cfg.flavor)
        vocab = cfg.vocab_size or (round_vocab(vocab_size) if vocab_size > 0 else 0)
        if vocab:
            args = replace(args, vocab_size=vocab)
    if cfg.max_seq_len > 0:
        args = replace(args, max_seq_len=cfg.max_seq_len)
    return args


def build(cfg, vocab_size: int = 0) -> nn.Module:
    """A single-device model on the meta device: parallelise it, then `to_empty` + `init_weights`.

    Weights of cfg.hf_checkpoint are not loaded here (they would not fit unsharded); load them
    after parallelisation with `feixing.models.llama.hf.load_hf_state_dict`.
    """
    from feixing.models.llama.model import Llama
    from feixing.ops.attention import attention

    args = resolve_args(cfg, vocab_size)
    with torch.device("meta"):
        model = Llama(args)
    if cfg.attention_backend != "auto":
        core = functools.partial(attention, backend=cfg.attention_backend)
        for block in model.layers.values():
            block.attention.core = core
    return model
