"""Tokenizers: a byte-level one that needs no files, and HF `tokenizer.json` files via `tokenizers`."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

BYTE_EOS_ID = 256
BYTE_BOS_ID = 257
BYTE_VOCAB_SIZE = 258

# Names that mark end-of-text in common tokenizer families, most specific first
# (GPT-2/Qwen, Llama 3, Llama 2/Mistral, Gemma). Used only when no tokenizer_config.json
# next to the file names the eos token.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[BOS]")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 is end-of-text, 257 is begin-of-text."""

    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID
    bos_id = BYTE_BOS_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # Special ids are dropped so decode(encode(s)) == s; bytes cut mid-character (e.g. a
        # sampled prefix) decode with U+FFFD instead of raising.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"


@dataclass
class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a tokenizer.json, with its eos/bos ids resolved."""

    name: str
    path: str
    _tok: object
    vocab_size: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: prepare appends eos itself, and a post-processor that adds
        # bos/eos per call would double them.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()


def _config_token(folder: str, key: str) -> str | None:
    """The `key` token (eos_token/bos_token) named by tokenizer_config.json beside the file."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get(key)
    except (OSError, ValueError):
        return None
    if isinstance(value, dict):  # older configs store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_hf(spec: str) -> HFTokenizer:
    from tokenizers import Tokenizer

    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file {path!r} does not exist; set data.tokenizer to 'byte' or to the "
            "path of a HF tokenizer.json (or a folder holding one)"
        )
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception for parse errors
        raise ValueError(
            f"tokenizer file {path!r} is not a valid HF tokenizer.json ({e}); point "
            "data.tokenizer at the tokenizer.json of a HF model, or use 'byte'"
        ) from None

    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    folder = os.path.dirname(os.path.abspath(path))

    def find(key: str, candidates: tuple[str, ...]) -> int | None:
        named = _config_token(folder, key)
        if named is not None and tok.token_to_id(named) is not None:
            return tok.token_to_id(named)
        for c in candidates:
            if c in specials:
                return specials[c]
        return None

    eos = find("eos_token", _EOS_CANDIDATES)
    if eos is None:
        raise ValueError(
            f"tokenizer file {path!r} has no end-of-text token: none of {list(_EOS_CANDIDATES)} "
            f"is among its special tokens {sorted(specials)} and no tokenizer_config.json beside it "
            "names eos_token; add one (feixing ends every document with it)"
        )
    return HFTokenizer(
        name=os.path.abspath(path),
        path=os.path.abspath(path),
        _tok=tok,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_id=eos,
        bos_id=find("bos_token", _BOS_CANDIDATES),
    )


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """`"byte"` -> ByteTokenizer; otherwise the path of a tokenizer.json (or its folder)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"data.tokenizer={spec!r}: expected 'byte' or the path of a HF tokenizer.json"
        )
    if spec == "byte":
        return ByteTokenizer()
    return _load_hf(spec)
