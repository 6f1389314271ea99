"""Two-process CPU (gloo) FSDP2 check for ``test_sync_ref_model.py``: ``python fsdp2_sync_script.py PORT OUT_FILE``.

Each rank shards small models with ``fully_shard`` and checks, against the same computation on unsharded copies,
``sync_reference`` (both sharded alike; only the reference sharded; only the policy sharded), ``full_state_dict``
and ``write_full``. Rank 0 writes ``ok`` to OUT_FILE when every check passed on both ranks.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))


def _shard(module: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in module:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _full(module: nn.Module) -> dict[str, torch.Tensor]:
    from lightning_llm.models.sharding import read_full

    return {name: read_full(param).double() for name, param in module.named_parameters()}


def _expected(ref: nn.Module, policy: nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    ref_state, policy_state = _full(ref), _full(policy)
    return {name: (1 - alpha) * ref_state[name] + alpha * policy_state[name] for name in ref_state}


def _check_close(actual: dict, expected: dict, what: str) -> None:
    for name, value in expected.items():
        if not torch.allclose(actual[name], value, rtol=0, atol=1e-6):
            raise AssertionError(f"{what}: {name} differs by {(actual[name] - value).abs().max().item()}")


def _run(rank: int, world: int, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_llm.callbacks.sync_ref_model import sync_reference
    from lightning_llm.models.sharding import full_state_dict, is_dtensor, write_full

    mesh = init_device_mesh("cpu", (world,))
    layouts = {"both sharded": (True, True), "reference sharded": (True, False), "policy sharded": (False, True)}
    for what, (shard_ref, shard_policy) in layouts.items():
        ref, policy = _model(1), _model(2)
        expected = _expected(ref, policy, 0.3)
        ref = _shard(ref, mesh) if shard_ref else ref
        policy = _shard(policy, mesh) if shard_policy else policy
        assert is_dtensor(next(ref.parameters())) == shard_ref
        sync_reference(ref, policy, 0.3)
        _check_close(_full(ref), expected, what)

    plain = _model(3)
    sharded = _shard(copy.deepcopy(plain), mesh)
    state = full_state_dict(sharded)
    _check_close({k: v.double() for k, v in state.items()}, {k: v.double() for k, v in plain.state_dict().items()},
                 "full_state_dict")
    new_weight = torch.arange(40, dtype=torch.float32).reshape(8, 5).T.contiguous()
    write_full(sharded[2].weight, new_weight)
    _check_close(_full(sharded), {"2.weight": new_weight.double()}, "write_full")

    dist.barrier()
    if rank == 0:
        Path(out_file).write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
