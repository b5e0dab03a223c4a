"""rms_norm, swiglu and cross_entropy dispatch: equal to the reference and to PyTorch built-ins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from feixing.ops import reference
from feixing.ops.cross_entropy import cross_entropy
from feixing.ops.rms_norm import rms_norm
from feixing.ops.swiglu import swiglu

torch.set_num_threads(1)
G = torch.Generator().manual_seed(0)


def test_rms_norm_matches_reference_and_builtin():
    x, w = torch.randn(2, 7, 32, generator=G), torch.randn(32, generator=G)
    got = rms_norm(x, w, 1e-5)
    assert torch.equal(got, reference.rms_norm(x, w, 1e-5))
    # Built-in in fp64 is the exact answer; fp32 differs by reduction rounding over 32 values.
    want = F.rms_norm(x.double(), (32,), w.double(), 1e-5).float()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_rms_norm_bf16_keeps_dtype_and_computes_in_fp32():
    x, w = torch.randn(4, 64, generator=G), torch.ones(64)
    got = rms_norm(x.bfloat16(), w.bfloat16(), 1e-6)
    assert got.dtype == torch.bfloat16
    # One bf16 rounding of the fp32 result (8 mantissa bits -> rel. 2^-8).
    torch.testing.assert_close(
        got.float(), rms_norm(x.bfloat16().float(), w, 1e-6), rtol=2**-8, atol=0
    )


def test_swiglu_matches_builtin():
    gate, up = torch.randn(3, 5, 16, generator=G), torch.randn(3, 5, 16, generator=G)
    assert torch.equal(swiglu(gate, up), F.silu(gate) * up)


def test_cross_entropy_sum_and_count_with_ignore_index():
    logits, labels = torch.randn(2, 9, 40, generator=G), torch.randint(0, 40, (2, 9), generator=G)
    labels[0, :3] = -100
    loss_sum, n = cross_entropy(logits, labels)
    assert int(n) == 15
    want = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    # Sum of 15 fp32 terms vs a mean: a few ulps.
    torch.testing.assert_close(loss_sum / n, want, rtol=1e-6, atol=1e-6)
    assert loss_sum.dtype == torch.float32
    bf_sum, _ = cross_entropy(logits.bfloat16(), labels)
    assert bf_sum.dtype == torch.float32


@pytest.mark.parametrize(
    "call",
    [
        lambda: rms_norm(torch.ones(2, 4), torch.ones(4), backend="triton"),
        lambda: swiglu(torch.ones(2), torch.ones(2), backend="triton"),
        lambda: cross_entropy(torch.ones(2, 4), torch.zeros(2, dtype=torch.long), backend="liger"),
    ],
)
def test_unknown_backend_names_the_choices(call):
    with pytest.raises(ValueError, match="auto"):
        call()
