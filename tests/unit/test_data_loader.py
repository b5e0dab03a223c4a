"""Loader: determinism, epochs as permutations, dp slicing, exact resume and resharding (dp 4 -> 2)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from feixing.config.schema import DataConfig
from feixing.data.loader import build_loader, epoch_permutation
from feixing.data.prepare import prepare
from tests.unit.test_data_tokenizer import make_bpe

torch.set_num_threads(1)
FIELDS = ("tokens", "labels", "positions", "document_ids", "sample_ids")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    docs = [f"document {k}: " + "xyz" * (k % 11) for k in range(60)]
    (root / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepare([str(root / "d.jsonl")], str(root / "data"), "byte", progress=False)
    return str(root / "data")


def cfg(path, **kw):
    base = {"path": path, "tokenizer": "byte", "seq_len": 16, "batch_size": 8}
    return DataConfig(**{**base, "grad_accum_steps": 1, **kw})


def step_ids(loaders) -> list[int]:
    """One optimizer step over all dp ranks: their sample ids in rank, micro-batch order."""
    return [i for ld in loaders for mb in ld.next_batch() for i in mb["sample_ids"].tolist()]


def test_batch_shapes_and_contents(data_dir):
    ld = build_loader(cfg(data_dir, batch_size=8, grad_accum_steps=2), 1, 2, seed=3)
    micro = ld.next_batch()
    assert len(micro) == 2 and ld.micro_batch_size == 2 and ld.local_batch_size == 4
    for mb in micro:
        assert all(mb[k].dtype == torch.long for k in FIELDS)
        assert all(mb[k].shape == (2, 16) for k in FIELDS[:4]) and mb["sample_ids"].shape == (2,)
        for row, sid in enumerate(mb["sample_ids"].tolist()):
            sample = ld.dataset[sid]
            assert all(mb[k][row].tolist() == sample[k].tolist() for k in FIELDS[:4])


def test_deterministic_and_seeded(data_dir):
    a, b = (build_loader(cfg(data_dir), 0, 1, seed=7) for _ in range(2))
    for _ in range(5):
        ma, mb = a.next_batch()[0], b.next_batch()[0]
        assert all(torch.equal(ma[k], mb[k]) for k in FIELDS)
    c = build_loader(cfg(data_dir), 0, 1, seed=8)
    d = build_loader(cfg(data_dir), 0, 1, seed=7)
    assert step_ids([c]) != step_ids([d])


def test_epochs_are_permutations(data_dir):
    ld = build_loader(cfg(data_dir, batch_size=4), 0, 1, seed=0)
    n = ld.num_samples
    stream = [i for _ in range(-(-3 * n // 4)) for i in step_ids([ld])]
    for e in range(3):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))  # each sample once per epoch
    assert stream[:n] != stream[n : 2 * n]  # a fresh order each epoch
    assert ld.epoch == len(stream) // n


def test_permutation_is_pinned():
    # Pinned values: a change here reorders the data of every existing checkpoint on resume.
    assert epoch_permutation(0, 0, 10).tolist() == [7, 4, 8, 2, 0, 9, 3, 1, 5, 6]
    assert epoch_permutation(0, 1, 10).tolist() == [9, 6, 3, 0, 8, 4, 5, 1, 7, 2]
    assert epoch_permutation(1, 0, 10).tolist() == [5, 8, 4, 1, 6, 2, 7, 0, 3, 9]
    big = epoch_permutation(123, 4, 5000)
    assert np.array_equal(np.sort(big), np.arange(5000)) and not np.array_equal(big, np.sort(big))


def test_dp_ranks_split_the_global_batch(data_dir):
    single = build_loader(cfg(data_dir, batch_size=8), 0, 1, seed=1)
    ranks = [
        build_loader(cfg(data_dir, batch_size=8, grad_accum_steps=2), r, 4, seed=1)
        for r in range(4)
    ]
    for _ in range(6):
        assert step_ids(ranks) == step_ids([single])
    assert len({json.dumps(r.state_dict()) for r in ranks}) == 1  # identical state on every rank


def test_exact_resume(data_dir):
    a = build_loader(cfg(data_dir, batch_size=4), 0, 2, seed=5)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip: plain ints
    assert all(type(v) is int for v in state.values()) and state["samples_consumed"] == 28
    b = build_loader(cfg(data_dir, batch_size=4), 0, 2, seed=5)
    b.load_state_dict(state)
    for _ in range(12):  # crosses an epoch boundary
        ma, mb = a.next_batch()[0], b.next_batch()[0]
        assert all(torch.equal(ma[k], mb[k]) for k in FIELDS)
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize(
    ("before", "after"), [((4, 1), (2, 1)), ((4, 2), (2, 1)), ((2, 1), (4, 2))]
)
def test_reshard_neither_repeats_nor_skips(data_dir, before, after):
    (dp0, ga0), (dp1, ga1) = before, after
    total, k = 14, 5  # 14 steps x 8 samples spans more than one epoch
    ref = build_loader(cfg(data_dir), 0, 1, seed=2)
    want = [step_ids([ref]) for _ in range(total)]
    old = [build_loader(cfg(data_dir, grad_accum_steps=ga0), r, dp0, seed=2) for r in range(dp0)]
    got = [step_ids(old) for _ in range(k)]
    state = old[0].state_dict()
    new = [build_loader(cfg(data_dir, grad_accum_steps=ga1), r, dp1, seed=2) for r in range(dp1)]
    for ld in new:
        ld.load_state_dict(state)
    got += [step_ids(new) for _ in range(total - k)]
    assert got == want  # per step, the union over ranks is the uninterrupted stream
    flat = [i for s in got for i in s]
    n = ref.num_samples
    assert sorted(flat[:n]) == list(range(n))  # first epoch: every sample exactly once


def test_loader_errors(data_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"data.batch_size=6 must be .* = 4; use e.g. data.batch_size=4 or 8"
    ):
        build_loader(cfg(data_dir, batch_size=6, grad_accum_steps=2), 0, 2, seed=0)
    with pytest.raises(ValueError, match="dp_rank=2"):
        build_loader(cfg(data_dir), 2, 2, seed=0)
    with pytest.raises(FileNotFoundError, match=r"does not exist; run `feixing prepare INPUT"):
        build_loader(cfg(str(tmp_path / "nowhere")), 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"data.seq_len=0 cannot hold a token"):
        build_loader(cfg(data_dir, seq_len=0), 0, 1, seed=0)
    tj = make_bpe(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="is not the tokenizer"):
        build_loader(cfg(data_dir, tokenizer=tj), 0, 1, seed=0)

    ld = build_loader(cfg(data_dir), 0, 1, seed=0)
    ld.next_batch()
    good = ld.state_dict()
    (tmp_path / "t.txt").write_text("another dataset " * 20)
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "other"), "byte", progress=False)
    other = build_loader(cfg(str(tmp_path / "other")), 0, 1, seed=0)
    with pytest.raises(ValueError, match="belongs to another dataset"):
        other.load_state_dict(good)
    with pytest.raises(ValueError, match="data.seq_len=16"):
        build_loader(cfg(data_dir, seq_len=8), 0, 1, seed=0).load_state_dict(good)
    with pytest.raises(ValueError, match="lacks"):
        ld.load_state_dict({"samples_consumed": 8})
    with pytest.raises(ValueError, match="inconsistent"):
        ld.load_state_dict({**good, "epoch": 3})


def test_saved_seed_wins_with_a_warning(data_dir):
    a = build_loader(cfg(data_dir), 0, 1, seed=11)
    a.next_batch()
    b = build_loader(cfg(data_dir), 0, 1, seed=99)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        b.load_state_dict(a.state_dict())
    assert any("seed 11" in str(x.message) for x in w)
    assert np.array_equal(a.next_batch()[0]["sample_ids"], b.next_batch()[0]["sample_ids"])
