"""Cross-field rules: every problem in a config, each with the fix, before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

from feixing.config.load import ConfigError
from feixing.config.schema import Config

_CHOICES = {
    ("train", "dtype"): ("fp32", "bf16"),
    ("train", "nonfinite_loss"): ("skip", "stop"),
    ("parallel", "cp_mode"): ("ring", "allgather"),
    ("parallel", "activation_checkpoint"): ("none", "full"),
    ("distributed", "backend"): ("auto", "nccl", "hccl", "gloo"),
    ("distributed", "device"): ("auto", "cuda", "npu", "cpu"),
    ("checkpoint", "on_error"): ("continue", "stop"),
    ("checkpoint", "when_busy"): ("wait", "skip"),
    ("model", "attention_backend"): ("auto", "reference", "cpu_flash", "cuda", "npu"),
}
_FAULT_KINDS = ("slow_rank", "dispatch_ramp", "slow_link", "slow_data", "gc_storm",
                "checkpoint_stall", "hang")


def problems(cfg: Config, world_size: int, check_data: bool = True) -> list[str]:
    """All problems found, as 'key: what is wrong; fix' lines (empty list = valid)."""
    out: list[str] = []
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            out.append(f"{section}.{key} = {value!r}: choose one of {', '.join(allowed)}")

    p = cfg.parallel
    if p.cp_degree < 0:
        out.append(f"parallel.cp_degree = {p.cp_degree}: must be >= 0 (0 = explicit degrees)")
    if p.cp_degree > 0 and (p.cp_ulysses_degree != 1 or p.cp_ring_degree != 1):
        out.append("parallel.cp_degree (automatic split) and the explicit cp_ulysses_degree / "
                   "cp_ring_degree are both set; keep one of them")
    elif p.cp_degree > 0:
        try:
            from feixing.plan.auto import resolve_auto_cp

            cfg = resolve_auto_cp(cfg)
            p = cfg.parallel
        except ValueError as e:
            out.append(f"parallel.cp_degree = {p.cp_degree}: {e}")
    for key in ("dp_replicate_degree", "cp_ulysses_degree", "cp_ring_degree", "tp_degree"):
        if getattr(p, key) < 1:
            out.append(f"parallel.{key} = {getattr(p, key)}: must be >= 1")
    if p.dp_shard_degree == 0 or p.dp_shard_degree < -1:
        out.append(f"parallel.dp_shard_degree = {p.dp_shard_degree}: must be >= 1, or -1 to fill "
                   "the remaining ranks")
    if p.tp_degree != 1:
        out.append("parallel.tp_degree: tensor parallelism is not implemented yet; set it to 1")
    others = max(1, p.dp_replicate_degree * p.cp_ulysses_degree * p.cp_ring_degree * p.tp_degree)
    dp_shard = p.dp_shard_degree if p.dp_shard_degree > 0 else world_size // others
    if world_size % others or dp_shard * others != world_size:
        out.append(
            f"parallel: dp_replicate {p.dp_replicate_degree} x dp_shard "
            f"{p.dp_shard_degree if p.dp_shard_degree > 0 else 'auto'} x cp_ulysses "
            f"{p.cp_ulysses_degree} x cp_ring {p.cp_ring_degree} x tp {p.tp_degree} does not "
            f"match the world size {world_size}; launch a multiple of {others} processes or "
            "change the degrees (dp_shard_degree = -1 fills the rest)")
        dp_shard = 1
    cp = p.cp_ulysses_degree * p.cp_ring_degree

    out += _model_problems(cfg, cp)

    d = cfg.data
    if d.seq_len < 1:
        out.append(f"data.seq_len = {d.seq_len}: a sequence must hold at least one token")
    elif cp > 1 and d.seq_len % (2 * cp):
        out.append(f"data.seq_len = {d.seq_len}: context parallelism of degree {cp} splits each "
                   f"sequence into 2 x {cp} chunks; use a multiple of {2 * cp}")
    dp = p.dp_replicate_degree * dp_shard
    if d.grad_accum_steps < 1:
        out.append(f"data.grad_accum_steps = {d.grad_accum_steps}: must be >= 1")
    elif d.batch_size < 1 or d.batch_size % (dp * d.grad_accum_steps):
        out.append(f"data.batch_size = {d.batch_size}: must be a positive multiple of data-parallel "
                   f"degree {dp} x grad_accum_steps {d.grad_accum_steps} = "
                   f"{dp * d.grad_accum_steps}")
    if check_data:
        out += _data_problems(cfg)

    if cfg.train.steps < 1:
        out.append(f"train.steps = {cfg.train.steps}: must be >= 1")
    if cfg.metrics.log_interval < 1:
        out.append(f"metrics.log_interval = {cfg.metrics.log_interval}: must be >= 1")
    o = cfg.optim
    if o.lr <= 0:
        out.append(f"optim.lr = {o.lr}: must be > 0")
    if o.warmup_steps < 0:
        out.append(f"optim.warmup_steps = {o.warmup_steps}: must be >= 0")
    if not 0 <= o.min_lr_ratio <= 1:
        out.append(f"optim.min_lr_ratio = {o.min_lr_ratio}: must be within [0, 1]")
    if o.grad_clip < 0:
        out.append(f"optim.grad_clip = {o.grad_clip}: must be >= 0 (0 = off)")
    c = cfg.checkpoint
    if c.interval < 0:
        out.append(f"checkpoint.interval = {c.interval}: must be >= 0 (0 = off)")
    if c.keep < 1:
        out.append(f"checkpoint.keep = {c.keep}: must be >= 1 (the newest is always kept)")
    if c.keep_every < 0:
        out.append(f"checkpoint.keep_every = {c.keep_every}: must be >= 0 (0 = off)")
    if c.device_snapshot not in ("auto", "on", "off"):
        out.append(f"checkpoint.device_snapshot = {c.device_snapshot!r}: must be 'auto', 'on' or 'off'")
    if c.write_behind_mb < 0:
        out.append(f"checkpoint.write_behind_mb = {c.write_behind_mb}: must be >= 0 (0 = off)")
    if not 0.0 <= c.max_overhead < 1.0:
        out.append(f"checkpoint.max_overhead = {c.max_overhead}: must be in [0, 1), a share of the loop's "
                   "time (0.05 = 5%; 0 = off)")
    for i, f in enumerate(cfg.faults):
        if f.kind not in _FAULT_KINDS:
            out.append(f"faults[{i}].kind = {f.kind!r}: choose one of {', '.join(_FAULT_KINDS)}")
        bad = [r for r in f.ranks if not 0 <= r < world_size]
        if bad:
            out.append(f"faults[{i}].ranks = {f.ranks}: ranks {bad} do not exist in a world of "
                       f"{world_size}")
    return out


def _model_problems(cfg: Config, cp: int) -> list[str]:
    from feixing import models

    try:
        args = models.resolve_args(cfg.model)  # the flavor's shape, or hf_checkpoint's config.json
    except (KeyError, ValueError, OSError) as e:
        key = "model.hf_checkpoint" if cfg.model.hf_checkpoint else "model.flavor"
        return [f"{key} = {getattr(cfg.model, key.split('.')[1])!r}: {e}"]
    out = []
    u = cfg.parallel.cp_ulysses_degree
    if u > 1 and args.n_heads % u:
        out.append(f"parallel.cp_ulysses_degree = {u}: the {cfg.model.flavor} model's "
                   f"{args.n_heads} attention heads are not divisible by it; choose a divisor "
                   f"of {args.n_heads} and move the rest of the degree to cp_ring_degree")
    kv = args.n_kv_heads
    if u > 1 and kv % u and u % kv:
        out.append(f"parallel.cp_ulysses_degree = {u}: {kv} KV heads can be neither split over "
                   f"nor replicated to {u} ranks; choose a degree that divides or is a multiple "
                   f"of {kv}")
    if cfg.model.vocab_size < 0:
        out.append(f"model.vocab_size = {cfg.model.vocab_size}: must be >= 0 (0 = tokenizer's)")
    return out


def _data_problems(cfg: Config) -> list[str]:
    d = cfg.data
    meta = Path(d.path) / "meta.json"
    out = []
    if not meta.is_file():
        out.append(f"data.path = {d.path!r}: no prepared data there (missing {meta}); run "
                   f"`feixing prepare INPUT... --out {d.path}` first")
    else:
        try:
            json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError) as e:
            out.append(f"data.path: {meta} is unreadable ({e}); prepare the data again")
    if d.tokenizer != "byte" and not Path(d.tokenizer).is_file():
        out.append(f"data.tokenizer = {d.tokenizer!r}: no such file; give a HF tokenizer.json "
                   "path or 'byte'")
    return out


def check(cfg: Config, world_size: int, check_data: bool = True) -> None:
    """Raise one ConfigError listing every problem, or return if the config is valid."""
    found = problems(cfg, world_size, check_data)
    if found:
        raise ConfigError(f"{len(found)} problem(s) in the config:\n" +
                          "\n".join(f"  - {p}" for p in found))
