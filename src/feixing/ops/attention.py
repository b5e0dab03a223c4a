"""Attention backends that return the log-sum-exp (block forward + closed-form block backward),
and the model-facing dispatch.

Every backend implements two block kernels with one contract, so context parallelism can call
them on any (query block, key block) pair with *global* token indices:

    fwd(q, k, v, scale, mask) -> out (B, Sq, H, D) in q.dtype, lse (B, H, Sq) fp32 (fp64 for fp64)
    bwd(dout, q, k, v, out, lse, scale, mask) -> dq, dk, dv in fp32 (fp64), dk/dv (B, Sk, Hkv, D)

A query row that sees no key gets out = 0 and lse = -inf (so partial results merge exactly);
`bwd` accepts the *final merged* out/lse of a sharded computation and then returns this
block's share of the global gradient (see `reference.attention_backward`).

Backends: `reference` (ops/reference.py, any device), `cpu_flash` (aten's CPU flash kernel and
its backward), `cuda` (flash-attn if importable for mask-free/causal blocks, otherwise aten's
memory-efficient kernel with an additive mask; NOT tested by this repository's CI), `npu`
(torch_npu.npu_fusion_attention; NOT tested here). `auto` picks by device and logs once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from feixing.ops import reference

Tensor = torch.Tensor
log = logging.getLogger("feixing.ops.attention")

BACKENDS = ("reference", "cpu_flash", "cuda", "npu")
_ALIASES = {"cuda_flash": "cuda", "npu_fusion": "npu"}


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Which keys each query may see, in global coordinates (see reference.attention_mask).

    q_index/k_index: (Sq,)/(Sk,) global positions (None = arange). q_doc/k_doc: (B, Sq)/(B, Sk)
    document ids or None. full=True: the caller proved every pair visible (no mask needed).
    """

    causal: bool = True
    q_index: Tensor | None = None
    k_index: Tensor | None = None
    q_doc: Tensor | None = None
    k_doc: Tensor | None = None
    window: tuple[int, int] = (-1, -1)
    full: bool = False

    def kind(self, sq: int, sk: int) -> str:
        """'full' (no mask), 'causal' (aligned lower triangle), or 'dense' (explicit mask)."""
        if self.full:
            return "full"
        plain = self.q_doc is None and self.window == (-1, -1)
        if plain and not self.causal:
            return "full"
        same = (self.q_index is None and self.k_index is None) or (
            self.q_index is not None and self.k_index is not None
            and self.q_index.shape == self.k_index.shape and torch.equal(self.q_index, self.k_index)
            and bool((self.q_index[1:] - self.q_index[:-1] == 1).all()))
        if plain and self.causal and sq == sk and same:
            return "causal"
        return "dense"

    def dense(self, sq: int, sk: int, device) -> Tensor:
        """Boolean visibility (B or 1, Sq, Sk)."""
        qi = self.q_index if self.q_index is not None else torch.arange(sq, device=device)
        ki = self.k_index if self.k_index is not None else torch.arange(sk, device=device)
        return reference.attention_mask(qi, ki, causal=self.causal, q_doc=self.q_doc,
                                         k_doc=self.k_doc, window=self.window)


def _ref_kwargs(mask: MaskSpec) -> dict:
    if mask.full:  # proven all-visible: the reference needs no mask arguments at all
        return dict(causal=False)
    return dict(causal=mask.causal, q_index=mask.q_index, k_index=mask.k_index,
                q_doc=mask.q_doc, k_doc=mask.k_doc, window=mask.window)


# ----------------------------------------------------------------------------- reference
def _fwd_reference(q, k, v, scale, mask):
    return reference.attention(q, k, v, softmax_scale=scale, **_ref_kwargs(mask))


def _bwd_reference(dout, q, k, v, out, lse, scale, mask):
    return reference.attention_backward(dout, q, k, v, out, lse, softmax_scale=scale,
                                        **_ref_kwargs(mask))


