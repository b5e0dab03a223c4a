"""`feixing export --checkpoint DIR --to hf OUT`: a verified checkpoint -> a HF safetensors folder.

One process, no process group: the model's shards from every saved rank are assembled into full
tensors (the same chunk reader that reshards on resume), then the model helper writes
config.json + model.safetensors that transformers loads.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from feixing.checkpoint import commit as C
from feixing.checkpoint.load import Reader

_TORCH_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def _config_of(manifest: dict, folder: str):
    from feixing.config.load import load

    text = manifest.get("resolved_config") or ""
    if not text.strip():
        raise C.CheckpointError(f"{folder}: the manifest has no resolved config; cannot tell the "
                                "model architecture to export")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return load(f.name)
    finally:
        os.unlink(f.name)


def model_state_dict(folder: str, verify_checksums: bool = True) -> tuple[dict, dict]:
    """Full (unsharded) model tensors of a checkpoint, keyed by parameter name, and its manifest."""
    manifest = C.verify(folder, verify_checksums)
    reader = Reader(folder, manifest)
    skeleton = reader.sharded_skeleton()
    keys = [k for k, v in skeleton.items() if not (isinstance(v, dict) and "param_groups" in v)]
    if len(keys) != 1:
        raise C.CheckpointError(f"{folder}: expected one model in the checkpoint, found {keys}")
    prefix = keys[0] + "/"
    dtypes = {}
    for index in reader.indices:
        for path, c in index["chunks"].items():
            dtypes[path] = c["dtype"]
    sd = {}
    for path, shape in reader.global_shapes.items():
        if path.startswith(prefix):
            t = torch.empty(shape, dtype=_TORCH_DTYPES.get(dtypes[path], torch.float32))
            reader.fill(path, t)
            sd[path[len(prefix):]] = t
    reader.close()
    return sd, manifest


def export_hf(checkpoint_dir: str, out_dir: str, dtype: torch.dtype | None = None) -> Path:
    """Write `out_dir/config.json` + `model.safetensors` for the checkpoint in `checkpoint_dir`.

    `checkpoint_dir` is a `step-NNNNNNNN` folder or a run's `checkpoints/` folder (newest valid).
    """
    from feixing.models import resolve_args
    from feixing.models.llama.hf import export_hf as write_hf

    folder = checkpoint_dir
    if not os.path.isfile(os.path.join(folder, C.MANIFEST)):
        found = C.list_committed(folder) or C.list_committed(os.path.join(folder, "checkpoints"))
        if not found:
            raise C.CheckpointError(f"{checkpoint_dir}: not a checkpoint (no {C.MANIFEST}) and no "
                                    "step-* checkpoints inside")
        folder = found[0][1]
    sd, manifest = model_state_dict(folder)
    cfg = _config_of(manifest, folder)
    args = resolve_args(cfg.model)
    emb = next((t for k, t in sd.items() if k.endswith("tok_embeddings.weight")), None)
    if emb is not None and emb.shape[0] != args.vocab_size:
        args = replace(args, vocab_size=emb.shape[0])  # the tokenizer decided it at train time
    return write_hf(sd, args, out_dir, dtype=dtype)
