"""The public ContextParallel object: validate, shard, attend (Ulysses x Ring), gather, positions.

    cp = ContextParallel(ulysses_degree=2, ring_degree=2)      # default group, 4 ranks
    q = cp.shard(q_full, seq_dim=1)                             # (B, S/P, H, D)
    out = cp.attention(q, k, v, causal=True)                    # exact fwd + bwd
    out_full = cp.gather(out, seq_dim=1)

Every check on user input happens before the first collective of a call, and raises a
ValueError that names the problem and the fix; there is no silent fallback to fewer ranks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from feixing.context_parallel import layout
from feixing.context_parallel.accounting import CommCounter
from feixing.context_parallel.hybrid import run_attention
from feixing.context_parallel.ring import RingPlan
from feixing.ops.attention import check_window, resolve_backend

Tensor = torch.Tensor
MODES = ("ring", "allgather")


def _check_degree(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class ContextParallel:
    """Hybrid context parallelism over a group of U * R ranks (Ulysses inside, ring across)."""

    def __init__(self, ulysses_degree: int = 1, ring_degree: int = 1, group=None, mode: str = "ring",
                 ulysses_first: bool = True, backend: str = "auto"):
        self.U = _check_degree("ulysses_degree", ulysses_degree)
        self.R = _check_degree("ring_degree", ring_degree)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (parallel.cp_mode), got {mode!r}")
        self.mode, self.backend, self.ulysses_first = mode, backend, ulysses_first
        self.counter = CommCounter()
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("ContextParallel needs torch.distributed initialised "
                             "(dist.init_process_group) before it is built")
        group = group if group is not None else dist.group.WORLD
        size = dist.get_world_size(group)
        if size != self.U * self.R:
            raise ValueError(
                f"the context-parallel group has {size} ranks but ulysses_degree * ring_degree = "
                f"{self.U} * {self.R} = {self.U * self.R}; set parallel.cp_ulysses_degree and "
                "parallel.cp_ring_degree so that their product is the group size")
        self.u, self.j = layout.rank_coords(dist.get_rank(group), self.U, self.R, ulysses_first)
        self.ulysses_group, self.ring_group = self._subgroups(group)

    def _subgroups(self, group):
        if self.U == 1 or self.R == 1:
            return (group if self.U > 1 else None), (group if self.R > 1 else None)
        ranks = dist.get_process_group_ranks(group)
        coords = [layout.rank_coords(p, self.U, self.R, self.ulysses_first) for p in range(len(ranks))]
        whole = len(ranks) == dist.get_world_size()
        mine_u = mine_r = None
        # Every rank of the world creates every subgroup in the same order (the portable way);
        # for a strict subgroup only its members are here, so they synchronise among themselves.
        for j in range(self.R) if whole else [self.j]:
            g = dist.new_group([ranks[p] for p, c in enumerate(coords) if c[1] == j],
                               use_local_synchronization=not whole)
            mine_u = g if j == self.j else mine_u
        for u in range(self.U) if whole else [self.u]:
            g = dist.new_group([ranks[p] for p, c in enumerate(coords) if c[0] == u],
                               use_local_synchronization=not whole)
            mine_r = g if u == self.u else mine_r
        return mine_u, mine_r

    @classmethod
    def from_mesh(cls, mesh, mode: str = "ring", backend: str = "auto") -> ContextParallel:
        """Build from a DeviceMesh with axes 'cp_ulysses' and 'cp_ring' (either may be size 1)."""
        names = tuple(mesh.mesh_dim_names or ())
        missing = [n for n in ("cp_ulysses", "cp_ring") if n not in names]
        if missing:
            raise ValueError(f"ContextParallel.from_mesh needs mesh axes 'cp_ulysses' and 'cp_ring'; "
                             f"{missing} missing from {names} (build the mesh with ParallelDims)")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (parallel.cp_mode), got {mode!r}")
        self = cls.__new__(cls)
        um, rm = mesh["cp_ulysses"], mesh["cp_ring"]
        self.U, self.R = um.size(), rm.size()
        self.mode, self.backend, self.ulysses_first = mode, backend, True
        self.counter = CommCounter()
        self.u, self.j = um.get_local_rank(), rm.get_local_rank()
        self.ulysses_group = um.get_group() if self.U > 1 else None
        self.ring_group = rm.get_group() if self.R > 1 else None
        return self

    @property
    def degree(self) -> int:
        return self.U * self.R

    # ------------------------------------------------------------------ layout
    def shard(self, x: Tensor, seq_dim: int = 1) -> Tensor:
        """This rank's part of a full tensor (activations, positions, document ids, labels)."""
        return layout.shard(x, seq_dim, self.U, self.R, self.u, self.j)

    def positions(self, seq_len: int, device=None) -> Tensor:
        """Global token indices (S/P,) this rank holds after `shard` (e.g. for RoPE)."""
        return layout.shard_index(seq_len, self.U, self.R, self.u, self.j, device=device)

    def gather(self, x: Tensor, seq_dim: int = 1) -> Tensor:
        """Inverse of shard on every rank (all-gather; its backward sums gradients and slices)."""
        return _Gather.apply(x, seq_dim, self)

    def _gather_raw(self, x: Tensor, seq_dim: int, phase: str) -> Tensor:
        x = x.contiguous()
        rows = [x]
        if self.U > 1:
            rows = [torch.empty_like(x) for _ in range(self.U)]
            self.counter.record("all_gather", phase, x.numel() * x.element_size() * (self.U - 1), "gather_u")
            dist.all_gather(rows, x, group=self.ulysses_group)
        row = torch.stack(rows)  # (U, ...)
        table = [row]
        if self.R > 1:
            table = [torch.empty_like(row) for _ in range(self.R)]
            self.counter.record("all_gather", phase, row.numel() * row.element_size() * (self.R - 1), "gather_r")
            dist.all_gather(table, row, group=self.ring_group)
        return layout.unshard([list(t.unbind(0)) for t in table], seq_dim, self.U, self.R)

    # ------------------------------------------------------------------ attention
    def _check(self, q, k, v, document_ids, window):
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError("cp.attention expects q, k, v shaped (batch, seq/P, heads, head_dim)")
        if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share "
                             "batch, local sequence and head_dim, and k/v must match")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
        b, s, h, _ = q.shape
        hkv, U = k.shape[2], self.U
        if s % 2 != 0:
            raise ValueError(f"local sequence {s} (global {s * self.degree}) is not divisible by 2: the "
                             f"global sequence must be a multiple of 2 * cp_degree = {2 * self.degree}; "
                             "shard full tensors with cp.shard")
        if h % U != 0:
            raise ValueError(f"query heads {h} are not divisible by cp_ulysses_degree {U}; "
                             "choose a Ulysses degree that divides the head count")
        if h % hkv != 0:
            raise ValueError(f"query heads {h} must be a multiple of key/value heads {hkv}")
        if hkv >= U and hkv % U != 0:
            raise ValueError(f"key/value heads {hkv} are not divisible by cp_ulysses_degree {U}")
        if hkv < U and U % hkv != 0:
            raise ValueError(f"cp_ulysses_degree {U} exceeds key/value heads {hkv} but is not a "
                             "multiple of it, so KV heads cannot be replicated evenly")
        if document_ids is not None and (document_ids.shape != (b, s) or document_ids.is_floating_point()):
            raise ValueError(f"document_ids must be integer (batch, seq/P) = {(b, s)}, sharded with "
                             f"cp.shard; got {tuple(document_ids.shape)} {document_ids.dtype}")
        return check_window(window)

    def attention_with_lse(self, q, k, v, *, causal=True, document_ids=None, window=None,
                           softmax_scale=None) -> tuple[Tensor, Tensor]:
        """out (B, S/P, H, D) and lse (B, H, S/P) (fp32, not differentiable) on this rank's shard."""
        return self._attention(q, k, v, causal, document_ids, window, softmax_scale, with_lse=True)

    def attention(self, q, k, v, *, causal=True, document_ids=None, window=None, softmax_scale=None):
        """Exact attention of this rank's shard against the whole sequence: (B, S/P, H, D)."""
        return self._attention(q, k, v, causal, document_ids, window, softmax_scale, with_lse=False)[0]

    # Not traced by torch.compile: collectives, Python planning and autograd Functions that Inductor
    # cannot fuse, whose Python state (ring position, comm log) made a compiled block recompile
    # at nearly every call. A compiled block calls this eagerly and compiles the rest.
    @torch.compiler.disable
    def _attention(self, q, k, v, causal, document_ids, window, softmax_scale, with_lse):
        window = self._check(q, k, v, document_ids, window)
        backend = resolve_backend(self.backend, q.device)
        seq_len = q.shape[1] * self.degree
        docs = None
        if document_ids is not None:  # every rank learns all ids: cheap, and lets rings skip blocks
            docs = self._gather_raw(document_ids, 1, "meta")
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        plan = RingPlan(group=self.ring_group, ring=self.R, j=self.j, seq_len=seq_len, causal=causal,
                        window=window, scale=scale, backend=backend, counter=self.counter, docs=docs,
                        mode=self.mode)
        return run_attention(q, k, v, u=self.U, ulysses_group=self.ulysses_group, plan=plan,
                             with_lse=with_lse)


class _Gather(torch.autograd.Function):
    """x (.., S/P, ..) -> full (.., S, ..) on every rank. Backward: all-reduce the gradient
    over the CP group (Ulysses group, then ring group), then take this rank's shard."""

    @staticmethod
    def forward(ctx, x, seq_dim, cp):
        ctx.cfg = (seq_dim, cp)
        return cp._gather_raw(x, seq_dim, "gather")

    @staticmethod
    def backward(ctx, g):
        seq_dim, cp = ctx.cfg
        g = g.contiguous().clone()
        for grp, n in ((cp.ulysses_group, cp.U), (cp.ring_group, cp.R)):
            if n > 1:
                cp.counter.record("all_reduce", "gather_bwd", 2 * g.numel() * g.element_size() * (n - 1) // n)
                dist.all_reduce(g, group=grp)
        return cp.shard(g, seq_dim), None, None
