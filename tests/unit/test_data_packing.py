"""Packing: windows of seq_len + 1, labels, per-document positions and ids, document-boundary masking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from feixing.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    num_samples,
    open_dataset,
    pack_window,
)
from feixing.data.prepare import prepare

E = 256  # byte tokenizer eos


def dataset_of(tmp_path, docs: list[str]):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepare([str(path)], str(tmp_path / "out"), "byte", progress=False)
    return open_dataset(str(tmp_path / "out"))


def test_hand_checked_samples(tmp_path):
    # stream: a b c E | d e E | f g h i j E   (13 tokens, 3 documents)
    data = dataset_of(tmp_path, ["abc", "de", "fghij"])
    a, b, c, d, e, f, g, h, i, j = (ord(x) for x in "abcdefghij")
    ds = PackedDataset(data, seq_len=4)
    assert len(ds) == 3  # (13 - 1) // 4
    s0, s1, s2 = ds[0], ds[1], ds[2]
    assert s0["tokens"].tolist() == [a, b, c, E]
    assert s0["labels"].tolist() == [b, c, E, IGNORE_INDEX]  # eos cannot see next doc's "d"
    assert s0["positions"].tolist() == [0, 1, 2, 3]
    assert s0["document_ids"].tolist() == [0, 0, 0, 0]
    assert s1["tokens"].tolist() == [d, e, E, f]
    assert s1["labels"].tolist() == [e, E, IGNORE_INDEX, g]
    assert s1["positions"].tolist() == [0, 1, 2, 0]
    assert s1["document_ids"].tolist() == [0, 0, 0, 1]
    # a document cut by the window start restarts at position 0 (positions stay < seq_len)
    assert s2["tokens"].tolist() == [g, h, i, j]
    assert s2["labels"].tolist() == [h, i, j, E]
    assert s2["positions"].tolist() == [0, 1, 2, 3]
    assert s2["document_ids"].tolist() == [0, 0, 0, 0]
    flat = PackedDataset(data, seq_len=4, document_masking=False)[1]
    assert flat["labels"].tolist() == [e, E, f, g]  # no masking: eos predicts the next doc
    assert flat["positions"].tolist() == [0, 1, 2, 3]
    assert flat["document_ids"].tolist() == [0, 0, 0, 0]
    for s in (s0, s1, s2, flat):
        assert all(v.dtype == np.int64 and v.shape == (4,) for v in s.values())


def reference_pack(stream, starts, w0, n):
    """Loop-by-loop reference for one window with document masking."""

    def doc_of(t):
        return max(k for k, s in enumerate(starts) if s <= t)

    toks, labels, pos, ids = [], [], [], []
    for t in range(w0, w0 + n - 1):
        toks.append(stream[t])
        labels.append(stream[t + 1] if doc_of(t + 1) == doc_of(t) else IGNORE_INDEX)
        pos.append(t - max(starts[doc_of(t)], w0))
        ids.append(doc_of(t) - doc_of(w0))
    return toks, labels, pos, ids


def test_pack_window_matches_loop_reference():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 9, size=40)  # includes 1-token documents (a lone eos)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    stream = rng.integers(0, 256, size=int(lens.sum()))
    for seq_len in (1, 2, 5, 16):
        for i in range(num_samples(len(stream), seq_len)):
            w0 = i * seq_len
            got = pack_window(stream[w0 : w0 + seq_len + 1], w0, starts)
            want = reference_pack(stream.tolist(), starts.tolist(), w0, seq_len + 1)
            assert [got[k].tolist() for k in ("tokens", "labels", "positions", "document_ids")] == [
                *want
            ]
            assert got["positions"].max() < seq_len


def test_every_token_is_a_label_once(tmp_path):
    docs = [chr(97 + k) * (1 + 3 * k % 7) for k in range(12)]
    data = dataset_of(tmp_path, docs)
    stream = data.read(0, data.num_tokens)
    for seq_len in (1, 3, 7):
        flat = PackedDataset(data, seq_len, document_masking=False)
        labels = np.concatenate([flat[i]["labels"] for i in range(len(flat))])
        # windows overlap by one token: the labels are the stream minus its first token
        assert labels.tolist() == stream[1 : 1 + len(labels)].tolist()
        masked = PackedDataset(data, seq_len)
        ignored = sum(int((masked[i]["labels"] == IGNORE_INDEX).sum()) for i in range(len(masked)))
        crossed = sum(1 for s in data.doc_starts[1:] if 1 <= s <= len(labels))
        assert ignored == crossed  # exactly one ignored label per document boundary crossed


def test_seq_len_errors(tmp_path):
    data = dataset_of(tmp_path, ["abc", "de"])  # 7 tokens
    for bad in (0, -3):
        with pytest.raises(ValueError, match=r"data.seq_len=.*cannot hold a token"):
            PackedDataset(data, bad)
    with pytest.raises(
        ValueError, match=r"holds 7 tokens, fewer than one sample.*seq_len \+ 1 = 8"
    ):
        PackedDataset(data, 7)
    assert len(PackedDataset(data, 6)) == 1
    with pytest.raises(IndexError):
        PackedDataset(data, 6)[1]
