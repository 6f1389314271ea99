"""Issue 13's reward -> PPO chain through the TRL-style facade: ``RewardTrainer(...).train()`` writes
``output_dir/final``; ``PPOTrainer(reward_model=".../final", ...)`` with ``clip_range``/``kl_coef`` and
``BEMACallback(beta=...)`` trains a few steps, then two ``step(queries)`` calls continue the run (the same
Lightning trainer: global step, log history and callbacks go on)."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow

#: TRL 1.12's PPO metric names that step() must return
PPO_STATS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
             "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/num_eos_tokens", "learning_rate")
QUERIES = ["What is 1 + 1?", "Name a colour.", "Say hello.", "What is 2 + 2?"]


def test_reward_model_final_feeds_ppo_train_and_step(tmp_path):
    from lightning_llm.trainers import BEMACallback, PPOConfig, PPOTrainer, RewardConfig, RewardTrainer

    quiet = dict(save_strategy="no", disable_tqdm=True, use_cpu=True, report_to="none", gradient_checkpointing=False)
    reward = RewardTrainer(model="tiny-llama", args=RewardConfig(output_dir=str(tmp_path / "reward_model"),
                                                                   max_steps=2, per_device_train_batch_size=4,
                                                                   logging_steps=1, **quiet),
                           train_dataset="sample:preference")
    reward.train()
    final = tmp_path / "reward_model" / "final"
    assert (final / "config.json").is_file()

    args = PPOConfig(output_dir=str(tmp_path / "ppo"), max_steps=2, per_device_train_batch_size=2,
                     num_ppo_epochs=1, response_length=6, clip_range=0.1, kl_coef=0.02, learning_rate=1e-3,
                     total_episodes=None, logging_steps=1, **quiet)
    bema = BEMACallback(beta=0.9, update_freq=1)
    trainer = PPOTrainer(args=args, model="tiny-llama", reward_model=str(final), train_dataset="sample:prompt_only",
                         callbacks=[bema])
    assert trainer.module.cliprange == 0.1 and trainer.module.kl_coef == 0.02
    out = trainer.train()
    assert out.global_step == 2 and math.isfinite(out.training_loss)
    assert (tmp_path / "ppo" / "final" / "value_model" / "config.json").is_file()  # the value model beside the policy
    assert (tmp_path / "ppo" / "bema" / "config.json").is_file()  # BEMA ran under train()
    # the value model started from the reward model (TRL's default), the reference is a frozen copy
    assert trainer.value_model is not None and trainer.reward_model is not None
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())

    first = trainer.step(QUERIES)
    second = trainer.step(QUERIES)
    for stats in (first, second):
        missing = [name for name in PPO_STATS if name not in stats]
        assert not missing, missing
        assert all(math.isfinite(value) for value in stats.values()), stats
    # one run: the step() optimizer is kept between calls, and the trainer's step count goes on from train()
    optimizer = trainer.module._step_optimizer
    assert optimizer is not None and all(state["step"] == 2 for state in optimizer.state.values())
    assert trainer.state.global_step == 4
    assert [entry["step"] for entry in trainer.state.log_history[-2:]] == [3, 4]
    assert trainer.state.log_history[-1]["loss/policy_avg"] == second["loss/policy_avg"]
    # the callbacks took part in the step() calls: BEMA went on averaging at steps 3 and 4
    assert bema._last_step == 4