# ----------------------------------------------------------------------------- aten CPU flash
def _additive(vis: Tensor, dtype) -> Tensor:
    """bool (B|1, Sq, Sk) -> additive (B|1, 1, Sq, Sk) in the kernel's dtype (it requires that)."""
    return torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill(
        ~vis, float("-inf")).unsqueeze(1)


def _expand(x: Tensor, h: int) -> Tensor:
    rep = h // x.shape[2]
    return x if rep == 1 else x.repeat_interleave(rep, dim=2)


def _fold(dx: Tensor, hkv: int) -> Tensor:
    """Sum gradients of replicated KV heads back onto their KV head: (B,S,H,D) -> (B,S,Hkv,D)."""
    b, s, h, d = dx.shape
    return dx if h == hkv else dx.view(b, s, hkv, h // hkv, d).sum(3)


def _acc(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _fwd_cpu_flash(q, k, v, scale, mask):
    sq, sk, h = q.shape[1], k.shape[1], q.shape[2]
    kind = mask.kind(sq, sk)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, _expand(k, h), _expand(v, h)))
    am, vis = None, None
    if kind == "dense":
        vis = mask.dense(sq, sk, q.device)
        am = _additive(vis, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qt, kt, vt, 0.0, kind == "causal", attn_mask=am, scale=scale)
    lse = lse.to(_acc(q))
    if vis is not None:
        # The CPU kernel reports lse = 0 (and out = 0) for rows that see no key; the merge
        # needs -inf there, otherwise an empty block would dilute the other blocks' softmax.
        empty = ~vis.any(-1)  # (B|1, Sq)
        if bool(empty.any()):
            lse = lse.masked_fill(empty.unsqueeze(1), float("-inf"))
    return out.transpose(1, 2), lse


def _bwd_cpu_flash(dout, q, k, v, out, lse, scale, mask):
    sq, sk, h, hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kind = mask.kind(sq, sk)
    am = _additive(mask.dense(sq, sk, q.device), q.dtype) if kind == "dense" else None
    # Rows with no visible key anywhere (lse = -inf) must contribute nothing: with lse = +inf
    # exp(s - lse) = 0, whereas -inf would give exp(+inf) or NaN inside the kernel.
    lse = torch.where(torch.isinf(lse) & (lse < 0), torch.full_like(lse, float("inf")), lse)
    t = lambda x: x.transpose(1, 2)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        t(dout.to(q.dtype)).contiguous(), t(q), t(_expand(k, h)), t(_expand(v, h)),
        t(out.to(q.dtype)).contiguous(), lse.to(torch.float32 if q.dtype != torch.float64
                                                else torch.float64).contiguous(),
        0.0, kind == "causal", attn_mask=am, scale=scale)
    acc = _acc(q)
    return t(dq).to(acc), _fold(t(dk).to(acc), hkv), _fold(t(dv).to(acc), hkv)


# ----------------------------------------------------------------------------- CUDA (untested here)
def _cuda_bias(vis: Tensor, dtype, b: int, h: int) -> Tensor:
    """Additive bias (B, H, Sq, Sk) whose rows are 16-element aligned, as aten's
    memory-efficient kernel requires (the same padding `scaled_dot_product_attention` does)."""
    sq, sk = vis.shape[-2:]
    pad = (sk + 15) // 16 * 16
    bias = torch.zeros((vis.shape[0], 1, sq, pad), dtype=dtype, device=vis.device)
    bias[..., :sk].masked_fill_(~vis.unsqueeze(1), float("-inf"))
    return bias[..., :sk].expand(b, h, sq, sk)


