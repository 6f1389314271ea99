"""One training run of the resume harness (``test_resume.py``): trains a tiny recipe, checkpointing every few steps,
optionally SIGKILLs itself at a given micro-batch, optionally resumes from a checkpoint; writes what it trained on.

    python _resume_script.py CASE OUT [--kill STEP:MICRO] [--resume CKPT]

``OUT/trace.jsonl`` gets one line per micro-batch (step, micro-batch, a digest of its token ids) and one per optimizer
step (its logged loss), flushed as they happen so a killed run leaves them behind; ``OUT/final.pt`` the trained
policy's weights (and callback state) at the end. The online issues add their algorithms to ``CASES``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_llm as llm
from lightning_llm.data.sources import load_rows

#: case -> (module factory, data factory, trainer settings, callbacks factory)
CASES: dict[str, dict] = {}


def case(name: str, **settings):
    def register(build):
        CASES[name] = {"build": build, **settings}
        return build
    return register


def constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def rows(sample: str, n: int) -> list[dict]:
    return load_rows(f"sample:{sample}")[:n]


@case("sft_accumulate", max_steps=10, accumulate=2, every=3)
def sft_accumulate(out: str):
    """SFT with dropout on (the random state matters), shuffled, 5 batches an epoch, 2 micro-batches a step."""
    module = llm.SFTModule("tiny-llama", model_kwargs={"attention_dropout": 0.2}, learning_rate=5e-3,
                           warmup_steps=2)
    data = llm.SFTDataModule(rows("messages", 18), batch_size=4, max_length=96, seed=3)
    return module, data, []


@case("sft_log_window", max_steps=24, accumulate=1, every=5, log_every=3)
def sft_log_window(out: str):
    """Metrics logged every 3 steps as means over the 3 (checkpoints every 5 fall inside a window): the resumed run
    logs the same means, so its metric buffer came back."""
    module = llm.SFTModule("tiny-llama", learning_rate=5e-3, scheduler=constant)
    data = llm.SFTDataModule(rows("messages", 40), batch_size=4, max_length=96, seed=8)
    return module, data, []


@case("sft_epochs", max_steps=-1, max_epochs=3, accumulate=1, every=3)
def sft_epochs(out: str):
    """An epoch-bounded run whose default cosine schedule counts its steps from the data (no max_steps)."""
    module = llm.SFTModule("tiny-llama", model_kwargs={"attention_dropout": 0.2}, learning_rate=5e-3,
                           warmup_ratio=0.2)
    data = llm.SFTDataModule(rows("messages", 18), batch_size=4, max_length=96, seed=4)
    return module, data, []


@case("sft_stream", max_steps=10, accumulate=1, every=4)
def sft_stream(out: str):
    """SFT on a shuffled stream read from a JSONL file (6 batches an epoch)."""
    path = os.path.join(out, "..", "stream.jsonl")
    if not os.path.exists(path):
        with open(path, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows("text", 22))
    module = llm.SFTModule("tiny-llama", model_kwargs={"attention_dropout": 0.2}, learning_rate=5e-3,
                           scheduler=constant)
    data = llm.SFTDataModule(path, streaming=True, batch_size=4, max_length=64, seed=5, shuffle_buffer_size=8)
    return module, data, []


@case("dpo_epoch_boundary", max_steps=12, accumulate=1, every=4)
def dpo_epoch_boundary(out: str):
    """DPO with TR-DPO reference syncing and BEMA, 4 batches an epoch: checkpoints fall on epoch ends."""
    module = llm.DPOModule("tiny-llama", learning_rate=5e-3, sync_ref_model=True, ref_model_sync_steps=3,
                           ref_model_mixup_alpha=0.5)
    data = llm.PreferenceDataModule(rows("preference", 16), batch_size=4, max_length=64)
    return module, data, [llm.BEMACallback(update_freq=2, ema_power=0.5, bias_power=0.2)]


@case("kto_accumulate", max_steps=8, accumulate=2, every=2)
def kto_accumulate(out: str):
    """KTO with TR-DPO-style reference mixing by the callback (whose state holds the mixed reference)."""
    module = llm.KTOModule("tiny-llama", learning_rate=5e-3)
    data = llm.UnpairedPreferenceDataModule(rows("unpaired_preference", 20), batch_size=4, max_length=64)
    return module, data, [llm.SyncRefModelCallback(sync_steps=3, alpha=0.5)]


@case("bco", max_steps=8, accumulate=1, every=3)
def bco(out: str):
    """BCO: the running mean of the rewards (RunningMoments) is state too."""
    module = llm.BCOModule("tiny-llama", learning_rate=5e-3)
    data = llm.UnpairedPreferenceDataModule(rows("unpaired_preference", 20), batch_size=4, max_length=64,
                                            kl_pairs=False)
    return module, data, []


def letter_share(completions, **kwargs):
    """A reward that varies within every group: the share of the completion's characters that are letters."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isalpha() for ch in text) / max(len(text), 1) for text in texts]


