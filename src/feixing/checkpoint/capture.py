"""What a save gathers from the live training state, and a cache that makes every save after the first cheap.

A save's capture runs while the loop waits. Its expensive part is torch's `get_state_dict`,
which walks the model and optimizer to name every tensor (~15-20 ms for a 1B Llama with AdamW
state on the 2-core VM, most of the capture). Between two saves of a run those names, the
tensors' storages and each DTensor shard's place do not change: the optimizer updates
parameters and moments in place. So the first capture is done in full and remembered; later
captures check a fingerprint of the live state (every parameter's, buffer's and optimizer state
tensor's storage address and shape, the parameter groups' structure) and, if it is unchanged,
reuse the remembered tensors, re-reading only what can change without a tensor changing: the
optimizer's parameter groups (learning rate, ...) and the non-model state (data loader, RNG,
train state). Anything else (a resume, a new optimizer state, parameters replaced) changes the
fingerprint and the next capture is done in full again. The first cached capture of a run is
also checked against a full one; a difference turns the cache off for the run, with a warning.

The remembered views keep the storages they alias alive, so the allocator cannot hand a freed
address to a new tensor while the fingerprint still names it.
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from feixing.checkpoint.load import LOCAL, SHARDED, chunk_of
from feixing.checkpoint.stage import encode

log = logging.getLogger(__name__)


def split(app_state: dict):
    """(model key, optimizer key, other keys) of `app_state`; at most one of each of the first two."""
    modules = [k for k, v in app_state.items() if isinstance(v, torch.nn.Module)]
    optims = [k for k, v in app_state.items() if isinstance(v, torch.optim.Optimizer)]
    if len(modules) > 1 or (optims and not modules):
        raise ValueError(f"checkpoint app_state needs exactly one nn.Module for its optimizers; "
                         f"got modules {modules} and optimizers {optims}")
    if len(optims) > 1:
        raise ValueError(f"checkpoint app_state: one optimizer supported, got {optims}")
    others = [k for k in app_state if k not in modules and k not in optims]
    return (modules[0] if modules else None), (optims[0] if optims else None), others


def sharded_state(app_state: dict) -> dict:
    """{model key: model state dict, optimizer key: optimizer state dict} as torch names them."""
    mkey, okey, _ = split(app_state)
    if mkey is None:
        return {}
    model = app_state[mkey]
    if okey is None:
        msd, _ = get_state_dict(model, [])
        return {mkey: msd}
    msd, osd = get_state_dict(model, [app_state[okey]])
    return {mkey: msd, okey: osd}


def _where(t) -> tuple:
    local = t._local_tensor if isinstance(t, DTensor) else t
    return local.data_ptr(), tuple(local.shape)


def fingerprint(app_state: dict) -> tuple:
    """Changes whenever a tensor the model or optimizer state holds is replaced, added or removed."""
    mkey, okey, _ = split(app_state)
    fp: list = []
    if mkey is not None:
        model = app_state[mkey]
        fp += [_where(p) for p in model.parameters()]
        fp += [_where(b) for b in model.buffers()]
    if okey is not None:
        opt = app_state[okey]
        for g in opt.param_groups:
            fp.append(len(g["params"]))
            for p in g["params"]:
                fp.append(id(p))
                for k, v in opt.state.get(p, {}).items():
                    fp += [k, _where(v) if isinstance(v, torch.Tensor) else type(v)]
    return tuple(fp)


def _param_groups(opt, names: list) -> list:
    """The optimizer's parameter groups as `get_state_dict` gives them: `params` as the names."""
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": n} for g, n in zip(opt.param_groups, names)]


