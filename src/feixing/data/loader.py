"""Stateful, deterministic, data-parallel-aware loader whose position resumes exactly on any layout.

The stream: the packed dataset is samples 0..N-1. Epoch e visits them in the order of a
permutation drawn from (seed, e); the epochs are concatenated into one infinite stream, and
`samples_consumed` is the position in it. Optimizer step t takes stream positions
[t*B, (t+1)*B) (B = data.batch_size); data-parallel rank r takes its contiguous slice
[r*B/D, (r+1)*B/D) of that (D = dp degree) and splits it into data.grad_accum_steps
micro-batches, in order.

The position is one global counter, identical on every rank, so a saved state loads on any
dp degree (or batch size) and continues the same stream: no sample repeated or skipped.

Iteration API: `loader.next_batch()` -> list of grad_accum_steps dicts, one per micro-batch,
each holding LongTensors of shape (micro_batch, seq_len): tokens, labels, positions,
document_ids, and shape (micro_batch,): sample_ids (the dataset indices, for tests and logs).
"""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import torch

from feixing.data.packing import PackedDataset, open_dataset

_STATE_KEYS = ("samples_consumed", "epoch", "seed", "fingerprint", "seq_len", "num_samples")
_FIELDS = ("tokens", "labels", "positions", "document_ids")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 that scrambles every bit."""
    x = x.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of samples 0..n-1 in `epoch`: argsort of a keyed 64-bit hash of each index.

    Defined here rather than by numpy's Generator, whose streams numpy does not promise to
    keep across versions: a checkpoint must resume to the same order after an upgrade. The
    hash is a bijection of i ^ key, so keys never tie and the order is fully determined.
    """
    gold = 0x9E3779B97F4A7C15  # splitmix64's increment; separates seed and epoch
    key = _mix64(np.array([(seed * gold + epoch) % (1 << 64)], dtype=np.uint64))
    key = _mix64(key + np.uint64(gold))[0]
    return np.argsort(_mix64(np.arange(n, dtype=np.uint64) ^ key), kind="stable")


