"""Tokenizers: byte-level and HF tokenizer.json round trips, eos/bos discovery, every error path."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from feixing.data.tokenizer import build_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Unicode: héllo wörld, 你好, 🚀 emoji.",
    "import os\nimport sys\nprint(sys.argv)\n",
] * 8


def make_bpe(path, special=("<|endoftext|>",), vocab_size=300) -> str:
    """Train a small byte-level BPE on TEXTS and save it as a real tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    tok.save(str(path))
    return str(path)


def test_byte_round_trip_and_specials():
    tok = build_tokenizer("byte")
    assert (tok.name, tok.vocab_size, tok.eos_id, tok.bos_id) == ("byte", 258, 256, 257)
    for text in TEXTS[:4] + ["", "\x00\xff"]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    # special ids are dropped by decode; a cut multi-byte character does not raise
    assert tok.decode([104, 105, tok.eos_id, tok.bos_id]) == "hi"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"


def test_hf_bpe_round_trip(tmp_path):
    path = make_bpe(tmp_path / "tokenizer.json")
    tok = build_tokenizer(path)
    assert tok.eos_id == Tokenizer.from_file(path).token_to_id("<|endoftext|>")
    assert tok.bos_id is None
    assert tok.vocab_size == Tokenizer.from_file(path).get_vocab_size()
    assert tok.name.endswith("tokenizer.json")
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        assert tok.eos_id not in ids  # no special tokens added by encode
        assert len(ids) < len(text.encode())  # BPE merged something: it is not bytes
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("ab") + [tok.eos_id]) == "ab"
    # a folder holding tokenizer.json is accepted too
    assert build_tokenizer(str(tmp_path)).eos_id == tok.eos_id


def test_hf_eos_bos_from_candidates_and_tokenizer_config(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    tok = build_tokenizer(make_bpe(a / "tokenizer.json", special=("<s>", "</s>", "<unk>")))
    raw = Tokenizer.from_file(str(a / "tokenizer.json"))
    assert (tok.eos_id, tok.bos_id) == (raw.token_to_id("</s>"), raw.token_to_id("<s>"))
    # tokenizer_config.json beside the file overrides the name heuristics (chat models use it)
    b = tmp_path / "b"
    b.mkdir()
    make_bpe(b / "tokenizer.json", special=("<|endoftext|>", "<|im_end|>"))
    (b / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    raw = Tokenizer.from_file(str(b / "tokenizer.json"))
    assert build_tokenizer(str(b / "tokenizer.json")).eos_id == raw.token_to_id("<|im_end|>")


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_tokenizer(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text("{ this is not json")
    with pytest.raises(ValueError, match="bad.json.*not a valid HF tokenizer"):
        build_tokenizer(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="wrong.json"):
        build_tokenizer(str(wrong))
    no_eos = make_bpe(tmp_path / "noeos.json", special=("[PAD]",))
    with pytest.raises(ValueError, match="noeos.json.*no end-of-text token"):
        build_tokenizer(no_eos)
    for spec in ("", None):
        with pytest.raises(ValueError, match="data.tokenizer"):
            build_tokenizer(spec)
