"""Config: strict TOML, overrides and precedence, docs, and every cross-field error path."""

from __future__ import annotations

import json

import pytest

from feixing import config
from feixing.config import ConfigError
from feixing.distributed.mesh import ParallelDims


def _data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / "meta.json").write_text(json.dumps({"num_tokens": 10}))
    return str(d)


# The demo runs hybrid CP 2 x 2; the error-path cases start from plain FSDP on 4 ranks.
DP4 = ["parallel.dp_shard_degree=4", "parallel.cp_ulysses_degree=1", "parallel.cp_ring_degree=1"]


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_defaults_file_and_cli_precedence(tmp_path):
    path = _write(tmp_path, "[train]\nsteps = 7\n[optim]\nlr = 0.01\n")
    cfg = config.load(path, ["train.steps=9", "checkpoint.async=false", "run.dir=/x/y"])
    assert cfg.train.steps == 9  # CLI beats file
    assert cfg.optim.lr == 0.01  # file beats default
    assert cfg.optim.warmup_steps == 10  # default
    assert cfg.checkpoint.async_save is False  # TOML key `async` maps to the field
    assert cfg.run.dir == "/x/y"


def test_unknown_keys_name_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.stpes' \(did you mean 'steps'\?\)"):
        config.load(_write(tmp_path, "[train]\nstpes = 3\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'paralel' \(did you mean 'parallel'\?\)"):
        config.load(None, ["paralel.cp_ring_degree=2"])


def test_type_errors_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        config.load(_write(tmp_path, '[train]\nsteps = "many"\n'))
    with pytest.raises(ConfigError, match="expected section.key=value"):
        config.load(None, ["train.steps"])
    with pytest.raises(ConfigError, match="must be section.key"):
        config.load(None, ["steps=3"])
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(_write(tmp_path, "[train\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "nope.toml"))


def test_faults_tables_and_round_trip(tmp_path):
    path = _write(tmp_path, "[[faults]]\nkind = 'slow_rank'\nranks = [3]\nstart_step = 40\n"
                            "magnitude = 0.15\n")
    cfg = config.load(path)
    assert cfg.faults[0].ranks == [3] and cfg.faults[0].magnitude == 0.15
    again = config.load(_write(tmp_path, config.to_toml(cfg)))
    assert again == cfg  # to_toml is the inverse of load


def test_every_field_has_a_doc():
    docs = config.field_docs()
    for section, values in config.to_dict(config.Config()).items():
        if section == "faults":
            continue
        for key in values:
            assert docs.get((section, key)), f"{section}.{key} has no docstring in schema.py"
    assert "# Optimizer steps to run" in config.to_toml(config.Config(), with_docs=True)


def test_valid_demo_config_has_no_problems(tmp_path):
    cfg = config.load("configs/demo.toml", [f"data.path={_data_dir(tmp_path)}"])
    assert config.problems(cfg, 4) == []


@pytest.mark.parametrize("overrides, nproc, expected", [
    (["parallel.dp_shard_degree=3"], 4, "does not match the world size 4"),
    (["parallel.dp_shard_degree=-1", "parallel.cp_ring_degree=3"], 4, "does not match"),
    (["parallel.dp_shard_degree=-1", "parallel.cp_ulysses_degree=8"], 8, "heads are not divisible"),
    (["model.flavor=qwen2-0.5b", "parallel.dp_shard_degree=-1", "parallel.cp_ulysses_degree=7",
      "data.seq_len=280"], 7, "KV heads can be neither"),
    (["parallel.dp_shard_degree=-1", "parallel.cp_ring_degree=4", "data.seq_len=100"], 4,
     "use a multiple of 8"),
    (["data.seq_len=0"], 4, "at least one token"),
    (["data.batch_size=6"], 4, "positive multiple of data-parallel degree 4"),
    (["data.grad_accum_steps=0"], 4, "grad_accum_steps = 0"),
    (["parallel.tp_degree=2", "parallel.dp_shard_degree=2"], 4, "not implemented"),
    (["parallel.dp_shard_degree=0"], 4, "must be >= 1, or -1"),
    (["parallel.cp_ring_degree=0"], 4, "cp_ring_degree = 0"),
    (["train.dtype=fp16"], 4, "choose one of fp32, bf16"),
    (["train.nonfinite_loss=ignore"], 4, "choose one of skip, stop"),
    (["parallel.cp_mode=tree"], 4, "choose one of ring, allgather"),
    (["distributed.backend=mpi"], 4, "choose one of auto"),
    (["train.steps=0"], 4, "train.steps = 0"),
    (["metrics.log_interval=0"], 4, "log_interval = 0"),
    (["optim.lr=0"], 4, "optim.lr = 0"),
    (["optim.min_lr_ratio=2"], 4, "within [0, 1]"),
    (["optim.grad_clip=-1"], 4, "grad_clip"),
    (["optim.warmup_steps=-1"], 4, "warmup_steps"),
    (["checkpoint.interval=-1"], 4, "checkpoint.interval"),
    (["checkpoint.keep=0"], 4, "checkpoint.keep = 0"),
    (["checkpoint.keep_every=-2"], 4, "keep_every"),
    (["checkpoint.on_error=panic"], 4, "continue, stop"),
    (["checkpoint.device_snapshot=yes"], 4, "device_snapshot = 'yes'"),
    (["model.flavor=gpt5"], 4, "model.flavor = 'gpt5'"),
    (["model.vocab_size=-1"], 4, "model.vocab_size"),
    (["model.hf_checkpoint=/no/such/folder"], 4, "model.hf_checkpoint"),
    (["data.tokenizer=/no/such/tokenizer.json"], 4, "no such file"),
])
def test_each_problem_is_reported_with_its_key(tmp_path, overrides, nproc, expected):
    cfg = config.load("configs/demo.toml", [f"data.path={_data_dir(tmp_path)}", *DP4, *overrides])
    found = config.problems(cfg, nproc)
    assert any(expected in p for p in found), found
    with pytest.raises(ConfigError, match="problem"):
        config.check(cfg, nproc)


def test_missing_data_and_fault_errors(tmp_path):
    cfg = config.load("configs/demo.toml", [f"data.path={tmp_path / 'none'}"])
    assert any("feixing prepare" in p for p in config.problems(cfg, 4))
    cfg = config.load(_write(tmp_path, "[[faults]]\nkind = 'meteor'\nranks = [9]\n"))
    found = config.problems(cfg, 4, check_data=False)
    assert any("faults[0].kind" in p for p in found)
    assert any("ranks [9] do not exist" in p for p in found)


def test_all_problems_are_listed_at_once(tmp_path):
    cfg = config.load("configs/demo.toml", [f"data.path={tmp_path}/none", "train.steps=0",
                                            "optim.lr=-1", "parallel.dp_shard_degree=3"])
    assert len(config.problems(cfg, 4)) >= 4


def test_parallel_dims_resolve_and_validate():
    cfg = config.load(None, ["parallel.cp_ulysses_degree=2", "parallel.cp_ring_degree=2"]).parallel
    dims = ParallelDims.from_config(cfg, 8)
    assert (dims.dp_shard, dims.cp, dims.dp) == (2, 4, 2)
    # rank order: cp_ulysses innermost, so Ulysses groups are consecutive ranks
    assert [dims.coords(r)["cp_ulysses"] for r in range(4)] == [0, 1, 0, 1]
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="not divisible"):
        ParallelDims.from_config(cfg, 6)
    cfg.dp_shard_degree = 3
    with pytest.raises(ValueError, match="multiply to 12"):
        ParallelDims.from_config(cfg, 8)


def test_automatic_cp_degree_is_resolved_by_the_cost_model(tmp_path):
    from feixing.plan.auto import resolve_auto_cp

    cfg = config.load("configs/demo.toml", [f"data.path={_data_dir(tmp_path)}", *DP4,
                                            "parallel.dp_shard_degree=1", "parallel.cp_degree=4"])
    assert config.problems(cfg, 4) == []
    resolved = resolve_auto_cp(cfg)
    p = resolved.parallel
    assert p.cp_ulysses_degree * p.cp_ring_degree == 4 and p.cp_degree == 0
    assert 4 % p.cp_ulysses_degree == 0 and p.cp_mode in ("ring", "allgather")
    assert config.problems(resolved, 4) == []  # the resolved config is valid as written
    both = config.load("configs/demo.toml", [f"data.path={_data_dir(tmp_path)}",
                                             "parallel.cp_degree=4"])  # demo sets 2 x 2 too
    assert any("keep one of them" in x for x in config.problems(both, 4))
    odd = config.load("configs/demo.toml", [f"data.path={_data_dir(tmp_path)}", *DP4,
                                            "parallel.dp_shard_degree=1", "parallel.cp_degree=4",
                                            "data.seq_len=100"])
    assert any("parallel.cp_degree = 4" in x for x in config.problems(odd, 4))


def test_numbers_widen_but_never_truncate():
    assert config.load(None, ["optim.lr=1"]).optim.lr == 1.0  # int -> float is lossless
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        config.load(None, ["train.steps=2.5"])
