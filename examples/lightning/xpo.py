"""XPO the Lightning way: ``XPOModule`` + ``PromptDataModule`` + ``lightning.Trainer``.

    python examples/lightning/xpo.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

Each shipped question is completed once by the policy and once by the reference (a frozen copy of the starting
model); a dense rule reward (does the completion contain a "2") picks the chosen one of each pair, the DPO loss
trains on it, and ``alpha`` times the policy's log-prob of the reference's completion is added (XPO's exploration
term). For a learned judge, pass ``judge=PairRMJudge(<a reward model>)`` in place of ``reward_funcs``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import PromptDataModule, XPOModule
from lightning_llm.rewards import ContainsReward

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/xpo")
    module = XPOModule(args.model, reward_funcs=[ContainsReward("2")], beta=0.1, alpha=1e-3,
                       max_completion_length=8 if args.fast else 16, max_length=128, learning_rate=1e-2,
                       export_dir="hf")
    data = PromptDataModule("sample:prompt_only", batch_size=8)  # 4 prompts x (the policy's, the reference's)
    trainer = Trainer(max_steps=args.steps(40), log_every_n_steps=1, default_root_dir=str(args.output_dir),
                      logger=args.logger())
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    print(f"policy's share of completions with a '2': {float(metrics['objective/model_scores']):.2f}, "
          f"reward margin {float(metrics['rewards/margins']):+.3f}")


if __name__ == "__main__":
    main()
