"""Checkpoints that never stall training: async staging, a background writer, atomic commit, resume.

Public API: `Manager` (policy: save, resume, close), `CheckpointError`, `export_hf`.
Names are resolved lazily so the writer process (`python -m feixing.checkpoint.writer`) imports
only the standard library, never torch.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointInvalid", "Manager", "export_hf"]


def __getattr__(name: str):
    if name == "Manager":
        from feixing.checkpoint.manager import Manager
        return Manager
    if name in ("CheckpointError", "CheckpointInvalid"):
        from feixing.checkpoint import commit
        return getattr(commit, name)
    if name == "export_hf":
        from feixing.checkpoint.export import export_hf
        return export_hf
    raise AttributeError(f"module 'feixing.checkpoint' has no attribute {name!r}")
