"""Attention backends with lse: cpu_flash == reference for out, lse and gradients (empty rows, global lse)."""

from __future__ import annotations

import logging

import pytest
import torch

from feixing.ops import attention as A
from feixing.ops import reference

torch.set_num_threads(1)
# fp32 vs fp64 reference with <= 24 keys of O(1) values: rounding ~1e-6; 1e-5 leaves headroom.
TOL = 1e-5


def _inputs(B=2, S=12, H=4, Hkv=2, D=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return mk(B, S, H, D), mk(B, S, Hkv, D), mk(B, S, Hkv, D), mk(B, S, H, D)


MASKS = [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, docs=[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3]),
    dict(causal=True, window=(3, 0)),
    dict(causal=False, window=(2, 1), docs=[0] * 5 + [1] * 7),
]


@pytest.mark.parametrize("m", MASKS)
def test_cpu_flash_matches_reference_out_lse_grads(m):
    q, k, v, do = _inputs()
    docs = None if "docs" not in m else torch.tensor([m["docs"]] * 2)
    ro, rl = reference.attention(q, k, v, causal=m["causal"], q_doc=docs, k_doc=docs,
                                 window=m.get("window", (-1, -1)))
    rdq, rdk, rdv = reference.attention_backward(do, q, k, v, ro, rl, causal=m["causal"], q_doc=docs,
                                                 k_doc=docs, window=m.get("window", (-1, -1)))
    qs, ks, vs = (x.float().requires_grad_() for x in (q, k, v))
    out, lse = A.attention_with_lse(qs, ks, vs, causal=m["causal"], document_ids=docs,
                                    window=m.get("window"), backend="cpu_flash")
    (out.double() * do).sum().backward()
    assert lse.shape == (2, 4, 12) and lse.dtype == torch.float32
    for got, want in ((out, ro), (lse, rl), (qs.grad, rdq), (ks.grad, rdk), (vs.grad, rdv)):
        assert (got.double() - want).abs().max() < TOL


def test_empty_rows_get_minus_inf_lse_and_zero_grads():
    """The aten CPU kernel reports lse 0 for a row that sees no key; the backend must give -inf."""
    q, k, v, do = _inputs(S=6)
    spec = A.MaskSpec(causal=True, q_index=torch.arange(6), k_index=torch.arange(3, 9))  # rows 0-2 see nothing
    for backend in ("reference", "cpu_flash"):
        out, lse = A.block_forward(q, k, v, scale=0.2, mask=spec, backend=backend)
        assert torch.isinf(lse[:, :, :3]).all() and (lse[:, :, :3] < 0).all(), backend
        assert torch.isfinite(lse[:, :, 3:]).all() and out[:, :3].abs().max() == 0, backend
        dq, _, _ = A.block_backward(do, q, k, v, out, lse, scale=0.2, mask=spec, backend=backend)
        assert torch.isfinite(dq).all() and dq[:, :3].abs().max() == 0, backend


def test_block_backward_with_global_lse_sums_to_full_gradient():
    """Two key blocks with the merged (global) out/lse give gradients that sum to the full ones."""
    q, k, v, do = _inputs(S=8, H=2, Hkv=1)
    out, lse = reference.attention(q, k, v, causal=False)
    dq, dk, dv = reference.attention_backward(do, q, k, v, out, lse, causal=False)
    parts = [A.block_backward(do, q, k[:, s], v[:, s], out, lse, scale=24 ** -0.5,
                              mask=A.MaskSpec(causal=False), backend="cpu_flash")
             for s in (slice(0, 3), slice(3, 8))]
    assert (parts[0][0] + parts[1][0] - dq).abs().max() < 1e-12  # fp64 all the way
    assert (torch.cat([parts[0][1], parts[1][1]], 1) - dk).abs().max() < 1e-12
    assert (torch.cat([parts[0][2], parts[1][2]], 1) - dv).abs().max() < 1e-12


def test_model_facing_attention_and_auto_logs_once(caplog):
    q, k, v, _ = _inputs(S=8)
    A._logged.clear()
    with caplog.at_level(logging.INFO, logger="feixing.ops.attention"):
        a = A.attention(q, k, v, causal=True)
        A.attention(q, k, v, causal=True)
    assert sum("auto -> cpu_flash" in r.message for r in caplog.records) == 1
    b = A.attention(q, k, v, causal=True, backend="reference")
    assert (a - b).abs().max() < 1e-12  # fp64


def test_backend_errors():
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.resolve_backend("flashy", "cpu")
    with pytest.raises(ValueError, match="runs on npu tensors"):
        A.resolve_backend("npu_fusion", "cpu")
    with pytest.raises(ValueError, match="window must be"):
        A.check_window((1, -2))
    q, k, v, _ = _inputs(H=4, Hkv=3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        A.attention(q, k[:, :, :3], v[:, :, :3])


def test_bf16_inputs_stay_close_to_reference():
    q, k, v, do = _inputs(S=16)
    ro, _ = reference.attention(q, k, v, causal=True)
    qs, ks, vs = (x.bfloat16().requires_grad_() for x in (q, k, v))
    out = A.attention(qs, ks, vs, causal=True, backend="cpu_flash")
    out.backward(do.bfloat16())
    assert out.dtype == torch.bfloat16 and qs.grad.dtype == torch.bfloat16
    # bf16 has 8 mantissa bits (eps 7.8e-3) and outputs are O(1): a few eps
    assert (out.double() - ro).abs().max() < 3e-2