def _fwd_cuda(q, k, v, scale, mask):
    sq, sk, h = q.shape[1], k.shape[1], q.shape[2]
    kind = mask.kind(sq, sk)
    try:  # flash-attn handles GQA natively and returns lse (B, H, Sq) in fp32
        from flash_attn.flash_attn_interface import _flash_attn_forward  # type: ignore
    except ImportError:
        _flash_attn_forward = None
    half = q.dtype in (torch.float16, torch.bfloat16)
    if _flash_attn_forward is not None and kind != "dense" and half:
        res = _flash_attn_forward(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, scale,
                                  causal=kind == "causal", window_size_left=-1,
                                  window_size_right=-1, softcap=0.0, alibi_slopes=None,
                                  return_softmax=False)
        # flash-attn >= 2.6.3 returns (out, lse, S, rng); older ones (out, q, k, v, out_pad, lse, ...)
        return res[0], (res[1] if len(res) == 4 else res[5]).float()
    vis = mask.dense(sq, sk, q.device) if kind == "dense" else None
    bias = None if vis is None else _cuda_bias(vis, q.dtype, q.shape[0], h)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, _expand(k, h), _expand(v, h)))
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        qt, kt, vt, bias, True, 0.0, kind == "causal", scale=scale)
    lse = lse[..., :sq].float()  # some versions pad lse rows to a multiple of 32
    if vis is not None:
        lse = lse.masked_fill(~vis.any(-1).unsqueeze(1), float("-inf"))
    return out.transpose(1, 2), lse


def _bwd_cuda(dout, q, k, v, out, lse, scale, mask):
    # One honest path: aten's efficient-attention backward accepts an external lse and mask.
    sq, sk, h, hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kind = mask.kind(sq, sk)
    bias = None
    if kind == "dense":
        bias = _cuda_bias(mask.dense(sq, sk, q.device), q.dtype, q.shape[0], h)
    lse = torch.where(torch.isinf(lse) & (lse < 0), torch.full_like(lse, float("inf")), lse)
    pad = (sq + 31) // 32 * 32 - sq  # give the kernel the padded lse layout its forward makes
    lse = torch.nn.functional.pad(lse.float(), (0, pad), value=float("inf")).contiguous()
    t = lambda x: x.transpose(1, 2)  # (B,S,H,D) <-> (B,H,S,D)
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        t(dout.to(q.dtype)), t(q), t(_expand(k, h)), t(_expand(v, h)), bias, t(out.to(q.dtype)),
        lse, seed, seed, 0.0, [True, True, True, False], kind == "causal", scale=scale)
    acc = _acc(q)
    return t(dq).to(acc), _fold(t(dk).to(acc), hkv), _fold(t(dv).to(acc), hkv)


# ----------------------------------------------------------------------------- Ascend (untested here)
def _npu_mask(mask, sq, sk, device):
    # npu_fusion_attention's atten_mask marks *hidden* pairs with True, shape (B,1,Sq,Sk).
    return (~mask.dense(sq, sk, device)).unsqueeze(1)


def _fwd_npu(q, k, v, scale, mask):
    import torch_npu  # type: ignore

    sq, sk, h = q.shape[1], k.shape[1], q.shape[2]
    am = None if mask.kind(sq, sk) == "full" else _npu_mask(mask, sq, sk, q.device)
    res = torch_npu.npu_fusion_attention(q, k, v, h, input_layout="BSND", atten_mask=am,
                                         scale=scale, keep_prob=1.0)
    out, smax, ssum = res[0], res[1], res[2]  # max / sum are (B, H, Sq, 8), replicated
    lse = (smax[..., 0] + torch.log(ssum[..., 0])).float()
    return out, lse


def _bwd_npu(dout, q, k, v, out, lse, scale, mask):
    import torch_npu  # type: ignore

    sq, sk, h = q.shape[1], k.shape[1], q.shape[2]
    am = None if mask.kind(sq, sk) == "full" else _npu_mask(mask, sq, sk, q.device)
    lse = torch.where(torch.isinf(lse) & (lse < 0), torch.full_like(lse, float("inf")), lse)
    # Passing max = global lse and sum = 1 makes the kernel use exp(s - lse): the global softmax.
    smax = lse.float().unsqueeze(-1).expand(*lse.shape, 8).contiguous()
    ssum = torch.ones_like(smax)
    res = torch_npu.npu_fusion_attention_grad(
        q, k, v, dout.to(q.dtype), h, "BSND", atten_mask=am, softmax_max=smax, softmax_sum=ssum,
        attention_in=out.to(q.dtype), scale_value=scale, keep_prob=1.0)
    acc = _acc(q)
    return res[0].to(acc), res[1].to(acc), res[2].to(acc)


