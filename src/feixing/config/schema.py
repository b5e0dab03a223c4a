"""Typed configuration: one dataclass per component, a docstring (the string after it) per field.

Model architectures are named flavors in code (models/llama/args.py); TOML holds run knobs.
`feixing print-config` shows every field with its doc, read from this file's source.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Folder that holds everything a run writes: config.toml, metrics.jsonl, checkpoints/, telemetry/."""
    seed: int = 0
    """Seed for parameter init, data order and dropout-free sampling; identical on every rank."""


@dataclass
class ModelConfig:
    family: str = "llama"
    """Model family; `llama` covers Llama 2/3 and Qwen2-style variants."""
    flavor: str = "demo"
    """Named architecture in models/llama/args.py (demo, tiny, 1b, 8b, 70b, qwen2-0.5b, ...)."""
    vocab_size: int = 0
    """Vocabulary size; 0 = take it from the tokenizer, rounded up to a multiple of 64."""
    max_seq_len: int = 0
    """Longest sequence the RoPE tables cover; 0 = data.seq_len."""
    hf_checkpoint: str = ""
    """Optional HF folder (config.json + safetensors) to start from instead of random init."""
    attention_backend: str = "auto"
    """Attention kernel: auto (best available, logged) | reference | cpu_flash | cuda (flash-attn or aten flash/efficient) | npu (npu_fusion_attention)."""


@dataclass
class ParallelConfig:
    dp_replicate_degree: int = 1
    """Data-parallel replicas (DDP-style, gradients all-reduced across them)."""
    dp_shard_degree: int = -1
    """FSDP2 sharding degree; -1 = whatever world size remains after the other degrees."""
    cp_ulysses_degree: int = 1
    """Ulysses (all-to-all over heads) context-parallel degree; put it on fast intra-node links."""
    cp_ring_degree: int = 1
    """Ring (point-to-point KV rotation) context-parallel degree; spans nodes."""
    cp_degree: int = 0
    """Automatic context parallelism: > 0 lets the cost model (plan/cp_cost.py) split this total degree into cp_ulysses x cp_ring and pick cp_mode; leave the two explicit degrees at 1 then. 0 = use the explicit degrees."""
    cp_devices_per_node: int = 0
    """Ranks per node the automatic choice assumes (Ulysses stays inside a node when it can); 0 = LOCAL_WORLD_SIZE, else 8."""
    cp_autotune: bool = True
    """With cp_degree > 0: fit the cost model's constants on the real CP group at start-up and time the layouts it ranks within 2x of its best (a few attention fwd+bwd calls each), then run the fastest, the same on every rank (plan/auto.py). false = the cost model with default constants alone."""
    cp_mode: str = "ring"
    """How the ring dimension exchanges KV: ring (p2p, double-buffered) | allgather (Llama-3 style)."""
    tp_degree: int = 1
    """Tensor-parallel degree (reserved; must be 1 for now)."""
    activation_checkpoint: str = "none"
    """Activation checkpointing: none | full (recompute every block in backward)."""
    compile: bool = False
    """Wrap each transformer block in torch.compile."""


@dataclass
class DataConfig:
    path: str = "data/demo"
    """Folder of token shards written by `feixing prepare`."""
    tokenizer: str = "byte"
    """`byte` (no files needed) or the path of a HF tokenizer.json."""
    seq_len: int = 256
    """Tokens per packed sequence (per sample, before context-parallel sharding)."""
    batch_size: int = 8
    """Global batch in sequences per optimizer step (split over data-parallel ranks and micro-batches)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    document_masking: bool = True
    """Packed documents attend only within themselves (document ids) and restart positions."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run (total, including steps before a resume)."""
    dtype: str = "fp32"
    """Compute precision: fp32 | bf16 (bf16 params/activations in compute, fp32 master weights and reductions)."""
    nonfinite_loss: str = "skip"
    """What to do on a NaN/inf loss or gradient norm: skip (drop the step, warn) | stop (raise)."""
    max_skipped_steps: int = 10
    """Stop after this many consecutive skipped steps even in skip mode."""
    warmup_pass: bool = True
    """Before the first step, run one forward/backward on a dummy batch (no update): communicators, FSDP buffers and kernels are set up eagerly, so neither a start nor a resume has slow first steps."""


