"""A short SFT, DPO, GRPO, RLOO or PPO run under a strategy, for ``test_strategies.py``: rank 0 writes the loss of
each step (PPO: of each rollout) and exports the model.

    python _strategy_script.py ALGO STRATEGY OUT   # ALGO: sft | dpo | grpo | rloo | ppo | grpo_generate
                                                    # STRATEGY: single | ddp | fsdp1 | fsdp2

The global batch is 8 examples in every case (8 on one process, 4 on each of two), in order, so the runs compare
step by step.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from lightning import Callback, Trainer, seed_everything

import lightning_llm as llm
from lightning_llm.data.sources import load_rows
from lightning_llm.models.sharding import fsdp1_root, is_sharded_fsdp2
from lightning_llm.rollout import FixedRollouts

STEPS = 3
PPO_EPOCHS = 2  # optimizer steps per PPO rollout: PPO runs PPO_EPOCHS * STEPS optimizer steps, STEPS rollouts
PPO_COMPLETION = 6
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import MAX_FIXED_COMPLETION, fixed_completion, id_reward  # noqa: E402


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens: list[float] = []
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["loss"]))
        self.tokens.append(float(trainer.callback_metrics["num_tokens"]))
        if "reward" in trainer.callback_metrics:
            self.rewards.append(float(trainer.callback_metrics["reward"]))


def split_group_completions(prompt_ids):
    """The fixed completions of the whole generation batch, this process's share: each copy of a prompt gets the
    completion of its place among all the copies of the generation batch (copies on lower ranks come first)."""
    import torch.distributed as dist

    shares = [prompt_ids]
    if dist.is_initialized():
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, [list(ids) for ids in prompt_ids])
    rank = dist.get_rank() if dist.is_initialized() else 0
    seen = Counter(tuple(ids) for share in shares[:rank] for ids in share)
    out = []
    for ids in prompt_ids:
        out.append(fixed_completion(list(ids), seen[tuple(ids)]))
        seen[tuple(ids)] += 1
    return out


def same_length_completions(prompt_ids):
    """Completions of exactly ``PPO_COMPLETION`` tokens, none of them EOS, a function of the prompt: every process's
    micro-batch then holds the same number of response tokens (PPO's token means are per micro-batch, as TRL's)."""
    return [[(sum(ids) * 7 + 13 * j) % 700 + 3 for j in range(PPO_COMPLETION)] for ids in prompt_ids]


def strategy(name: str):
    if name == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        class CPUFSDPStrategy(FSDPStrategy):
            """Lightning's FSDPStrategy on CPU processes (gloo), for the test-suite only: Lightning refuses the class
            itself on a CPU accelerator (a check on the exact type) and wraps with ``device_id=None``, which torch's
            FSDP1 refuses without an accelerator; with ``device_id=cpu`` FSDP1 runs on CPU. The model is wrapped here
            as Lightning would, and Lightning takes an already wrapped model as it is."""

            def _setup_model(self, model):
                from torch.distributed.fsdp import FullyShardedDataParallel

                wrapped = FullyShardedDataParallel(model, sharding_strategy=self.sharding_strategy,
                                                   device_id=torch.device("cpu"), **self.kwargs)
                self.kwargs.pop("auto_wrap_policy", None)
                return super()._setup_model(wrapped)

        return CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, sharding_strategy="FULL_SHARD")
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return "ddp" if name == "ddp" else "auto"


def run(algo: str, strategy_name: str, out: str) -> None:
    seed_everything(0)
    devices = 1 if strategy_name == "single" else 2
    optimizer = lambda params: torch.optim.SGD(params, lr=0.5)  # noqa: E731
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # noqa: E731
    common = dict(optimizer=optimizer, scheduler=scheduler, export_dir=os.path.join(out, "hf"))
    per_rank = 8 // devices
    if algo == "sft":
        module = llm.SFTModule("tiny-llama", **common)
        data = llm.SFTDataModule(load_rows("sample:messages")[:24], batch_size=per_rank, shuffle=False,
                                 max_length=96)
    elif algo == "dpo":
        module = llm.DPOModule("tiny-llama", beta=0.5, **common)
        data = llm.PreferenceDataModule(load_rows("sample:preference")[:24], batch_size=per_rank, shuffle=False,
                                        max_length=64)
    elif algo == "grpo_generate":
        # real generation (HF generate) that is deterministic: top-k 1 samples the argmax, so the completions, their
        # rewards and token counts must be the 1-process ones whatever the sharding
        module = llm.GRPOModule("tiny-llama", reward_funcs=[id_reward], rollout="hf", top_k=1, num_generations=2,
                                max_completion_length=8, beta=0.04, **common)
        data = llm.PromptDataModule(load_rows("sample:prompt_only")[:24], batch_size=per_rank, shuffle=False)
    elif algo == "ppo":
        # one rollout of 8 prompts per training step (4 per process), two PPO epochs of one mini-batch each
        module = llm.PPOModule("tiny-llama", reward_funcs=[id_reward], rollout=FixedRollouts(same_length_completions),
                               num_ppo_epochs=PPO_EPOCHS, num_mini_batches=1, max_completion_length=PPO_COMPLETION,
                               kl_coef=0.1, whiten_rewards=True, **common)
        data = llm.PromptDataModule(load_rows("sample:prompt_only")[:24], batch_size=per_rank, shuffle=False)
    else:
        # 8 fixed completions per step (GRPO: 1 prompt x 8, its group split across the two processes; RLOO: 4 x 2),
        # each generation batch used for two steps (the second one off-policy)
        cls, generations = (llm.GRPOModule, 8) if algo == "grpo" else (llm.RLOOModule, 2)
        module = cls("tiny-llama", reward_funcs=[id_reward], rollout=FixedRollouts(split_group_completions),
                     num_generations=generations, num_iterations=2, max_completion_length=MAX_FIXED_COMPLETION,
                     beta=0.04, **common)
        data = llm.PromptDataModule(load_rows("sample:prompt_only")[:24], batch_size=per_rank, shuffle=False)
    losses = Losses()
    max_steps = STEPS * (PPO_EPOCHS if algo == "ppo" else 1)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy(strategy_name), max_steps=max_steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, callbacks=[losses])
    trainer.fit(module, data)
    if trainer.is_global_zero:
        with open(os.path.join(out, "losses.json"), "w") as handle:
            json.dump({"world_size": trainer.world_size, "losses": losses.losses, "num_tokens": losses.tokens,
                       "rewards": losses.rewards,
                       "sharded": is_sharded_fsdp2(module.model) or fsdp1_root(trainer) is not None,
                       "strategy": type(trainer.strategy).__name__}, handle)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(*sys.argv[1:4])
    sys.exit(0)
