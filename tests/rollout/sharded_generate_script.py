"""Two-process CPU (gloo) FSDP2 and FSDP1 check for ``test_rollout_sharded.py``:
``python sharded_generate_script.py PORT OUT``.

Each rank shards the tiny llama with :func:`lightning_llm.models.sharding.shard_fsdp2` and completes its own prompts
with :class:`HFGenerateEngine` (greedy); then the same under FSDP1, wrapped as Lightning's ``FSDPStrategy`` wraps a
LightningModule (the decoder layers as units, the root holding the embeddings, final norm and head), with the
gathering the online modules configure under that strategy
(:func:`~lightning_llm.models.sharding.fsdp1_generation_context`). The EOS ids are chosen so that rank 1's rows all
end after a few tokens while rank 0's run on: without ``synced_gpus`` rank 1 would stop calling the forward (and its
all-gathers) early and rank 0 would hang. Each rank's completions must equal those of an unsharded copy. Rank 0
writes a JSON report.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROMPTS = {0: [[5, 6, 7, 8, 9, 10, 11], [12, 13]], 1: [[14, 15, 16, 17], [18, 19, 20, 21, 22]]}
EOS, PAD, NEVER = 2, 0, 10_000


def _model() -> torch.nn.Module:
    from lightning_llm.models import tiny_model

    model = tiny_model("tiny-llama", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def _run(rank: int, world: int, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_llm.models.sharding import is_sharded_fsdp2, shard_fsdp2
    from lightning_llm.rollout import FastDecodeEngine, HFGenerateEngine, SamplingSettings

    settings = SamplingSettings(max_completion_length=10, do_sample=False)
    plain = _model()
    # every rank ends at its step 1 on rank 1's second tokens: rank 1 stops after 2 tokens, rank 0 goes on
    stoppers = HFGenerateEngine().generate(plain, PROMPTS[1], settings, eos_token_ids=[NEVER], pad_token_id=PAD)
    eos = [EOS] + sorted({ids[1] for ids in stoppers.completion_ids})
    expected = HFGenerateEngine().generate(plain, PROMPTS[rank], settings, eos_token_ids=eos, pad_token_id=PAD)

    sharded = shard_fsdp2(copy.deepcopy(plain), init_device_mesh("cpu", (world,)))
    assert is_sharded_fsdp2(sharded)
    engine = HFGenerateEngine()  # synced_gpus=None: on, since two processes run
    got = engine.generate(sharded, PROMPTS[rank], settings, eos_token_ids=eos, pad_token_id=PAD)
    # a second call, and one with gather_parameters (a no-op for DTensors), work the same
    again = HFGenerateEngine(gather_parameters=True).generate(sharded, PROMPTS[rank], settings, eos_token_ids=eos,
                                                              pad_token_id=PAD)
    try:
        FastDecodeEngine().generate(sharded, PROMPTS[rank], settings, eos_token_ids=eos, pad_token_id=PAD)
        refused = ""
    except ValueError as error:
        refused = str(error)

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_llm.models.sharding import fsdp1_generation_context

    holder = torch.nn.Module()  # what the LightningModule is to FSDPStrategy
    holder.model = copy.deepcopy(plain)
    root = FullyShardedDataParallel(holder, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                    device_id=torch.device("cpu"))
    inner = root.module.model
    # each rank holds about half of the values (flat shards of the root unit and of every layer unit)
    root_sharded = sum(p.numel() for p in root.parameters()) < 0.6 * sum(p.numel() for p in plain.parameters())
    fsdp1 = HFGenerateEngine(gather=lambda model: fsdp1_generation_context(root)).generate(
        inner, PROMPTS[rank], settings, eos_token_ids=eos, pad_token_id=PAD)
    report = {"rank": rank, "expected": expected.completion_ids, "got": got.completion_ids,
              "again": again.completion_ids, "fast_refused": refused, "fsdp1": fsdp1.completion_ids,
              "fsdp1_root_sharded": root_sharded}
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out_file).write_text(json.dumps(reports))
    dist.barrier()  # neither process tears gloo down while the other still has a message in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
