"""How much faster is generation with the KV cache than recomputing the whole sequence per token?

Greedy decoding of the `demo` model (random init) from prompts of several lengths, with
`feixing.models.generate.generate` (KV cache) and with the baseline that runs the full sequence
through the model for every new token, in the same run; both must produce the same tokens. Also
times one training step (forward + backward + AdamW) of the demo model for reference.

    PYTHONPATH=src .venv/bin/python benchmarks/generate_kv_cache.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from feixing.models import get_args
from feixing.models.generate import generate
from feixing.models.llama.model import Llama
from feixing.ops.cross_entropy import cross_entropy


def _recompute(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavor", default="demo")
    ap.add_argument("--cases", default="32:128,480:32", help="prompt_len:new_tokens,...")
    ap.add_argument("--out", default="benchmarks/results/generate_kv_cache.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = Llama(get_args(a.flavor))
    model.init_weights(0)
    model.eval()
    rows = []
    for case in a.cases.split(","):
        p, n = (int(x) for x in case.split(":"))
        prompt = [(7 * i) % 250 + 1 for i in range(p)]
        t = time.perf_counter()
        cached = generate(model, prompt, n, temperature=0.0)
        t_cache = time.perf_counter() - t
        t = time.perf_counter()
        full = _recompute(model, prompt, n)
        t_full = time.perf_counter() - t
        assert cached == full, "KV-cache generation differs from recomputation"
        rows.append(
            {
                "prompt": p,
                "new_tokens": n,
                "kv_cache_s": t_cache,
                "recompute_s": t_full,
                "kv_tokens_per_s": n / t_cache,
                "speedup": t_full / t_cache,
            }
        )
    model.train()
    x = torch.randint(
        0, model.args.vocab_size, (2, 257), generator=torch.Generator().manual_seed(0)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(13):
        t = time.perf_counter()
        loss_sum, n_tok = cross_entropy(model(x[:, :-1]), x[:, 1:])
        (loss_sum / n_tok).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    step = statistics.median(times[3:])
    print("| prompt | new tokens | KV cache s | recompute s | KV tokens/s | speedup |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['prompt']} | {r['new_tokens']} | {r['kv_cache_s']:.2f} | {r['recompute_s']:.2f} "
            f"| {r['kv_tokens_per_s']:.0f} | {r['speedup']:.1f}x |"
        )
    print(
        f"\n{a.flavor} train step (batch 2 x 256, 1 thread): median {step * 1e3:.0f} ms, "
        f"{512 / step:.0f} tokens/s, {model.num_flops_per_token(256):,} FLOPs/token"
    )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"flavor": a.flavor, "generate": rows, "train_step_s": step}, f, indent=2)


if __name__ == "__main__":
    main()
