"""Zigzag layout math: which global tokens each (ulysses u, ring j) rank holds, shard and unshard.

The sequence of length S is cut into 2R chunks of L = S / (2R) tokens. Ring rank j owns
chunks j and 2R-1-j (so under a causal mask every ring rank has the same amount of work),
and each of those chunks is cut into U pieces of L / U tokens; Ulysses rank u holds piece u
of both. A rank's shard is therefore [chunk j piece u ; chunk 2R-1-j piece u], S / P tokens.
After the Ulysses all-to-all a rank holds, for its head slice, the whole ring slice in the
order [chunk j ; chunk 2R-1-j] (see ulysses.py), which is what `ring_slice_index` returns.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def check_seq_len(seq_len: int, ulysses: int, ring: int, what: str = "sequence length") -> None:
    """The layout needs S divisible by 2 * U * R; raise a ValueError that says so otherwise."""
    p2 = 2 * ulysses * ring
    if seq_len % p2 != 0 or seq_len <= 0:
        raise ValueError(
            f"{what} {seq_len} is not divisible by 2 * cp_degree = 2 * {ulysses} (ulysses) * {ring} "
            f"(ring) = {p2}; pad the sequence (data.seq_len) to a multiple of {p2}")


def chunk_range(chunk: int, seq_len: int, ring: int) -> tuple[int, int]:
    """[start, stop) of zigzag chunk `chunk` (0..2R-1)."""
    n = seq_len // (2 * ring)
    return chunk * n, (chunk + 1) * n


def ring_chunks(j: int, ring: int) -> tuple[int, int]:
    """The two chunks ring rank j owns."""
    return j, 2 * ring - 1 - j


def shard_index(seq_len: int, ulysses: int, ring: int, u: int, j: int, device=None) -> Tensor:
    """Global token indices (S/P,) held by rank (u, j) before the all-to-all, in local order."""
    check_seq_len(seq_len, ulysses, ring)
    piece = seq_len // (2 * ring * ulysses)
    parts = []
    for c in ring_chunks(j, ring):
        start = chunk_range(c, seq_len, ring)[0] + u * piece
        parts.append(torch.arange(start, start + piece, device=device))
    return torch.cat(parts)


def ring_slice_index(seq_len: int, ring: int, j: int, device=None) -> Tensor:
    """Global token indices (S/R,) of ring rank j's slice after the all-to-all: [chunk j; chunk 2R-1-j]."""
    parts = [torch.arange(*chunk_range(c, seq_len, ring), device=device) for c in ring_chunks(j, ring)]
    return torch.cat(parts)


def shard(x: Tensor, seq_dim: int, ulysses: int, ring: int, u: int, j: int) -> Tensor:
    """This rank's part of a full tensor along seq_dim (tokens, positions, doc ids, labels, ...)."""
    seq_dim = seq_dim % x.dim()
    seq_len = x.shape[seq_dim]
    check_seq_len(seq_len, ulysses, ring, what=f"size {seq_len} of dim {seq_dim}")
    piece = seq_len // (2 * ring * ulysses)
    parts = [x.narrow(seq_dim, chunk_range(c, seq_len, ring)[0] + u * piece, piece)
             for c in ring_chunks(j, ring)]
    return torch.cat(parts, dim=seq_dim).contiguous()


def unshard(shards: list[list[Tensor]], seq_dim: int, ulysses: int, ring: int) -> Tensor:
    """Inverse of `shard`: shards[j][u] is rank (u, j)'s part; returns the full tensor."""
    seq_dim = seq_dim % shards[0][0].dim()
    n_local = shards[0][0].shape[seq_dim]
    piece = n_local // 2
    chunks: list[Tensor | None] = [None] * (2 * ring)
    for j in range(ring):
        for half, c in enumerate(ring_chunks(j, ring)):
            chunks[c] = torch.cat([shards[j][u].narrow(seq_dim, half * piece, piece)
                                   for u in range(ulysses)], dim=seq_dim)
    return torch.cat(chunks, dim=seq_dim)


def rank_coords(p: int, ulysses: int, ring: int, ulysses_first: bool) -> tuple[int, int]:
    """(u, j) of group rank p: Ulysses groups on consecutive ranks when ulysses_first."""
    return (p % ulysses, p // ulysses) if ulysses_first else (p // ring, p % ring)
