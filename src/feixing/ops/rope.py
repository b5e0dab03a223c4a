"""Rotary position embeddings: frequencies (with context-extension scaling) and the apply dispatch.

Frequencies follow HF transformers' `rope_parameters` / `rope_scaling` semantics exactly
(`default`, `linear`, `dynamic`, `yarn`, `llama3`), so checkpoints behave the same in both.
cos/sin are computed from the position ids on the fly (not from a table), so packed documents,
context-parallel shards and KV-cache decoding all just pass their own positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from feixing.ops import reference

Tensor = torch.Tensor
KINDS = ("linear", "dynamic", "yarn", "llama3")
BACKENDS = ("auto", "reference")


@dataclass(frozen=True)
class RopeScaling:
    """Context-extension scaling of RoPE; field meanings are HF's `rope_scaling` keys."""

    kind: str
    """linear | dynamic (NTK-aware, evaluated at the run's max_seq_len) | yarn | llama3."""
    factor: float | None = None
    """Context extension factor (yarn: None = max_seq_len / original_max_seq_len, as in HF)."""
    original_max_seq_len: int | None = None
    """Pre-training context: llama3/yarn `original_max_position_embeddings`; for dynamic, HF's
    `max_position_embeddings`. None = the model's max_seq_len (HF's default)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original/low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original/high_freq_factor are kept; between them, interpolate."""
    beta_fast: float = 32.0
    """yarn: rotations at which extrapolation ends."""
    beta_slow: float = 1.0
    """yarn: rotations at which interpolation starts."""
    attention_factor: float | None = None
    """yarn: scale on cos/sin; None = derived from factor (and mscale, mscale_all_dim)."""
    mscale: float | None = None
    """yarn (DeepSeek style): numerator mscale for the derived attention factor."""
    mscale_all_dim: float | None = None
    """yarn (DeepSeek style): denominator mscale for the derived attention factor."""
    truncate: bool = True
    """yarn: round the correction range to whole dimensions."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rope scaling kind {self.kind!r} is unknown; choose one of {KINDS}")
        if self.factor is None and self.kind != "yarn":
            raise ValueError(f"rope scaling {self.kind!r} needs a `factor`")


def inv_freq(
    head_dim: int, theta: float, scaling: RopeScaling | None = None, max_seq_len: int = 0
) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim/2,) in fp32 on the CPU and the cos/sin scale (yarn's mscale).

    Always computed on the CPU (explicit device), also inside `with torch.device("meta")`.

    max_seq_len is the context the run uses: `dynamic` evaluates NTK scaling at that length (a
    static choice so every rank and every context-parallel shard agrees; HF instead evaluates
    at the longest position of each batch), and HF's defaults for original lengths use it.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    base_freq = 1.0 / (theta**exps)
    if scaling is None:
        return base_freq, 1.0
    s = scaling
    original = s.original_max_seq_len or max_seq_len
    if s.kind == "linear":
        return base_freq / s.factor, 1.0
    if s.kind == "dynamic":
        if not original:
            raise ValueError("dynamic RoPE scaling needs original_max_seq_len or max_seq_len")
        seq_len = max(max_seq_len, original)
        base = theta * ((s.factor * seq_len / original) - (s.factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        return 1.0 / (base**exps), 1.0
    if s.kind == "llama3":
        return _llama3(base_freq, s, original), 1.0
    return _yarn(head_dim, theta, s, original, max_seq_len)


def _llama3(freq: Tensor, s: RopeScaling, original: int) -> Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between."""
    low_wavelen = original / s.low_freq_factor
    high_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / s.factor, freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(
    head_dim: int, theta: float, s: RopeScaling, original: int, max_seq_len: int
) -> tuple[Tensor, float]:
    """YaRN (arXiv 2309.00071): per-dimension blend of interpolation and extrapolation + mscale."""
    factor = s.factor if s.factor is not None else max_seq_len / original

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = s.attention_factor
    if att is None:
        if s.mscale and s.mscale_all_dim:
            att = get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim)
        else:
            att = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero, as HF does
    ramp = (
        (torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)
    ).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 = extrapolate (high frequencies), 0 = interpolate
    return interpolation * (1 - keep) + extrapolation * keep, float(att)


def cos_sin(positions: Tensor, freqs: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos, sin of positions * freqs: positions (B, S) or (S,) -> (B, S, D/2) or (S, D/2), fp32.

    The product is formed in fp32 exactly as HF does (a K=1 matmul), so angles match bit for bit.
    """
    angles = positions.float().unsqueeze(-1) * freqs.to(positions.device).float()
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, backend: str = "auto") -> Tensor:
    """Rotate x (B, S, H, D) by cos/sin (see reference.apply_rope); only the reference exists."""
    if backend not in BACKENDS:
        raise ValueError(f"rope backend {backend!r} is unknown; choose one of {BACKENDS}")
    return reference.apply_rope(x, cos, sin)
