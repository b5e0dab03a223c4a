"""The training loop: wires config, mesh, model, data, optimizer, checkpoints and telemetry together."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from feixing import config as config_mod
from feixing import data, distributed, models
from feixing.config.schema import Config
from feixing.distributed.mesh import ParallelDims
from feixing.plan.auto import resolve_auto_cp
from feixing.train.metrics import Metrics, memory_gb, peak_flops
from feixing.train.optim import Schedule, build_optimizer
from feixing.train.state import TrainState
from feixing.train.step import train_step

log = logging.getLogger("feixing")
_OUR_COMPILE_CACHES: set[str] = set()  # the run dirs' caches keep_compile_cache set (tests run many)


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or gradient norm is NaN/inf and train.nonfinite_loss = 'stop'."""


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)


def _write_resolved_config(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.toml.tmp"
    tmp.write_text(config_mod.to_toml(cfg))
    tmp.replace(run_dir / "config.toml")


def _to_device(mb: dict[str, torch.Tensor], device: torch.device, cp) -> dict[str, torch.Tensor]:
    """Move a micro-batch to the device and keep this rank's part of every sequence under CP."""
    out = {}
    for key, value in mb.items():
        value = value.to(device, non_blocking=True)
        if cp is not None and value.dim() == 2:  # (batch, seq) tensors; sample_ids stay whole
            value = cp.shard(value, seq_dim=1)
        out[key] = value
    return out


def train(cfg: Config, resume: str = "none") -> dict:
    """Run cfg.train.steps optimizer steps (continuing a checkpoint when resume != 'none').

    Returns a summary dict (last loss, steps run) on every rank.
    """
    env = distributed.init(cfg.distributed, cfg.run.seed)
    setup_logging(env.rank)
    try:
        return run(cfg, env, resume)
    finally:
        distributed.shutdown()


def run(cfg: Config, env, resume: str = "none") -> dict:
    """The loop inside an initialised process group (tests call this directly, many times)."""
    distributed.env.seed_everything(cfg.run.seed)
    config_mod.check(cfg, env.world_size)
    cfg = resolve_auto_cp(cfg, measure=True, device=env.device)
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        _write_resolved_config(cfg, run_dir)
    if cfg.parallel.compile:
        log.info("torch.compile caches in %s", keep_compile_cache(run_dir))
    dims = ParallelDims.from_config(cfg.parallel, env.world_size)
    meshes = dims.build_mesh(env.device_type)
    log.info("mesh: %s on %s (%s)", dims.describe(), env.device, env.backend)

    tokenizer = data.build_tokenizer(cfg.data.tokenizer)
    model = models.build(cfg.model, vocab_size=tokenizer.vocab_size)
    args = model.args
    from feixing.models.llama.parallelize import parallelize

    cp = parallelize(model, dims, meshes, cfg.parallel, cfg.train.dtype, cfg.model.attention_backend)
    model.to_empty(device=env.device)
    model.init_weights(cfg.run.seed)
    if cfg.model.hf_checkpoint:
        _load_hf_weights(model, cfg.model.hf_checkpoint, args)
    n_params = args.num_params()
    log.info("model: %s flavor %s, %.2fM parameters, vocab %d", cfg.model.family,
             cfg.model.flavor, n_params / 1e6, args.vocab_size)

    loader = data.build_loader(cfg.data, dims.dp_rank(env.rank), dims.dp, cfg.run.seed)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = Schedule(optimizer, cfg.optim, cfg.train.steps)
    state = TrainState()
    app_state = {"model": model, "optimizer": optimizer, "schedule": schedule, "loader": loader,
                 "train": state}

    from feixing.checkpoint import Manager
    from feixing.diagnose import Telemetry

    ckpt = Manager(cfg.checkpoint, run_dir=str(run_dir), rank=env.rank,
                   world_size=env.world_size, layout=_layout(dims),
                   resolved_config=config_mod.to_toml(cfg))
    if resume != "none":
        ckpt.resume(app_state, resume=resume)
        log.info("resumed at step %d", state.step)
    tele = Telemetry(cfg.telemetry, faults=cfg.faults, run_dir=str(run_dir), rank=env.rank,
                     world_size=env.world_size, device_type=env.device_type)

    peak, peak_src = peak_flops(env.device, cfg.train.dtype)
    log.info("MFU peak: %.3g FLOP/s per device (%s); FLOPs/token = 6N + 12*L*H*d*S", peak, peak_src)
    metrics = Metrics(str(run_dir), cfg.train.steps, cfg.metrics.log_interval, env.is_main,
                      model.num_flops_per_token(cfg.data.seq_len), peak, env.world_size,
                      tensorboard=cfg.metrics.tensorboard)
    grad_ranks = dims.dp * dims.cp  # ranks FSDP averages gradients over
    if cfg.train.warmup_pass:
        _warm_up(model, loader.micro_batch_size, cfg.data.seq_len, env, cp)
    last = {"loss": float("nan"), "steps": 0}
    samples = _sample_log(run_dir, env.rank) if cfg.checkpoint.record_sample_ids else None
    try:
        for step in range(state.step + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            with tele.phase("data"):
                batch = loader.next_batch()
                if samples is not None:
                    ids = [int(i) for mb in batch for i in mb["sample_ids"]]
                    samples.write(json.dumps({"step": step, "dp_rank": loader.dp_rank,
                                              "ids": ids}) + "\n")
                mbs = [_to_device(mb, env.device, cp) for mb in batch]
            lr = schedule.set_step(step)
            result, finite = train_step(model, mbs, grad_ranks, cfg.optim.grad_clip,
                                        phase=tele.phase)
            if finite:
                with tele.phase("checkpoint"):  # the optimizer must not change params a save copies
                    ckpt.wait_staging()
                with tele.phase("optimizer"):
                    optimizer.step()
                state.consecutive_skips = 0
            else:
                _handle_nonfinite(cfg, state, step, result)
            optimizer.zero_grad(set_to_none=True)
            state.step = step
            if env.device_type != "cpu":  # the loop's stream only: not a checkpoint's copy to the host
                getattr(torch, env.device_type).current_stream().synchronize()
            step_time = time.perf_counter() - t0
            metrics.record(step, result.loss, lr, result.grad_norm, result.tokens, step_time,
                           result.skipped, memory_gb(env.device))
            with tele.phase("checkpoint"):
                ckpt.maybe_save(step, app_state)
            tele.end_step(step)
            last = {"loss": result.loss, "steps": last["steps"] + 1}
        if last["steps"] and cfg.checkpoint.interval and not ckpt.attempted(state.step):
            ckpt.save(state.step, app_state)  # a finished run resumes (or extends) from its end
        _save_final_weights(model, args, run_dir, env, state.step, cfg.checkpoint.on_error)
    finally:
        ckpt.close()
        tele.close()
        metrics.close()
        if samples is not None:
            samples.close()
    return {"last_loss": last["loss"], "steps_run": last["steps"], "final_step": state.step}


def keep_compile_cache(run_dir: Path) -> str:
    """Keep torch.compile's caches with the run: run_dir/compile_cache, unless the user chose a
    place (TORCHINDUCTOR_CACHE_DIR). Inductor keeps its compiled graphs (FX graph and AOTAutograd
    caches) and kernels there, and Triton's kernels follow unless TRITON_CACHE_DIR is set; so a
    resumed run, on any node that sees the run dir, finds what the first run compiled instead of
    compiling again at its first step. Every rank points at the same folder (Inductor writes its
    entries atomically)."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:  # torch sets the variable to its default itself once anything asks for the cache dir
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # torch < 2.7 kept it here
        try:
            from torch._inductor.runtime.runtime_utils import default_cache_dir
        except ImportError:
            default_cache_dir = None
    default = os.path.abspath(default_cache_dir()) if default_cache_dir else None
    if chosen and os.path.abspath(chosen) not in (default, *_OUR_COMPILE_CACHES):
        return chosen
    path = str((run_dir / "compile_cache").resolve())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    _OUR_COMPILE_CACHES.add(path)
    return path


def _warm_up(model, batch: int, seq_len: int, env, cp) -> None:
    """One forward/backward on a dummy batch, then drop the gradients: FSDP's lazy init, every
    communicator the step uses (gloo pairs, NCCL/HCCL comms) and the allocator are set up here,
    outside the timed steps. Changes no parameter, optimizer, data or RNG state."""
    t0 = time.perf_counter()
    zeros = torch.zeros(batch, seq_len, dtype=torch.long)
    mb = _to_device({"tokens": zeros, "labels": zeros, "document_ids": zeros,
                     "positions": torch.arange(seq_len).expand(batch, seq_len)}, env.device, cp)
    train_step(model, [mb], grad_ranks=1, max_norm=0.0)
    model.zero_grad(set_to_none=True)
    log.info("warm-up pass (communicators, buffers, kernels): %.2f s", time.perf_counter() - t0)


def _sample_log(run_dir: Path, rank: int):
    """checkpoint.record_sample_ids: this rank's sample-id log, appended across resumes and
    line-buffered, so a killed process loses at most the line being written."""
    (run_dir / "sample_ids").mkdir(parents=True, exist_ok=True)
    return open(run_dir / "sample_ids" / f"rank-{rank:05d}.jsonl", "a", buffering=1)


def _layout(dims: ParallelDims) -> dict:
    return {"world_size": dims.world_size, "dp_replicate": dims.dp_replicate,
            "dp_shard": dims.dp_shard, "cp_ulysses": dims.cp_ulysses, "cp_ring": dims.cp_ring,
            "tp": dims.tp}


def _handle_nonfinite(cfg: Config, state: TrainState, step: int, result) -> None:
    state.consecutive_skips += 1
    state.total_skips += 1
    msg = (f"step {step}: non-finite loss {result.loss} or gradient norm {result.grad_norm}; "
           "the update was dropped")
    if cfg.train.nonfinite_loss == "stop":
        raise NonFiniteLossError(msg + " (train.nonfinite_loss = 'stop'); lower optim.lr, check "
                                 "the data, or set train.nonfinite_loss = 'skip'")
    log.warning("%s (%d in a row; train.nonfinite_loss = 'skip')", msg, state.consecutive_skips)
    if state.consecutive_skips >= cfg.train.max_skipped_steps:
        raise NonFiniteLossError(f"{state.consecutive_skips} consecutive non-finite steps "
                                 f"(train.max_skipped_steps); lower optim.lr or check the data")


def _load_hf_weights(model, folder: str, args) -> None:
    """Every rank reads the HF folder and keeps its own shards (fine up to node-memory sizes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from feixing.models.llama.hf import load_hf_state_dict

    full = load_hf_state_dict(folder, args)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=True))
    log.info("loaded weights from %s", folder)


def _save_final_weights(model, args, run_dir: Path, env, step: int, on_error: str) -> None:
    """Rank 0 writes the full weights as a HF folder under run_dir/final (used by generate).
    A failed write (disk full, permissions) keeps the previous `final` and, as for checkpoints,
    ends the run normally unless checkpoint.on_error = 'stop'; the other ranks never hang."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    error = None
    if env.is_main:
        from safetensors import SafetensorError  # raised for the OS's I/O errors too

        from feixing.models.llama.hf import export_hf

        final, tmp = run_dir / "final", run_dir / "final.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            export_hf(full, args, str(tmp))
            (tmp / "step.txt").write_text(str(step))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            log.info("final weights (step %d) written to %s", step, final)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = (f"final weights (step {step}) not written to {final}: {type(e).__name__}: {e}. "
                     f"The checkpoints are not affected: `feixing export --checkpoint DIR --to hf OUT` "
                     f"writes the weights from one of them.")
            log.error("%s%s", error, " Stopping (checkpoint.on_error = 'stop')." if on_error == "stop" else "")
    dist.barrier()
    if error is not None and on_error == "stop":
        raise OSError(error)
