"""feixing: long-context LLM training on PyTorch's distributed engine."""

__version__ = "0.1.0"
