"""Two-process CPU ZeRO-3 check for ``test_rollout_sharded.py`` (``python zero3_generate_script.py PORT OUT``):
each rank partitions the tiny llama with ``deepspeed.zero.Init(module=...)`` (DeepSpeed's CPU accelerator, gloo) and
completes its own prompts with ``HFGenerateEngine(gather_parameters=True)`` (greedy): the parameters are gathered
once around the call (``GatheredParameters``, TRL's ``ds3_gather_for_generation``), and the completions must be
those of the unpartitioned model. Rank 0 writes a JSON report."""
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
EOS, PAD = 2, 0

def run(rank: int, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    from lightning_llm.models import tiny_model
    from lightning_llm.rollout import HFGenerateEngine, SamplingSettings
    settings = SamplingSettings(max_completion_length=8, do_sample=False)
    plain = tiny_model("tiny-llama", seed=3)
    with torch.no_grad():
        plain.lm_head.weight.mul_(8.0)
    plain.eval()
    expected = HFGenerateEngine().generate(plain, PROMPTS[rank], settings, eos_token_ids=[EOS], pad_token_id=PAD)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    sharded = copy.deepcopy(plain)
    deepspeed.zero.Init(module=sharded, config_dict_or_path=config)
    params = list(sharded.parameters())
    partitioned = all(hasattr(p, "ds_id") for p in params) and all(p.numel() == 0 for p in params)
    sharded.eval()
    got = HFGenerateEngine(gather_parameters=True).generate(sharded, PROMPTS[rank], settings, eos_token_ids=[EOS],
                                                            pad_token_id=PAD)
    report = {"rank": rank, "partitioned": partitioned, "got": got.completion_ids,
              "expected": expected.completion_ids}
    reports = [None] * 2
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out_file).write_text(json.dumps(reports))
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
