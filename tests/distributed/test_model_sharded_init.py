"""FSDP2 (1-D and HSDP meshes): init_weights, HF load and export equal the single-device model."""

from __future__ import annotations

import torch

from feixing.models import get_args
from feixing.models.llama.hf import export_hf, load_hf
from feixing.models.llama.model import Llama

# vocab 130 does not divide by 4 or 2: uneven shards must still get the right values.
TOKENS = torch.randint(0, 130, (2, 16), generator=torch.Generator().manual_seed(0))


def _sharded_model(args, mesh_shape):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("dp_shard",) if len(mesh_shape) == 1 else ("dp_replicate", "dp_shard")
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    with torch.device("meta"):
        model = Llama(args)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model.to_empty(device="cpu")


def _check(rank, world_size, mesh_shape, tie, hf_dir, out_dir):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from feixing.models.llama.hf import load_hf_state_dict

    args = get_args("tiny", vocab_size=130, tie_embeddings=tie)
    ref = Llama(args)
    ref.init_weights(7)
    model = _sharded_model(args, mesh_shape)
    model.init_weights(7)
    ref_params = dict(ref.named_parameters())
    weight_diff = 0.0
    for name, p in model.named_parameters():
        assert type(p).__name__ == "DTensor", name
        weight_diff = max(weight_diff, (p.full_tensor() - ref_params[name]).abs().max().item())
    with torch.no_grad():
        logit_diff = (model(TOKENS) - ref(TOKENS)).abs().max().item()
    # Export gathers DTensors (a collective on every rank); each rank writes its own copy here.
    export_hf(model.state_dict(), args, f"{out_dir}/rank{rank}")
    # The lead's recipe for starting from a HF folder: full state dict into the sharded model.
    hf_model, _ = load_hf(hf_dir)
    set_model_state_dict(
        model, load_hf_state_dict(hf_dir, args), options=StateDictOptions(full_state_dict=True)
    )
    with torch.no_grad():
        hf_diff = (model(TOKENS) - hf_model(TOKENS)).abs().max().item()
    return weight_diff, logit_diff, hf_diff


def test_sharded_model_equals_single_device(pool4, tmp_path):
    for mesh_shape, tie in [((4,), False), ((2, 2), True)]:
        args = get_args("tiny", vocab_size=130, tie_embeddings=tie)
        other = Llama(args)
        other.init_weights(11)  # a different model to load from a HF folder
        hf_dir, out_dir = tmp_path / f"hf{tie}", tmp_path / f"out{tie}"
        export_hf(other, args, hf_dir)
        ref = Llama(args)
        ref.init_weights(7)
        for weight_diff, logit_diff, hf_diff in pool4.run(
            _check, mesh_shape, tie, str(hf_dir), str(out_dir)
        ):
            assert weight_diff == 0.0  # same generator, same values: bit-identical
            # Same fp32 math on gathered weights; only matmul blocking could differ.
            assert logit_diff < 1e-5 and hf_diff < 1e-5
        for rank in range(4):
            exported, _ = load_hf(out_dir / f"rank{rank}")
            with torch.no_grad():
                torch.testing.assert_close(exported(TOKENS), ref(TOKENS), rtol=0, atol=0)
