"""Llama-family architecture arguments and the named flavors (published shapes)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from feixing.ops.rope import RopeScaling


@dataclass(frozen=True)
class LlamaArgs:
    """One Llama-family architecture: Llama 2/3 and Qwen2-style variants."""

    dim: int
    """Hidden size (HF `hidden_size`)."""
    n_layers: int
    """Transformer blocks (HF `num_hidden_layers`)."""
    n_heads: int
    """Query heads (HF `num_attention_heads`)."""
    n_kv_heads: int
    """Key/value heads (GQA); must divide n_heads (HF `num_key_value_heads`)."""
    ffn_dim: int
    """SwiGLU hidden size (HF `intermediate_size`)."""
    vocab_size: int
    """Vocabulary rows of the embedding and output head."""
    head_dim: int = 0
    """Per-head size; 0 = dim // n_heads (set once: `replace(dim=...)` keeps the old head_dim)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (HF `rms_norm_eps`)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScaling | None = None
    """Context-extension scaling of RoPE (HF `rope_scaling`); None = plain RoPE."""
    max_seq_len: int = 4096
    """Context the model runs at (HF `max_position_embeddings`); used by dynamic/yarn scaling."""
    qkv_bias: bool = False
    """Bias on the q, k, v projections (Qwen2)."""
    tie_embeddings: bool = False
    """Output head reuses the token embedding matrix."""
    family: str = "llama"
    """HF architecture to export as: llama | qwen2."""

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}); "
                    "or set head_dim"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.family not in ("llama", "qwen2"):
            raise ValueError(f"family {self.family!r} is unknown; choose llama or qwen2")

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count; embedding=False leaves out the token embedding lookup table."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = self.dim * q + 2 * self.dim * kv + q * self.dim
        if self.qkv_bias:
            attn += q + 2 * kv
        layer = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        total = (
            self.n_layers * layer
            + self.dim
            + (0 if self.tie_embeddings else self.vocab_size * self.dim)
        )
        return total + (self.vocab_size * self.dim if embedding else 0)

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N + 12 * L * H * d * S (full attention, no causal halving).

        N counts every matmul weight, including the output head (also when tied) and excluding
        the embedding lookup. The attention term counts the full S x S score and value matmuls
        (forward + backward = 3 x 2 matmuls x 2 FLOPs); causal masking would halve it, which
        this convention does not do (same as torchtitan and PaLM's MFU).
        """
        n = self.num_params(embedding=False) + (
            self.vocab_size * self.dim if self.tie_embeddings else 0
        )
        return 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


def _llama3_scaling(factor: float) -> RopeScaling:
    return RopeScaling(
        "llama3",
        factor=factor,
        original_max_seq_len=8192,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
    )


FLAVORS: dict[str, LlamaArgs] = {
    # 4 heads / 2 KV heads: divisible by Ulysses 2 and 4; ~0.9M params, trains at several
    # steps/s on 4 CPU processes at seq_len 256. vocab is replaced by the tokenizer's.
    "demo": LlamaArgs(
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        ffn_dim=384,
        vocab_size=320,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=256,
    ),
    # For unit tests: the smallest shape that still exercises GQA (2 query heads per KV head).
    "tiny": LlamaArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        vocab_size=128,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=128,
    ),
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": LlamaArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        ffn_dim=11008,
        vocab_size=32000,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=4096,
    ),
    # meta-llama/Llama-3.2-1B
    "1b": LlamaArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        ffn_dim=8192,
        vocab_size=128256,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_llama3_scaling(32.0),
        max_seq_len=131072,
        tie_embeddings=True,
    ),
    # meta-llama/Llama-3.1-8B
    "8b": LlamaArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        vocab_size=128256,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_llama3_scaling(8.0),
        max_seq_len=131072,
    ),
    # meta-llama/Llama-3.1-70B
    "70b": LlamaArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=28672,
        vocab_size=128256,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_llama3_scaling(8.0),
        max_seq_len=131072,
    ),
    # Qwen/Qwen2-0.5B
    "qwen2-0.5b": LlamaArgs(
        dim=896,
        n_layers=24,
        n_heads=14,
        n_kv_heads=2,
        head_dim=64,
        ffn_dim=4864,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        max_seq_len=131072,
        qkv_bias=True,
        tie_embeddings=True,
        family="qwen2",
    ),
    # Qwen/Qwen2-7B
    "qwen2-7b": LlamaArgs(
        dim=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        head_dim=128,
        ffn_dim=18944,
        vocab_size=152064,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        max_seq_len=131072,
        qkv_bias=True,
        family="qwen2",
    ),
}


def get_args(flavor: str, **overrides) -> LlamaArgs:
    """The named flavor with fields replaced by `overrides` (e.g. the tokenizer's vocab_size)."""
    if flavor not in FLAVORS:
        raise ValueError(f"model.flavor {flavor!r} is unknown; choose one of {sorted(FLAVORS)}")
    return replace(FLAVORS[flavor], **overrides) if overrides else FLAVORS[flavor]
