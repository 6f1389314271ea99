"""RLOO the Lightning way: ``RLOOModule`` + ``PromptDataModule`` + ``lightning.Trainer``.

    python examples/lightning/rloo.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

REINFORCE leave-one-out: each of a prompt's four completions is rewarded against the mean of the other three; a KL
penalty to the frozen starting policy (``beta``) is part of the reward. The rewards are those of ``grpo.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import PromptDataModule, RLOOModule
from lightning_llm.rewards import ContainsReward, accuracy_reward

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/rloo")
    module = RLOOModule(args.model, reward_funcs=[accuracy_reward, ContainsReward("2")], num_generations=4,
                        beta=0.05, max_completion_length=8 if args.fast else 16, learning_rate=1e-2, export_dir="hf")
    data = PromptDataModule("sample:prompt_only", batch_size=8)  # completions per step: 2 prompts x 4
    trainer = Trainer(max_steps=args.steps(40), log_every_n_steps=1, default_root_dir=str(args.output_dir),
                      logger=args.logger())
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    print(f"mean reward {float(metrics['reward']):.3f}, completions contain a '2': "
          f"{float(metrics['rewards/contains_2/mean']):.2f}")


if __name__ == "__main__":
    main()
