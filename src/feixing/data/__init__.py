"""Data: tokenizers, text -> token shards (`prepare`), packing into samples, the stateful loader."""

from feixing.data.loader import Loader, build_loader
from feixing.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    TokenData,
    open_dataset,
    pack_window,
)
from feixing.data.prepare import DEMO_MAX_BYTES, demo_corpus_paths, prepare
from feixing.data.tokenizer import build_tokenizer

__all__ = [
    "DEMO_MAX_BYTES",
    "IGNORE_INDEX",
    "Loader",
    "PackedDataset",
    "TokenData",
    "build_loader",
    "build_tokenizer",
    "demo_corpus_paths",
    "open_dataset",
    "pack_window",
    "prepare",
]
