"""Spawned worker of the sharded parameter-count test, kept apart so that child processes import only torch."""

from __future__ import annotations

import torch
from torch import nn

from lightning_llm.utils.model import get_model_param_count


def sharded_count_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        def build(frozen_first: bool) -> nn.Module:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
            model[0].weight.requires_grad_(not frozen_first)
            return model

        counts = {}
        for use_orig_params in (False, True):
            model = FullyShardedDataParallel(
                build(frozen_first=use_orig_params), device_id=torch.device("cpu"), use_orig_params=use_orig_params
            )
            counts[f"fsdp1_orig{use_orig_params}"] = (
                get_model_param_count(model), get_model_param_count(model, trainable_only=True),
                sum(p.numel() for p in model.parameters()),
            )
        model = build(frozen_first=True)
        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
        counts["fsdp2"] = (
            get_model_param_count(model), get_model_param_count(model, trainable_only=True),
            sum(p.to_local().numel() for p in model.parameters()),
        )
        torch.save(counts, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
