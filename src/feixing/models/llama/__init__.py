"""The Llama family (Llama 2/3, Qwen2-style): arguments and flavors, model, HF adapter."""

from feixing.models.llama.args import FLAVORS, LlamaArgs, get_args
from feixing.models.llama.model import KVCache, Llama

__all__ = ["FLAVORS", "KVCache", "Llama", "LlamaArgs", "get_args"]