@case("grpo_mid_generation", max_steps=8, accumulate=2, every=3)
def grpo_mid_generation(out: str):
    """GRPO sampling with HF generate, each generation batch split in 2 and used twice (4 batches, 2 optimizer
    steps): the checkpoint after step 3 falls in the middle of a generation batch, so the resumed run must train on
    the restored buffer (completions, advantages, log-probs of generation time)."""
    module = llm.GRPOModule("tiny-llama", reward_funcs=[letter_share], num_generations=4,
                            steps_per_generation=2, num_iterations=2, max_completion_length=12, learning_rate=1e-2,
                            beta=0.04)
    data = llm.PromptDataModule(rows("prompt_only", 24), batch_size=4, seed=6)
    return module, data, []


@case("rloo_mid_generation", max_steps=8, accumulate=1, every=3)
def rloo_mid_generation(out: str):
    """RLOO (KL in the reward), each generation batch used twice: the checkpoint after step 3 is between the two."""
    module = llm.RLOOModule("tiny-llama", reward_funcs=[letter_share], num_generations=2,
                            num_iterations=2, max_completion_length=12, learning_rate=1e-2)
    data = llm.PromptDataModule(rows("prompt_only", 24), batch_size=4, seed=7)
    return module, data, []


@case("online_dpo_accumulate", max_steps=8, accumulate=2, every=3)
def online_dpo_accumulate(out: str):
    """Online DPO sampling with HF generate, two micro-batches per optimizer step: the killed run stops mid
    accumulation after the checkpoint of step 3; a list beta changes with the epoch (6 micro-batches per epoch)."""
    module = llm.OnlineDPOModule("tiny-llama", reward_funcs=[letter_share], max_completion_length=12, max_length=64,
                                 learning_rate=1e-2, beta=[0.1, 0.3])
    data = llm.PromptDataModule(rows("prompt_only", 12), batch_size=4, seed=8)
    return module, data, []


@case("xpo_accumulate", max_steps=8, accumulate=2, every=3)
def xpo_accumulate(out: str):
    """XPO sampling the policy's and the frozen reference's completions, two micro-batches per optimizer step: killed
    mid accumulation after the checkpoint of step 3; list alpha and beta change with the epoch."""
    module = llm.XPOModule("tiny-llama", reward_funcs=[letter_share], max_completion_length=12, max_length=64,
                           learning_rate=1e-2, beta=[0.1, 0.3], alpha=[0.05, 0.1])
    data = llm.PromptDataModule(rows("prompt_only", 12), batch_size=4, seed=9)
    return module, data, []


@case("nash_md_accumulate", max_steps=8, accumulate=2, every=3)
def nash_md_accumulate(out: str):
    """Nash-MD sampling the mixture with the fast engine (two KV caches), two micro-batches per optimizer step: killed
    mid accumulation after the checkpoint of step 3; list beta and mixture_coef change with the epoch."""
    module = llm.NashMDModule("tiny-llama", reward_funcs=[letter_share], max_completion_length=12, max_length=64,
                              learning_rate=1e-2, beta=[0.1, 0.3], mixture_coef=[0.5, 0.25], rollout="fast")
    data = llm.PromptDataModule(rows("prompt_only", 12), batch_size=4, seed=10)
    return module, data, []


