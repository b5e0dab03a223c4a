"""TrainState: the step counter, skip bookkeeping and RNG states, saved and restored exactly."""

from __future__ import annotations

import random

import numpy as np
import torch


class TrainState:
    """Everything about the loop itself that a resume must restore (model/optim/data live elsewhere).

    RNG states are identical on every rank (same seed, no rank-dependent randomness), so one copy
    restores all ranks. Stored as plain ints and uint8 tensors: no pickled objects.
    """

    def __init__(self) -> None:
        self.step = 0
        self.consecutive_skips = 0
        self.total_skips = 0

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        return {
            "step": self.step,
            "consecutive_skips": self.consecutive_skips,
            "total_skips": self.total_skips,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_rng_pos": int(np_state[2]),
            "python_rng": torch.tensor(random.getstate()[1], dtype=torch.int64),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.total_skips = int(state["total_skips"])
        torch.set_rng_state(state["torch_rng"].to(torch.uint8))
        keys = state["numpy_rng_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, int(state["numpy_rng_pos"]), 0, 0.0))
        random.setstate((3, tuple(int(x) for x in state["python_rng"].tolist()), None))
