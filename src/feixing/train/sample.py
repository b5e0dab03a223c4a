"""Sample text from the latest weights a run wrote (`feixing generate --run DIR`)."""

from __future__ import annotations

from pathlib import Path

import torch

from feixing import config as config_mod
from feixing.data import build_tokenizer


def latest_weights(run_dir: Path) -> Path:
    """The run's newest full-weights folder: `final/` (written when training ends)."""
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no trained weights ({final}/config.json is missing); "
                                "train first, or export a checkpoint with `feixing export`")
    return final


def generate_from_run(run_dir: str, prompt: str, max_new_tokens: int = 200,
                      temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> str:
    """Prompt + sampled continuation, decoded with the run's tokenizer."""
    from feixing.models.generate import generate
    from feixing.models.llama.hf import load_hf

    run = Path(run_dir)
    cfg_path = run / "config.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = config_mod.load(str(cfg_path))
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, _ = load_hf(latest_weights(run))
    ids = generate(model, tokenizer.encode(prompt), max_new_tokens, temperature=temperature,
                   top_k=top_k, seed=seed, eos_id=tokenizer.eos_id)
    return prompt + tokenizer.decode(ids)
