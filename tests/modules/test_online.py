"""GRPOModule and RLOOModule as a user meets them: they learn a rule reward on the tiny model, generate once per
generation batch, validate under ``val/``, keep the generation buffer in checkpoints, log their rollouts through
LogCompletionsCallback, reuse the PEFT policy as reference, and stop with a named error on bad rewards, schedules,
tokenizers and data modules. (Number-for-number parity with TRL is in ``tests/parity/test_trl_grpo.py``; 2-process
runs in ``test_strategies.py``; resuming in ``test_resume.py``.)"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import MAX_FIXED_COMPLETION, StepMetrics, fixed_completions, id_reward, quiet_trainer, sample_rows
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_llm import GRPOModule, LogCompletionsCallback, PreferenceDataModule, PromptDataModule, RLOOModule
from lightning_llm.models import tiny_tokenizer
from lightning_llm.rewards import make_contains_reward
from lightning_llm.rollout import FixedRollouts

ALGORITHMS = {"grpo": GRPOModule, "rloo": RLOOModule}


def fixed_module(cls=GRPOModule, **kwargs):
    kwargs.setdefault("reward_funcs", [id_reward])
    kwargs.setdefault("num_generations", 4)
    return cls("tiny-llama", rollout=FixedRollouts(fixed_completions), max_completion_length=MAX_FIXED_COMPLETION,
               **kwargs)


def prompts(n: int = 16, **kwargs) -> PromptDataModule:
    kwargs.setdefault("batch_size", 8)
    return PromptDataModule(sample_rows("prompt_only", n), **kwargs)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_online_modules_raise_a_rule_reward(algo):
    """The share of sampled completions (HF generate) that contain a "2" goes from about a quarter to nearly all."""
    torch.manual_seed(0)
    module = ALGORITHMS[algo]("tiny-llama", reward_funcs=[make_contains_reward("2")], num_generations=4,
                              max_completion_length=16, learning_rate=1e-2)
    metrics = StepMetrics()
    quiet_trainer(max_steps=40, log_every_n_steps=1, callbacks=[metrics]).fit(
        module, PromptDataModule("sample:prompt_only", batch_size=8))
    rewards = metrics.series("rewards/contains_2/mean")
    assert rewards == metrics.series("reward")  # one reward function of weight 1
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert first < 0.4 and last > 0.75, (first, last)


def test_generation_happens_once_per_generation_batch():
    calls = []

    def completions(prompt_ids):
        calls.append(len(prompt_ids))
        return fixed_completions(prompt_ids)

    module = GRPOModule("tiny-llama", reward_funcs=[id_reward], rollout=FixedRollouts(completions), num_generations=2,
                        steps_per_generation=2, num_iterations=2, max_completion_length=MAX_FIXED_COMPLETION)
    metrics = StepMetrics()
    # 8 batches of 2 completions: 2 generation batches of 4 completions, each trained 2 micro-batches x 2 passes
    quiet_trainer(max_steps=4, accumulate_grad_batches=2, log_every_n_steps=1, callbacks=[metrics]).fit(
        module, prompts(batch_size=2))
    assert calls == [4, 4]
    # generation metrics are logged at the steps that generated; the loss's at every step
    assert [("reward" in step) for step in metrics.logged] == [True, False, True, False]
    assert all("entropy" in step for step in metrics.logged)


def test_validation_generates_num_generations_eval_completions_per_prompt():
    seen = []

    def completions(prompt_ids):
        seen.append(len(prompt_ids))
        return fixed_completions(prompt_ids)

    module = GRPOModule("tiny-llama", reward_funcs=[id_reward], rollout=FixedRollouts(completions), num_generations=4,
                        num_generations_eval=2, max_completion_length=MAX_FIXED_COMPLETION)
    data = prompts(8, val_data=sample_rows("prompt_only")[100:105], val_batch_size=4)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=None)
    trainer.validate(module, data)
    assert seen == [4, 4, 4]  # 5 prompts x 2 completions, in batches of 4 (the last completed with repeats)
    metrics = trainer.callback_metrics
    for name in ("val/reward", "val/reward_std", "val/loss", "val/entropy", "val/completions/mean_length",
                 "val/rewards/id_reward/mean"):
        assert name in metrics, name


def test_checkpoints_hold_the_generation_buffer(tmp_path):
    module = fixed_module(steps_per_generation=2, num_iterations=1, beta=0.04)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    quiet_trainer(max_steps=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(module, prompts(batch_size=4))
    saved = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=False)
    buffers = saved["lightning_llm"]["generation_buffer"]
    assert len(buffers) == 1 and buffers[0]["generation"] == 0 and len(buffers[0]["slices"]) == 2
    part = buffers[0]["slices"][1]
    assert part["completion_ids"].shape[0] == 4 and part["ref_per_token_logps"] is not None
    assert not any(key.startswith("ref_model.") for key in saved["state_dict"])  # the reference is rebuilt
    # reward functions given as objects are not hyperparameters (import paths are): they are handed in again
    restored = GRPOModule.load_from_checkpoint(next(tmp_path.glob("*.ckpt")), reward_funcs=[id_reward],
                                               rollout=FixedRollouts(fixed_completions))
    assert restored._pending_buffer[0]["generation"] == 0


def test_log_completions_logs_the_training_rollouts(tmp_path):
    module = fixed_module(reward_funcs=[id_reward, make_contains_reward("a")], steps_per_generation=1)
    callback = LogCompletionsCallback(num_prompts=3, console=False)
    logger = CSVLogger(tmp_path, name="run", version=0)
    quiet_trainer(max_steps=2, logger=logger, callbacks=[callback]).fit(module, prompts())
    assert callback.columns == ["step", "prompt", "completion", "rewards/id_reward", "rewards/contains_a",
                                "advantage"]
    assert len(callback.rows) == 6 and {row[0] for row in callback.rows} == {1, 2}  # logged after steps 1 and 2
    import csv

    with open(tmp_path / "run" / "version_0" / "completions.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["step", "prompt", "completion", "rewards/id_reward", "rewards/contains_a", "advantage"]
    assert [tuple(row) for row in table[1:]] == [tuple(map(str, row)) for row in callback.rows]
    tok = module.tokenizer
    first = sample_rows("prompt_only", 16)
    rendered = {tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in first}
    assert all(row[1] in rendered for row in callback.rows)


def test_peft_policy_with_adapters_disabled_is_the_reference():
    pytest.importorskip("peft")
    module = fixed_module(beta=0.04, peft_config={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    metrics = StepMetrics()
    quiet_trainer(max_steps=1, log_every_n_steps=1, callbacks=[metrics]).fit(module, prompts())
    assert module.ref_model is None
    assert metrics.steps[0]["kl"] == 0.0  # fresh adapters (B = 0): the policy is its reference


# -------------------------------------------------------------------------------------------------------- errors
def _named_reward(behaviour: str):
    def broken_reward(completions, **kwargs):
        if behaviour == "raises":
            raise RuntimeError("the grader is down")
        if behaviour == "short":
            return [1.0] * (len(completions) - 1)
        return ["good"] * len(completions)

    return broken_reward


@pytest.mark.parametrize("behaviour, message", [
    ("raises", r"broken_reward.*raised.*the grader is down|broken_reward.*the grader is down"),
    ("short", r"broken_reward.*returned 7 rewards.*8"),
    ("strings", r"'broken_reward' returned 'good' \(str\) for row \d+"),
])
def test_a_bad_reward_function_stops_the_first_step_naming_itself(behaviour, message):
    module = fixed_module(reward_funcs=[_named_reward(behaviour)])
    trainer = quiet_trainer(max_steps=2)
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, prompts())
    assert trainer.global_step == 0


def test_num_generations_that_do_not_divide_the_batch_are_named_before_training():
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(ValueError, match=r"num_generations=3 must divide the generation batch: batch_size=8 x "
                                         r"steps_per_generation=1 x 1 process\(es\) = 8 completions"):
        trainer.fit(fixed_module(num_generations=3), prompts())
    assert trainer.global_step == 0


def test_a_tokenizer_without_pad_and_eos_is_refused_and_eos_pads_without_a_pad():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.pad_token = None
    module = GRPOModule("tiny-llama", tokenizer=tok, reward_funcs=[id_reward])
    assert module.pad_token_id == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        GRPOModule("tiny-llama", tokenizer=tok, reward_funcs=[id_reward])


def test_construction_errors_name_the_argument():
    with pytest.raises(ValueError, match="needs reward_funcs"):
        GRPOModule("tiny-llama")
    with pytest.raises(ValueError, match="reward_weights has 2 values for 1 reward sources"):
        GRPOModule("tiny-llama", reward_funcs=[id_reward], reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        RLOOModule("tiny-llama", reward_funcs=[id_reward], num_generations=1)
    with pytest.raises(ValueError, match="Unknown `loss_type` 'ppo'"):
        GRPOModule("tiny-llama", reward_funcs=[id_reward], loss_type="ppo")
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        GRPOModule("tiny-llama", reward_funcs=[id_reward], scale_rewards="prompt")
    with pytest.raises(ValueError, match="SamplingSettings.top_p must be a number in"):
        GRPOModule("tiny-llama", reward_funcs=[id_reward], top_p=1.5)
    with pytest.raises(ValueError, match="Unknown rollout engine 'vllm'"):
        GRPOModule("tiny-llama", reward_funcs=[id_reward], rollout="vllm")
    with pytest.raises(ValueError, match="reward_clip_range must be"):
        RLOOModule("tiny-llama", reward_funcs=[id_reward], reward_clip_range=[1.0, 0.0])


def test_an_online_module_needs_a_prompt_data_module():
    data = PreferenceDataModule(sample_rows("preference", 8), batch_size=4)
    with pytest.raises(ValueError, match="draws its prompts from a PromptDataModule.*PreferenceDataModule"):
        quiet_trainer(max_steps=1).fit(fixed_module(), data)


def test_reward_functions_by_import_path_and_their_metric_names():
    module = fixed_module(reward_funcs=["lightning_llm.rewards.accuracy_reward", "helpers:id_reward"],
                          reward_weights=[1.0, 0.5])
    metrics = StepMetrics()
    quiet_trainer(max_steps=1, log_every_n_steps=1, callbacks=[metrics]).fit(module, prompts())
    step = metrics.steps[0]
    assert {"rewards/accuracy_reward/mean", "rewards/id_reward/mean", "rewards/id_reward/std"} <= set(step)
    assert step["rewards/accuracy_reward/mean"] == 0.0  # random completions never state the answer