@dataclass
class MetricsConfig:
    log_interval: int = 1
    """Write a metrics.jsonl record and a progress line every this many steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files under run.dir/tensorboard (needs the tensorboard extra)."""


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every this many steps; 0 = no checkpoints."""
    keep: int = 3
    """Keep the newest `keep` committed checkpoints (the newest is never pruned)."""
    keep_every: int = 0
    """Additionally keep every checkpoint whose step is a multiple of this; 0 = none."""
    async_save: bool = True
    """Persist in a background process while training continues (TOML key `async`)."""
    verify_checksums: bool = True
    """Verify sha256 of every file on load (sizes are always verified)."""
    on_error: str = "continue"
    """When a save fails (disk full, permissions): continue (warn, keep training) | stop."""
    when_busy: str = "wait"
    """A save that falls due while the previous one is still being written: wait (for it, then save) | skip (this one; with interval = 1 the run saves as often as the disk allows, never waiting). Every rank decides alike."""
    max_overhead: float = 0.0
    """Skip a due save while the previous one has cost the loop more than this share of the time since it began (its blocking, the optimizer's wait for the copy and the slower steps it overlapped, measured against the median step without a save), e.g. 0.05 with interval = 1: save as often as 5% of the loop allows; 0 = off. Every rank decides alike."""
    write_behind_mb: int = 32
    """Linux: while a save is written, hand every this many MiB to the disk and drop it from the page cache, so a large save never piles up dirty pages for the kernel to flush at normal priority; 0 = leave it to the kernel (one fsync at the end)."""
    device_snapshot: str = "auto"
    """GPU/NPU: copy the state into spare device memory first, so the optimizer waits only for that device-to-device copy while the snapshot crosses to the host behind training: auto (when the device keeps 2 GiB and 10% free after it; never on CPU) | on | off."""
    commit_timeout_s: float = 600.0
    """Rank 0 commits a save once every rank's files are on disk; it gives up (save failed, previous checkpoint kept) after this many seconds."""
    record_sample_ids: bool = False
    """Debug aid: every rank appends the dataset sample ids of each step it trains on to run.dir/sample_ids/rank-NNNNN.jsonl (tests use it to prove a resume neither repeats nor skips a sample)."""


@dataclass
class TelemetryConfig:
    enabled: bool = True
    """Always-on per-rank, per-phase timings written under run.dir/telemetry/."""
    canary_interval: int = 50
    """Run the dispatch and memory canaries every this many steps; 0 = never."""
    probe_interval: int = 500
    """Run the collective probes (each ring link, all_reduce per group) every this many steps; 0 = never.
    They cost a few collectives, so they run less often than the local canaries; a multiple of canary_interval.
    A slow link is reported after 3 probes in a row show it."""
    online_detect: bool = True
    """Run detectors during training and print warnings into the log."""
    hang_timeout_s: float = 600.0
    """Collective timeout after which the watchdog records each rank's last collectives."""
    detect_interval: int = 50
    """Online detection: every this many steps each rank pushes a few medians to the job's store for rank 0; 0 = never."""
    flush_interval: int = 100
    """Buffered telemetry records are written to disk every this many records."""
    probe_bytes: int = 262144
    """Payload of the bandwidth probes (ring links and all_reduce per group), in bytes."""


@dataclass
class FaultConfig:
    kind: str = "slow_rank"
    """slow_rank | dispatch_ramp | slow_link | slow_data | gc_storm | checkpoint_stall | hang."""
    ranks: list[int] = field(default_factory=list)
    """Ranks the fault applies to; empty = all ranks."""
    start_step: int = 0
    """First step with the fault."""
    magnitude: float = 0.1
    """Extra fraction of a step; for dispatch_ramp, growth per 100 steps."""


@dataclass
class DistributedConfig:
    backend: str = "auto"
    """Process-group backend: auto (nccl on CUDA, hccl on Ascend, gloo on CPU) | nccl | hccl | gloo."""
    device: str = "auto"
    """auto | cuda | npu | cpu."""
    timeout_s: float = 600.0
    """Collective timeout in seconds."""
    threads_per_rank: int = 1
    """torch intra-op threads per process on CPU (1 avoids oversubscription)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    faults: list[FaultConfig] = field(default_factory=list)
    """Injected faults for tests and evaluation (TOML `[[faults]]`); off when empty."""
