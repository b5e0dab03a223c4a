"""Sampling with a KV cache: greedy equals full recomputation; cached logits equal uncached ones."""

from __future__ import annotations

import pytest
import torch

from feixing.models import get_args
from feixing.models.generate import generate
from feixing.models.llama.model import KVCache, Llama

torch.set_num_threads(1)


def _model(**overrides) -> Llama:
    # O(1)-scale weights so the argmax is decided by clear margins, not by rounding noise.
    model = Llama(get_args("tiny", **overrides))
    model.init_weights(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20.0)
    return model.eval()


def _greedy_without_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": True}])
def test_greedy_with_cache_equals_recompute(overrides):
    model = _model(**overrides)
    prompt = [5, 17, 99, 3, 42]
    got = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    want = _greedy_without_cache(model, prompt, 12)
    assert got == want and len(set(got)) > 1


def test_cached_logits_equal_full_forward():
    model = _model()
    tokens = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.args, 1, 10, torch.float32, "cpu")
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :6], kv_cache=cache)]
        steps += [model(tokens[:, i : i + 1], kv_cache=cache) for i in range(6, 10)]
    assert cache.length == 10
    # Same math; only the softmax reduction length differs per row: fp32 rounding.
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-4)


def test_sampling_is_seeded_and_respects_top_k_and_eos():
    model = _model()
    a = generate(model, [1, 2, 3], 16, temperature=1.0, top_k=5, seed=0)
    assert a == generate(model, [1, 2, 3], 16, temperature=1.0, top_k=5, seed=0)
    assert a != generate(model, [1, 2, 3], 16, temperature=1.0, top_k=5, seed=1)
    one = generate(model, [1, 2, 3], 8, temperature=1.0, top_k=1, seed=4)  # top_k=1 is greedy
    assert one == generate(model, [1, 2, 3], 8, temperature=0.0)
    stop = one[3]
    assert generate(model, [1, 2, 3], 8, temperature=0.0, eos_id=stop) == one[: one.index(stop)]


def test_generate_errors_and_restores_mode():
    model = _model().train()
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [1, 500], 4)
    generate(model, [1], 2)
    assert model.training
    cache = KVCache(model.args, 1, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_greedy_with_cache_equals_recompute():
    model = _model().cuda()
    prompt = [5, 17, 99, 3, 42]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq], device="cuda"))[0, -1].argmax()))
    assert generate(model, prompt, max_new_tokens=12, temperature=0.0) == seq[len(prompt) :]