@case("ppo_between_rollouts", max_steps=16, accumulate=1, every=4)
def ppo_between_rollouts(out: str):
    """PPO with a separate value model, 2 PPO epochs per rollout (2 optimizer steps each, one LR step): killed at the
    start of the rollout after the checkpoint of step 8; the value model, the optimizer of both and the schedule come
    back."""
    module = llm.PPOModule("tiny-llama", reward_funcs=[letter_share], num_ppo_epochs=2, gradient_accumulation_steps=2,
                           max_completion_length=12, learning_rate=1e-2, temperature=1.0)
    data = llm.PromptDataModule(rows("prompt_only", 24), batch_size=4, seed=9)
    return module, data, []


def batch_ids(batch) -> bytes:
    """The token ids a batch holds (for a prompt batch: its prompts and its place in the generation schedule)."""
    if hasattr(batch, "prompt_ids") and batch.prompt_ids is not None:
        return json.dumps([batch.prompt_ids, batch.generation, batch.repeat]).encode()
    return (batch.input_ids if hasattr(batch, "input_ids") else batch.sequences.input_ids).numpy().tobytes()


def trained_rollouts(module, batch) -> str | None:
    """A digest of the completions and advantages an online module trained on for ``batch``."""
    buffer = getattr(module, "_buffer", None)
    if buffer is None:
        return None
    part = buffer.slices[batch.repeat % len(buffer.slices)]
    data = part.completion_ids.numpy().tobytes() + part.advantages.numpy().tobytes()
    if part.old_per_token_logps is not None:
        data += part.old_per_token_logps.numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class Trace(Callback):
    """Writes each micro-batch's digest and each step's loss to ``trace.jsonl``; SIGKILLs the process at ``kill``."""

    def __init__(self, path: str, accumulate: int, kill: tuple[int, int] | None) -> None:
        self.handle = open(path, "a")
        self.accumulate = accumulate
        self.kill = kill
        self.last_logged = None

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        position = (trainer.global_step, batch_idx % self.accumulate)
        if self.kill is not None and position == self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        self.write({"kind": "batch", "step": position[0], "micro": position[1], "epoch": trainer.current_epoch,
                    "digest": hashlib.sha256(batch_ids(batch)).hexdigest()[:16]})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollouts = trained_rollouts(pl_module, batch)
        if rollouts is not None:
            self.write({"kind": "rollout", "batch": batch_idx, "epoch": trainer.current_epoch, "digest": rollouts})
        logged = pl_module.last_metrics.get("train")
        if logged is not None and logged is not self.last_logged:  # a logging step (a flush made a new dict)
            self.last_logged = logged
            metrics = {k: float(v) for k, v in logged.items() if k in ("loss", "kl", "delta")}
            self.write({"kind": "step", "step": trainer.global_step, **metrics})


def run(name: str, out: str, kill: tuple[int, int] | None, resume: str | None) -> None:
    settings = CASES[name]
    os.makedirs(out, exist_ok=True)
    seed_everything(0)
    module, data, callbacks = settings["build"](out)
    checkpoints = ModelCheckpoint(dirpath=os.path.join(out, "checkpoints"), every_n_train_steps=settings["every"],
                                  save_last=True, save_top_k=-1)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=settings["max_steps"], max_epochs=settings.get("max_epochs"),
        accumulate_grad_batches=settings["accumulate"], log_every_n_steps=settings.get("log_every", 1), logger=False,
        enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
        callbacks=[*callbacks, checkpoints, Trace(os.path.join(out, "trace.jsonl"), settings["accumulate"], kill)],
    )
    trainer.fit(module, data, ckpt_path=resume)
    state = {"model": {k: v.clone() for k, v in module.model.state_dict().items()}}
    for callback in callbacks:
        if hasattr(callback, "state_dict"):
            state[type(callback).__name__] = callback.state_dict()
    if getattr(module, "ref_model", None) is not None:
        state["ref_model"] = module.ref_model.state_dict()
    if getattr(module, "value_model", None) is not None:
        state["value_model"] = module.value_model.state_dict()
    if hasattr(module, "running"):
        state["running"] = module.running.state_dict()
    torch.save(state, os.path.join(out, "final.pt"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("out")
    parser.add_argument("--kill", help="STEP:MICRO, the micro-batch at which the process kills itself")
    parser.add_argument("--resume", help="checkpoint to resume from")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kill = tuple(int(part) for part in args.kill.split(":")) if args.kill else None
    run(args.case, args.out, kill, args.resume)
    sys.exit(0)