class Capture:
    """`capture(app_state, step) -> (index, sources)`: the rank's index (the JSON skeleton of the
    state, chunk places) and {buffer key: tensor to stage}. `full` and `cached` count captures."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.full = self.cached = 0
        self._memo = None  # (fingerprint, sharded skeleton, chunks, sharded sources, pg names)
        self._checked = False
        self.enabled = True

    def forget(self) -> None:
        """Drop the remembered tensors (before a load replaces the state they alias)."""
        self._memo = None

    def __call__(self, app_state: dict, step: int):
        fp = fingerprint(app_state) if self.enabled else None
        if self._memo is not None and self._memo[0] == fp:
            out = self._from_memo(app_state, step)
            if not self._checked:
                self._checked = True
                full = self._full(app_state, step, fp, remember=False)
                if not self._agree(out, full):
                    return full
            self.cached += 1
            return out
        self.full += 1
        return self._full(app_state, step, fp, remember=self.enabled)

    def _full(self, app_state: dict, step: int, fp, remember: bool):
        _, okey, others = split(app_state)
        state = sharded_state(app_state)
        sharded: dict = {}
        s_skel = {k: encode(v, k, sharded) for k, v in state.items()}
        chunks, srcs = {}, {}
        for path, t in sharded.items():
            loc, offset, writes = chunk_of(t)
            # Plain tensors of the model/optimizer are the same on every rank: rank 0 writes them.
            if writes and (self.rank == 0 or loc is not t):
                srcs[SHARDED + path] = loc
                chunks[path] = {"global_shape": list(t.shape), "offset": list(offset),
                                "shape": list(loc.shape), "dtype": str(t.dtype)}
        if remember:
            names = [g["params"] for g in state[okey]["param_groups"]] if okey else []
            # Only the parameter groups may hold values that change without a tensor changing;
            # a non-tensor value anywhere else in the optimizer state is not remembered.
            plain = okey is not None and any(not isinstance(v, torch.Tensor) for s in state[okey]["state"].values()
                                             for v in (s.values() if isinstance(s, dict) else [s]))
            pg_tensors: dict = {}
            if okey is not None:
                encode(state[okey]["param_groups"], "", pg_tensors)
            if plain or pg_tensors:
                self.enabled = False
                log.info("checkpoint capture not cached: the optimizer state holds values that are not "
                         "tensors outside its parameter groups, or tensors inside them")
            else:
                self._memo = (fp, s_skel, chunks, srcs, names)
        return self._index(step, s_skel, chunks, srcs, app_state, others)

    def _from_memo(self, app_state: dict, step: int):
        _, s_skel, chunks, srcs, names = self._memo
        _, okey, others = split(app_state)
        if okey is not None:
            s_skel = dict(s_skel)
            s_skel[okey] = {**s_skel[okey], "param_groups": encode(_param_groups(app_state[okey], names),
                                                                   f"{okey}/param_groups", {})}
        return self._index(step, s_skel, chunks, srcs, app_state, others)

    def _index(self, step: int, s_skel: dict, chunks: dict, srcs: dict, app_state: dict, others: list):
        local: dict = {}
        l_skel = {}
        for k in others:
            obj = app_state[k]
            sd = obj.state_dict() if hasattr(obj, "state_dict") else dict(obj)
            l_skel[k] = encode(sd, k, local)
        sources = dict(srcs)
        for path, t in local.items():
            sources[LOCAL + path] = t.detach().clone()  # small, and may change after this step
        index = {"rank": self.rank, "world_size": self.world_size, "step": step,
                 "sharded": s_skel, "local": l_skel, "chunks": chunks}
        return index, sources

    def _agree(self, cached, full) -> bool:
        """The first cached capture of a run against a full one: the same index, the same tensors.
        On a difference the cache is off for the rest of the run."""
        (ci, cs), (fi, fs) = cached, full
        same = ci == fi and cs.keys() == fs.keys() and all(
            _where(cs[k]) == _where(fs[k]) and cs[k].dtype == fs[k].dtype
            for k in cs if k.startswith(SHARDED))
        if not same:
            self.enabled, self._memo = False, None
            diff = [k for k in ci if ci.get(k) != fi.get(k)] or sorted(set(cs) ^ set(fs))[:3] or ["tensors"]
            log.warning("checkpoint capture cache disagreed with a full capture (%s); every save of "
                        "this run gathers the state in full", ", ".join(diff))
        return same
