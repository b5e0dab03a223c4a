"""Packing: read prepared shards as one token stream and cut it into samples with labels and ids.

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

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from feixing.data.prepare import FORMAT_VERSION, META_FILE, prepare_hint

IGNORE_INDEX = -100
"""Label value the loss skips (matches torch cross_entropy's default ignore_index)."""


@dataclass
class TokenData:
    """A prepared dataset opened read-only: one logical token stream over all shards."""

    path: str
    meta: dict
    shards: list[np.ndarray]
    shard_offsets: np.ndarray  # global token offset of each shard, len n_shards + 1
    doc_starts: np.ndarray  # global start of every document (int64), sorted
    fingerprint: int  # identifies the token content; < 2**62 so it fits any int64 state

    @property
    def num_tokens(self) -> int:
        return int(self.shard_offsets[-1])

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the global stream as int64 (may span shards)."""
        out = np.empty(end - start, dtype=np.int64)
        s = int(np.searchsorted(self.shard_offsets, start, side="right")) - 1
        pos = start
        while pos < end:
            lo = pos - int(self.shard_offsets[s])
            hi = min(end, int(self.shard_offsets[s + 1])) - int(self.shard_offsets[s])
            out[pos - start : pos - start + hi - lo] = self.shards[s][lo:hi]
            pos += hi - lo
            s += 1
        return out


def open_dataset(path: str) -> TokenData:
    """Open a folder written by `prepare`; clear errors for missing, incomplete or corrupt data."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"data folder {path!r} (data.path) does not exist; {prepare_hint(path)}"
        )
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"data folder {path!r} has no {META_FILE}: it is not a complete feixing dataset; {prepare_hint(path)}"
        )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); {prepare_hint(path)}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format_version {meta.get('format_version')}, "
            f"this feixing reads {FORMAT_VERSION}; {prepare_hint(path)}"
        )
    dtype = np.dtype(meta["dtype"])
    shards, starts, offsets = [], [], [0]
    for i, n in enumerate(meta["shard_tokens"]):
        tpath = os.path.join(path, f"tokens-{i:05d}.bin")
        dpath = os.path.join(path, f"docs-{i:05d}.npy")
        if not os.path.isfile(tpath) or os.path.getsize(tpath) != n * dtype.itemsize:
            raise ValueError(
                f"shard {tpath} is missing or has the wrong size (expected {n} tokens); {prepare_hint(path)}"
            )
        try:
            d = np.load(dpath, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"document index {dpath} is missing or unreadable ({e}); {prepare_hint(path)}"
            ) from None
        if d.ndim != 1 or len(d) < 2 or d[0] != 0 or d[-1] != n or np.any(np.diff(d) <= 0):
            raise ValueError(
                f"document index {dpath} does not match its shard; {prepare_hint(path)}"
            )
        shards.append(np.memmap(tpath, dtype=dtype, mode="r", shape=(n,)))
        starts.append(d[:-1].astype(np.int64) + offsets[-1])
        offsets.append(offsets[-1] + n)
    fp = hashlib.sha256(f"{meta['content_sha256']}:{meta['num_tokens']}:{meta['dtype']}".encode())
    return TokenData(
        path=path,
        meta=meta,
        shards=shards,
        shard_offsets=np.asarray(offsets, dtype=np.int64),
        doc_starts=np.concatenate(starts),
        fingerprint=int.from_bytes(fp.digest()[:8], "little") >> 2,
    )


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
