"""Nash-MD the Lightning way: ``NashMDModule`` + ``PromptDataModule`` + ``lightning.Trainer``.

    python examples/lightning/nash_md.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

Each shipped question is completed once by the policy and once by the geometric mixture of policy and reference (a
frozen copy of the starting model; every token drawn from ``log_softmax(c · z_ref + (1 - c) · z_policy)``,
``c = mixture_coef``). A rule reward (does the completion contain a "2", weighted 5) gives the probability that the
policy's completion beats the mixture's, and the loss pushes the policy's log-prob of its own completion up by that
probability minus one half, less ``beta`` times its KL to the reference. For a learned judge, pass
``judge=PairRMJudge(<a reward model>)`` in place of ``reward_funcs``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import NashMDModule, PromptDataModule
from lightning_llm.rewards import ContainsReward

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/nash_md")
    module = NashMDModule(args.model, reward_funcs=[ContainsReward("2")], reward_weights=[5.0], beta=0.02,
                          mixture_coef=0.5, max_completion_length=8 if args.fast else 16, max_length=128,
                          rollout="fast", learning_rate=1e-2, export_dir="hf")  # a KV cache for each model
    data = PromptDataModule("sample:prompt_only", batch_size=8)  # 4 prompts x (the policy's, the mixture's)
    trainer = Trainer(max_steps=args.steps(40), log_every_n_steps=1, default_root_dir=str(args.output_dir),
                      logger=args.logger())
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    print(f"last step: the policy's reward {float(metrics['rewards/chosen']):.2f}, the mixture's "
          f"{float(metrics['rewards/rejected']):.2f} (5 x the share with a '2')")


if __name__ == "__main__":
    main()
