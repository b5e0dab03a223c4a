"""The Llama model: flavors, meta build, deterministic init, forward semantics, attention hook."""

from __future__ import annotations

import pytest
import torch

from feixing.config.schema import ModelConfig
from feixing.models import build, get_args, round_vocab
from feixing.models.llama.args import FLAVORS
from feixing.models.llama.model import Llama
from feixing.ops.attention import attention

torch.set_num_threads(1)


def _tiny(seed: int = 0, **overrides) -> Llama:
    with torch.device("meta"):
        model = Llama(get_args("tiny", **overrides))
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


def _tokens(b=2, s=16, v=128, seed=0):
    return torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_flavor_builds_on_meta_and_counts_params(flavor):
    args = get_args(flavor)
    with torch.device("meta"):
        model = Llama(args)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    assert len(model.layers) == args.n_layers


def test_published_sizes():
    # Parameter counts from the model cards (billions, rounded as published).
    for flavor, billions in {
        "1b": 1.24,
        "8b": 8.03,
        "70b": 70.6,
        "qwen2-0.5b": 0.49,
        "qwen2-7b": 7.6,
        "llama2-7b": 6.74,
    }.items():
        assert get_args(flavor).num_params() / 1e9 == pytest.approx(billions, rel=0.01), flavor


def test_demo_fits_context_parallel_degrees():
    a = get_args("demo")
    assert a.n_heads % 4 == 0 and a.n_heads % 2 == 0 and a.n_kv_heads % 2 == 0


def test_flops_per_token_formula():
    a = get_args("tiny")
    n = a.num_params(embedding=False)  # untied: the output head is already in n
    assert a.num_flops_per_token(256) == 6 * n + 12 * a.n_layers * a.n_heads * a.head_dim * 256
    tied = get_args("tiny", tie_embeddings=True)
    # Tied: the head's matmul still costs FLOPs, so the count matches the untied model.
    assert tied.num_flops_per_token(256) == a.num_flops_per_token(256)
    assert _tiny().num_flops_per_token(64) == a.num_flops_per_token(64)


def test_build_uses_tokenizer_vocab_rounded_and_meta():
    model = build(ModelConfig(flavor="tiny"), vocab_size=259)
    assert model.args.vocab_size == round_vocab(259) == 320
    assert model.tok_embeddings.weight.is_meta
    assert build(ModelConfig(flavor="tiny", vocab_size=100), vocab_size=259).args.vocab_size == 100
    assert build(ModelConfig(flavor="tiny", max_seq_len=999)).args.max_seq_len == 999
    with pytest.raises(ValueError, match="model.flavor"):
        build(ModelConfig(flavor="13b"))
    with pytest.raises(ValueError, match="model.family"):
        build(ModelConfig(family="mamba"))


def test_init_is_deterministic_and_seeded():
    a, b, c = _tiny(0), _tiny(0), _tiny(1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    w = a.layers["0"].attention.wq.weight
    assert (
        0.015 < w.std() < 0.025 and w.abs().max() <= 3 * 0.02 + 1e-6
    )  # N(0, 0.02) truncated at 3 sigma
    assert (
        a.layers["1"].attention.wo.weight.std() < 0.5 * w.std()
    )  # residual projections scaled down
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))


def test_init_ignores_wrappers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    with torch.device("meta"):
        wrapped = Llama(get_args("tiny"))
    for key in list(wrapped.layers):
        wrapped.layers[key] = checkpoint_wrapper(wrapped.layers[key])
    wrapped.to_empty(device="cpu")
    wrapped.init_weights(0)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    plain = dict(_tiny(0).named_parameters())
    for name, p in wrapped.named_parameters():
        assert torch.equal(p, plain[name.replace("_checkpoint_wrapped_module.", "")]), name


def test_init_on_meta_raises_clear_error():
    with torch.device("meta"):
        model = Llama(get_args("tiny"))
    with pytest.raises(RuntimeError, match="to_empty"):
        model.init_weights(0)


def test_forward_shape_default_positions_and_grads():
    model = _tiny()
    tokens = _tokens()
    logits = model(tokens)
    assert logits.shape == (2, 16, 128) and logits.dtype == torch.float32
    assert torch.equal(logits, model(tokens, positions=torch.arange(16).expand(2, 16)))
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_causal():
    model = _tiny()
    tokens = _tokens(1, 12)
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 128
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)  # the past never sees the future
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_packed_documents_equal_separate_sequences():
    model = _tiny()
    a, b = _tokens(1, 7, seed=1), _tokens(1, 9, seed=2)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    doc = torch.cat([torch.zeros(7), torch.ones(9)]).long().unsqueeze(0)
    with torch.no_grad():
        got = model(packed, positions=pos, document_ids=doc)
        want = torch.cat([model(a), model(b)], 1)
    # Same math, different reduction lengths inside the masked softmax: fp32 rounding only.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_core_is_replaceable():
    model = _tiny()
    tokens = _tokens()
    want = model(tokens)
    calls = []

    def core(q, k, v, *, causal, document_ids, window, softmax_scale):
        calls.append((q.shape, k.shape, causal, window, softmax_scale))
        return attention(
            q,
            k,
            v,
            causal=causal,
            document_ids=document_ids,
            window=window,
            softmax_scale=softmax_scale,
        )

    for block in model.layers.values():
        block.attention.core = core
    torch.testing.assert_close(model(tokens), want, rtol=0, atol=0)
    assert calls == [((2, 16, 4, 16), (2, 16, 2, 16), True, None, None)] * 2


def test_tied_embeddings_share_one_matrix():
    model = _tiny(tie_embeddings=True)
    assert model.output is None and "output.weight" not in model.state_dict()
    tokens = _tokens()
    before = model(tokens).detach()
    with torch.no_grad():
        model.tok_embeddings.weight[5] += 1.0  # changes both the input row and the output row 5
        after = model(tokens)
    assert not torch.allclose(after[..., 5], before[..., 5])


def test_qkv_bias_present_only_when_asked():
    assert _tiny().layers["0"].attention.wq.bias is None
    m = _tiny(qkv_bias=True)
    att = m.layers["0"].attention
    assert att.wq.bias is not None and att.wk.bias is not None and att.wo.bias is None
    assert torch.equal(att.wq.bias, torch.zeros_like(att.wq.bias))


def test_bf16_forward():
    model = _tiny().to(torch.bfloat16)
    logits = model(_tokens())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="n_kv_heads"):
        get_args("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="even"):
        get_args("tiny", head_dim=15)
    with pytest.raises(ValueError, match="head_dim"):
        get_args("tiny", dim=66, n_heads=4, head_dim=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_meta_init_and_bf16_forward_match_fp32():
    with torch.device("meta"):
        a, b = Llama(get_args("tiny")), Llama(get_args("tiny"))
    for m in (a, b):
        m.to_empty(device="cuda")
        m.init_weights(0)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    tokens = _tokens().cuda()
    with torch.no_grad():
        want = a(tokens)
        got = a.to(torch.bfloat16)(tokens).float()
    # bf16 weights and activations through 2 layers: ~1e-2 relative; logits here are O(0.1).
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
