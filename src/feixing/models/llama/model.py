"""The Llama-family transformer as single-device code: parallelism is applied from outside.

Build it on the meta device, parallelise it, then `to_empty(device=...)` and `init_weights(seed)`.
Each block's attention kernel is the attribute `block.attention.core`, a callable
`core(q, k, v, *, causal, document_ids, window, softmax_scale) -> out` on (B, S, H, D) tensors,
which context parallelism replaces; the model holds no process group.
"""

from __future__ import annotations

import math
import re
import sys
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from feixing.models.llama.args import LlamaArgs
from feixing.ops.attention import attention as default_attention
from feixing.ops.rms_norm import rms_norm
from feixing.ops.rope import apply_rope, cos_sin, inv_freq
from feixing.ops.swiglu import swiglu

Tensor = torch.Tensor
INIT_STD = 0.02
# Wrappers that activation checkpointing and torch.compile insert into parameter names; the init
# seed of a parameter uses its name without them, so wrapping does not change the weights.
_WRAPPER_PARTS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


class KVCache:
    """Preallocated keys/values of every layer for decoding: (B, max_len, Hkv, D) each."""

    def __init__(self, args: LlamaArgs, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, max_len, args.n_kv_heads, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0  # tokens already stored; advanced by the model after all layers ran

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store new k, v (B, s, Hkv, D) of `layer`; return all keys, values and key positions."""
        end = self.length + k.shape[1]
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end], self.positions[:, :end]


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, computed by ops.rms_norm (fp32 inside)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """GQA self-attention with RoPE; optional q/k/v bias (Qwen2); the kernel is `self.core`."""

    def __init__(self, args: LlamaArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.core = default_attention

    def forward(self, x, cos, sin, document_ids=None, positions=None, kv_cache=None):
        B, S, _ = x.shape
        q = apply_rope(self.wq(x).view(B, S, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, S, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        if kv_cache is None:
            out = self.core(
                q, k, v, causal=True, document_ids=document_ids, window=None, softmax_scale=None
            )
        else:
            # Decoding: new queries against every cached key, masked by true positions. Not the
            # training kernel (queries and keys differ in length here): one fused SDPA call,
            # checked against the full forward in tests/unit/test_generate.py.
            k, v, k_pos = kv_cache.update(self.layer_id, k, v)
            visible = (k_pos.unsqueeze(1) <= positions.unsqueeze(2)).unsqueeze(1)  # (B, 1, s, T)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=visible,
                enable_gqa=True,
            ).transpose(1, 2)
        return self.wo(out.reshape(B, S, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, args: LlamaArgs, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x, cos, sin, document_ids=None, positions=None, kv_cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, document_ids, positions, kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Decoder-only transformer: tokens (B, S) -> logits (B, S, V) in the parameters' dtype."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(args, i) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied: the head reads tok_embeddings.weight in forward (no second Parameter object),
        # because module.to_empty() and FSDP2 would silently untie a shared Parameter.
        self.output = (
            None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        )
        # RoPE frequencies: a plain CPU tensor, not a buffer, so meta-device construction,
        # to_empty() and state dicts never touch it; copied to each device once (cached).
        freqs, scale = inv_freq(args.head_dim, args.rope_theta, args.rope_scaling, args.max_seq_len)
        self._rope_freqs, self._rope_scale = freqs, scale
        self._rope_cache: dict[torch.device, Tensor] = {}

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B, S, head_dim/2) in fp32 for the given position ids."""
        dev = positions.device
        if dev not in self._rope_cache:
            self._rope_cache[dev] = self._rope_freqs.to(dev)
        return cos_sin(positions, self._rope_cache[dev], self._rope_scale)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        document_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """tokens (B, S) long; positions (B, S) long (default 0..S-1, or continuing the cache);
        document_ids (B, S): packed documents attend only within themselves; kv_cache: decoding."""
        B, S = tokens.shape
        if positions is None:
            start = kv_cache.length if kv_cache is not None else 0
            positions = torch.arange(start, start + S, device=tokens.device).expand(B, S)
        if kv_cache is not None:
            if document_ids is not None:
                raise ValueError(
                    "document_ids are not supported with a KV cache (decode one document)"
                )
            if kv_cache.length + S > kv_cache.max_len:
                raise ValueError(
                    f"KV cache holds {kv_cache.max_len} tokens; {kv_cache.length + S} needed"
                )
            kv_cache.positions[:, kv_cache.length : kv_cache.length + S] = positions
        cos, sin = self.rope(positions)
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, cos, sin, document_ids, positions, kv_cache)
        h = self.norm(h)
        if kv_cache is not None:
            kv_cache.length += S
        return F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)

    def num_flops_per_token(self, seq_len: int) -> int:
        """6N + 12 L H d S, full attention (no causal halving); see LlamaArgs."""
        return self.args.num_flops_per_token(seq_len)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter in place, identically for every parallel layout.

        Each parameter's full tensor is drawn from its own generator, seeded by `seed` and the
        parameter's name (wrapper prefixes removed), on the parameter's device type; a sharded
        DTensor (FSDP2) then keeps only its local piece. So 1, 2 or 4 ranks, any wrapping order
        and any parameter order give the same weights on one device type (CPU and CUDA random
        streams differ). Costs one full-size temporary per parameter on each rank.
        Scheme: linear and embedding weights ~ N(0, 0.02) truncated at 3 sigma, residual
        output projections (wo, w2) scaled by 1/sqrt(2 n_layers) (GPT-2), norms 1, biases 0.
        """
        # No DTensor can exist unless its module was imported; importing it costs ~2 s on CPU.
        dtensor = sys.modules.get("torch.distributed.tensor")
        for name, p in self.named_parameters():
            sharded = dtensor is not None and isinstance(p, dtensor.DTensor)
            local = p.to_local() if sharded else p
            if local.is_meta:
                raise RuntimeError(
                    "init_weights needs real storage: call model.to_empty(device=...) first"
                )
            full = _init_full(
                _WRAPPER_PARTS.sub("", name), tuple(p.shape), seed, self.args.n_layers, local.device
            )
            if (
                sharded
            ):  # every rank drew the same full tensor; keep this rank's piece, no communication
                full = dtensor.distribute_tensor(
                    full, p.device_mesh, p.placements, src_data_rank=None
                )
                full = full.to_local()
            local.copy_(full)


def _init_full(name: str, shape: tuple[int, ...], seed: int, n_layers: int, device) -> Tensor:
    """The full fp32 initial value of the parameter called `name` (see Llama.init_weights)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    std = INIT_STD
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std = INIT_STD / math.sqrt(2 * n_layers)
    out = torch.empty(shape, device=device)
    return nn.init.trunc_normal_(out, std=std, a=-3 * std, b=3 * std, generator=gen)
