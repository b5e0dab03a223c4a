"""Autoregressive sampling with a KV cache from a single-device Llama-family model."""

from __future__ import annotations

import torch

from feixing.models.llama.model import KVCache, Llama


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator
) -> int:
    """One token id from logits (V,): greedy when temperature <= 0, else top-k softmax sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


@torch.no_grad()
def generate(
    model: Llama,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """The new token ids (prompt not included), stopping before `eos_id` or after max_new_tokens.

    The prompt is processed in one forward (prefill) that fills the KV cache; each further step
    feeds only the newest token. temperature <= 0 means greedy; top_k None/0 disables top-k.
    Sampling uses a CPU generator seeded with `seed`, so results repeat for a given model.
    """
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt (at least one token id)")
    if max_new_tokens <= 0:
        return []
    vocab = model.args.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(
            f"prompt token ids {bad[:5]} are outside the model's vocabulary [0, {vocab})"
        )
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    cache = KVCache(model.args, 1, len(prompt_ids) + max_new_tokens, param.dtype, param.device)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=param.device)
    out: list[int] = []
    try:
        for _ in range(max_new_tokens):
            logits = model(tokens, kv_cache=cache)[0, -1]
            nxt = sample_next(logits, temperature, top_k, gen)
            if eos_id is not None and nxt == eos_id:
                break
            out.append(nxt)
            tokens = torch.tensor([[nxt]], dtype=torch.long, device=param.device)
    finally:
        model.train(was_training)
    return out
