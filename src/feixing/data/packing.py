"""Packing: cut the document stream into fixed samples with labels, position ids and document ids.

The prepared dataset is one stream of tokens in which every document ends with eos. Sample
`i` is the window `stream[i*seq_len : i*seq_len + seq_len + 1]` (consecutive windows share one
token, so every token except the very first is a label exactly once):

    tokens    = window[:-1]           (seq_len inputs)
    labels    = window[1:]            (next token of each input)
    positions = index of each input inside its document, restarting at 0 at every document
                start and at the sample start (a document cut by the window boundary continues
                as a fresh document, so positions always stay < seq_len and RoPE tables of
                length seq_len suffice)
    document_ids = 0 for the first (possibly partial) document of the sample, +1 per new one

With document masking, an input never predicts across a document boundary: the label of the
last token of a document (its eos) would be the first token of the next document, which that
eos cannot see under document masking, so it is IGNORE_INDEX (-100) and adds nothing to the
loss. Without document masking the sample is one causal sequence: positions 0..seq_len-1,
document ids all 0 and every label kept (the classic GPT setup in which eos predicts the next
document's first token).
"""

from __future__ import annotations

import numpy as np

from feixing.data.prepare import TokenData

IGNORE_INDEX = -100
"""Label value the loss skips (matches torch cross_entropy's default ignore_index)."""


def check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len!r} cannot hold a token; set it to an integer >= 1")


def num_samples(num_tokens: int, seq_len: int) -> int:
    """How many full windows of seq_len + 1 tokens (stride seq_len) the stream holds."""
    check_seq_len(seq_len)
    return max((num_tokens - 1) // seq_len, 0)


def pack_window(
    window: np.ndarray,
    window_start: int,
    doc_starts: np.ndarray,
    document_masking: bool = True,
) -> dict[str, np.ndarray]:
    """Turn seq_len + 1 stream tokens starting at global offset `window_start` into one sample.

    `doc_starts` are the sorted global start offsets of all documents. Returns int64 arrays of
    length seq_len: tokens, labels, positions, document_ids.
    """
    n = len(window)
    assert n >= 2, "a window holds seq_len + 1 >= 2 tokens"
    tokens = window[:-1].astype(np.int64)
    labels = window[1:].astype(np.int64)
    if not document_masking:
        return {
            "tokens": tokens,
            "labels": labels,
            "positions": np.arange(n - 1, dtype=np.int64),
            "document_ids": np.zeros(n - 1, dtype=np.int64),
        }
    idx = np.arange(window_start, window_start + n, dtype=np.int64)
    doc = np.searchsorted(doc_starts, idx, side="right") - 1  # global document of each token
    first = np.maximum(doc_starts[np.maximum(doc, 0)], window_start)  # where its doc starts here
    pos = idx - first
    doc_ids = doc - doc[0]
    labels = np.where(doc[1:] != doc[:-1], IGNORE_INDEX, labels)
    return {
        "tokens": tokens,
        "labels": labels,
        "positions": pos[:-1],
        "document_ids": doc_ids[:-1],
    }


class PackedDataset:
    """Fixed-length samples 0..len-1 over a prepared dataset; `self[i]` is a dict of int64 arrays."""

    def __init__(self, data: TokenData, seq_len: int, document_masking: bool = True):
        check_seq_len(seq_len)
        self.data, self.seq_len, self.document_masking = data, seq_len, document_masking
        self.num_samples = num_samples(data.num_tokens, seq_len)
        if self.num_samples == 0:
            raise ValueError(
                f"dataset {data.path!r} holds {data.num_tokens} tokens, fewer than one sample of "
                f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or prepare more text"
            )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        start = i * self.seq_len
        window = self.data.read(start, start + self.seq_len + 1)
        return pack_window(window, start, self.data.doc_starts, self.document_masking)
