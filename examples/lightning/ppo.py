"""PPO the Lightning way: ``PPOModule`` + ``PromptDataModule`` + ``lightning.Trainer``.

    python examples/lightning/ppo.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

Each step is one rollout: 8 shipped questions completed once each by the policy, scored by a rule reward (does the
completion contain a "2"), valued by a separate value model, then one PPO pass (``num_ppo_epochs=1``) in one
mini-batch of two micro-batches, so ``max_steps`` counts rollouts. TRL 1.12's PPO scores with a reward model instead:
pass ``reward_model=<a RewardModule export>`` in place of ``reward_funcs`` (the value model then starts from it;
``examples/trl_style_training_example.py`` does that). With a rule there is no reward model to start the value model
from, so it starts from the policy's checkpoint under a fresh one-label head.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import PPOModule, PromptDataModule
from lightning_llm.rewards import ContainsReward

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/ppo")
    module = PPOModule(args.model, reward_funcs=[ContainsReward("2")], num_ppo_epochs=1, num_mini_batches=1,
                       gradient_accumulation_steps=2, kl_coef=0.05, temperature=1.0,
                       max_completion_length=8 if args.fast else 16, learning_rate=1e-2, export_dir="hf")
    data = PromptDataModule("sample:prompt_only", batch_size=8)  # prompts per rollout (TRL's local_batch_size)
    # gradient_clip_val and accumulate_grad_batches stay unset: PPO optimizes by hand (max_grad_norm, above)
    trainer = Trainer(max_steps=args.steps(40), log_every_n_steps=1, default_root_dir=str(args.output_dir),
                      logger=args.logger())
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    print(f"last rollout: score {float(metrics['objective/scores']):.2f} (share of completions with a '2'), "
          f"KL to the reference {float(metrics['objective/kl']):+.3f}, "
          f"value loss {float(metrics['loss/value_avg']):.4f}")
    print(f"policy in {args.output_dir}/hf, value model in {args.output_dir}/hf/value_model")


if __name__ == "__main__":
    main()