class Loader:
    """Hands each data-parallel rank its micro-batches of the global stream; see the module doc."""

    def __init__(
        self,
        dataset: PackedDataset,
        *,
        batch_size: int,
        grad_accum_steps: int,
        dp_rank: int,
        dp_degree: int,
        seed: int,
    ):
        if dp_degree < 1 or not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_degree={dp_degree})")
        if grad_accum_steps < 1:
            raise ValueError(f"data.grad_accum_steps={grad_accum_steps} must be >= 1")
        split = dp_degree * grad_accum_steps
        if batch_size < 1 or batch_size % split:
            lo = max(batch_size // split, 1) * split
            raise ValueError(
                f"data.batch_size={batch_size} must be a positive multiple of dp degree "
                f"({dp_degree}) x data.grad_accum_steps ({grad_accum_steps}) = {split}; "
                f"use e.g. data.batch_size={lo} or {lo + split}, or change data.grad_accum_steps"
            )
        self.dataset = dataset
        self.batch_size, self.grad_accum_steps = batch_size, grad_accum_steps
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.seed = seed
        self.samples_consumed = 0
        self._perms: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ geometry
    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.dp_degree

    @property
    def micro_batch_size(self) -> int:
        return self.local_batch_size // self.grad_accum_steps

    @property
    def epoch(self) -> int:
        return self.samples_consumed // self.num_samples

    @property
    def fingerprint(self) -> int:
        return self.dataset.data.fingerprint

    @property
    def meta(self) -> dict:
        """The dataset's meta.json (tokenizer, vocab_size, eos_id, counts)."""
        return self.dataset.data.meta

    # ------------------------------------------------------------------ order
    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # Keep at most the two epochs a batch can straddle: memory stays O(N).
            for e in [e for e in self._perms if e < epoch - 1]:
                del self._perms[e]
            self._perms[epoch] = epoch_permutation(self.seed, epoch, self.num_samples)
        return self._perms[epoch]

    def stream_sample_ids(self, start: int, count: int) -> np.ndarray:
        """Dataset indices at stream positions [start, start + count)."""
        pos = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        epochs = pos // self.num_samples
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[pos[sel] % self.num_samples]
        return out

    # ------------------------------------------------------------------ iteration
    def next_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step; advances the global position."""
        local = self.local_batch_size
        ids = self.stream_sample_ids(self.samples_consumed + self.dp_rank * local, local)
        micro = []
        mb = self.micro_batch_size
        for k in range(self.grad_accum_steps):
            chunk = ids[k * mb : (k + 1) * mb]
            samples = [self.dataset[int(i)] for i in chunk]
            batch = {f: torch.from_numpy(np.stack([s[f] for s in samples])) for f in _FIELDS}
            batch["sample_ids"] = torch.from_numpy(chunk.copy())
            micro.append(batch)
        self.samples_consumed += self.batch_size
        return micro

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, int]:
        """Small dict of ints, the same on every rank; enough to resume on any dp degree."""
        return {
            "samples_consumed": int(self.samples_consumed),
            "epoch": int(self.epoch),
            "seed": int(self.seed),
            "fingerprint": int(self.fingerprint),
            "seq_len": int(self.dataset.seq_len),
            "num_samples": int(self.num_samples),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved stream exactly. The saved seed wins (it defines the stream)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(
                f"data-loader state lacks {missing}; it was not written by Loader.state_dict()"
            )
        state = {k: int(state[k]) for k in _STATE_KEYS}  # accept tensors/np ints from a checkpoint
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"the checkpoint's data-loader state belongs to another dataset (fingerprint "
                f"{state['fingerprint']} != {self.fingerprint} of {self.dataset.data.path!r}); resume "
                "with the data.path (and tokenizer) the run was started with, or start a new run"
            )
        if state["seq_len"] != self.dataset.seq_len or state["num_samples"] != self.num_samples:
            raise ValueError(
                f"the checkpoint's data-loader state was saved with data.seq_len={state['seq_len']} "
                f"({state['num_samples']} samples), this run has data.seq_len={self.dataset.seq_len} "
                f"({self.num_samples} samples); set data.seq_len={state['seq_len']} to resume"
            )
        if (
            state["samples_consumed"] < 0
            or state["epoch"] != state["samples_consumed"] // self.num_samples
        ):
            raise ValueError(f"data-loader state is inconsistent: {state}")
        if state["seed"] != self.seed:
            warnings.warn(
                f"data-loader state was saved with seed {state['seed']}, this run has seed "
                f"{self.seed}; continuing the saved stream (seed {state['seed']})",
                stacklevel=2,
            )
            self.seed = state["seed"]
            self._perms.clear()
        self.samples_consumed = state["samples_consumed"]


def _tokenizer_fingerprint(spec: str) -> str:
    if spec == "byte":
        return "byte"
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file {path!r} (data.tokenizer) does not exist; "
            "set data.tokenizer to 'byte' or a HF tokenizer.json"
        )
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build_loader(cfg, dp_rank: int, dp_degree: int, seed: int) -> Loader:
    """Open cfg.path (a DataConfig), check it matches cfg.tokenizer, and build this rank's Loader."""
    data = open_dataset(cfg.path)
    if _tokenizer_fingerprint(cfg.tokenizer) != data.meta["tokenizer_fingerprint"]:
        raise ValueError(
            f"data.tokenizer={cfg.tokenizer!r} is not the tokenizer {data.path!r} was prepared with "
            f"({data.meta['tokenizer']!r}); set data.tokenizer={data.meta['tokenizer']!r} or re-prepare "
            f"with `feixing prepare INPUT... --out {cfg.path} --tokenizer {cfg.tokenizer}`"
        )
    dataset = PackedDataset(data, cfg.seq_len, cfg.document_masking)
    return Loader(
        dataset,
        batch_size=cfg.batch_size,
        grad_accum_steps=cfg.grad_accum_steps,
        dp_rank=dp_rank,
        dp_degree=dp_degree,
        seed=seed,
    )
