"""CUDA: attention backend and model parity against the reference (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from feixing.ops import reference
from feixing.ops.attention import attention_with_lse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = {
    "causal": dict(causal=True),
    "full": dict(causal=False),
    "window": dict(causal=True, window=(64, 0)),
    "documents": dict(causal=True, docs=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_attention_matches_reference(case, dtype):
    spec = dict(CASES[case])
    docs = spec.pop("docs", False)
    g = torch.Generator(device="cuda").manual_seed(0)
    B, S, H, Hkv, D = 2, 512, 8, 2, 64
    q, k, v = (torch.randn(B, S, h, D, device="cuda", generator=g, dtype=dtype).requires_grad_()
               for h in (H, Hkv, Hkv))
    doc = (torch.arange(S, device="cuda") * 3 // S).expand(B, S).contiguous() if docs else None
    out, lse = attention_with_lse(q, k, v, document_ids=doc, backend="cuda", **spec)
    dout = torch.randn_like(out)
    out.backward(dout)
    grads = [t.grad.float() for t in (q, k, v)]
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.attention(qf, kf, vf, q_doc=doc, k_doc=doc,
                                           **{"window": spec.get("window", (-1, -1)),
                                              "causal": spec["causal"]})
    ref_out.backward(dout.float())
    # fp32 may run on TF32 tensor cores (10-bit mantissa); bf16 has an 8-bit mantissa.
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    for got, t in zip(grads, (qf, kf, vf)):
        torch.testing.assert_close(got, t.grad, atol=5 * tol, rtol=5 * tol)