# ----------------------------------------------------------------------------- dispatch
_KERNELS = {
    "reference": (_fwd_reference, _bwd_reference),
    "cpu_flash": (_fwd_cpu_flash, _bwd_cpu_flash),
    "cuda": (_fwd_cuda, _bwd_cuda),
    "npu": (_fwd_npu, _bwd_npu),
}
_logged: set = set()


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Canonical backend name for `name` on `device`; `auto` picks and logs its choice once."""
    name = _ALIASES.get(name, name)
    dev = torch.device(device).type
    if name == "auto":
        name = {"cpu": "cpu_flash", "cuda": "cuda", "npu": "npu"}.get(dev, "reference")
        if name == "cpu_flash" and not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            name = "reference"
        if (dev, name) not in _logged:
            _logged.add((dev, name))
            log.info("attention backend auto -> %s on %s", name, dev)
        return name
    if name not in _KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; choose auto or one of {BACKENDS} "
                         f"(aliases {sorted(_ALIASES)}) in model.attention_backend")
    need = {"cpu_flash": "cpu", "cuda": "cuda", "npu": "npu"}.get(name)
    if need is not None and need != dev:
        raise ValueError(f"attention backend {name!r} runs on {need} tensors, got {dev}; "
                         "use backend='auto' or 'reference'")
    return name


def block_forward(q, k, v, *, scale: float, mask: MaskSpec, backend: str):
    """out (B,Sq,H,D) q.dtype, lse (B,H,Sq) fp32 of one (query block, key block) pair."""
    return _KERNELS[backend][0](q, k, v, scale, mask)


def block_backward(dout, q, k, v, out, lse, *, scale: float, mask: MaskSpec, backend: str):
    """fp32 (dq, dk, dv) of one block pair given the (possibly global) out and lse."""
    return _KERNELS[backend][1](dout, q, k, v, out, lse, scale, mask)


def check_window(window) -> tuple[int, int]:
    """None -> (-1, -1); otherwise a pair of ints >= -1 (flash-attn convention)."""
    if window is None:
        return (-1, -1)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window)):
        raise ValueError(f"window must be None or (left, right) ints >= -1 (-1 = unbounded), got {window!r}")
    return (int(window[0]), int(window[1]))


class _Attention(torch.autograd.Function):
    """Single-device attention through one backend. In: q (B,S,H,D), k/v (B,S,Hkv,D).
    Out: out (B,S,H,D), lse (B,H,S) (not differentiable). No communication."""

    @staticmethod
    def forward(ctx, q, k, v, scale, mask, backend):
        out, lse = block_forward(q, k, v, scale=scale, mask=mask, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (scale, mask, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, mask, backend = ctx.cfg
        dq, dk, dv = block_backward(dout, q, k, v, out, lse, scale=scale, mask=mask, backend=backend)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def attention_with_lse(q, k, v, *, causal=True, document_ids=None, window=None,
                       softmax_scale=None, backend="auto") -> tuple[Tensor, Tensor]:
    """Like `attention` but also returns lse (B, H, S) (fp32; -inf where a row sees no key)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects q, k, v as (batch, seq, heads, head_dim)")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    name = resolve_backend(backend, q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = MaskSpec(causal=causal, q_doc=document_ids, k_doc=document_ids, window=check_window(window))
    return _Attention.apply(q, k, v, scale, mask, name)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    document_ids: Tensor | None = None,
    window: tuple[int, int] | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Single-device attention: q (B, S, H, D), k/v (B, S, Hkv, D) -> out (B, S, H, D).

    document_ids (B, S): tokens attend only within their document (packed sequences).
    window=(left, right) as in flash-attn; None = unbounded.
    """
    return attention_with_lse(q, k, v, causal=causal, document_ids=document_ids, window=window,
                              softmax_scale=softmax_scale, backend=backend)[0]
