"""Online DPO the Lightning way: ``OnlineDPOModule`` + ``PromptDataModule`` + ``lightning.Trainer``.

    python examples/lightning/online_dpo.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

The policy completes each shipped question twice; a dense rule reward (does the completion contain a "2") picks the
chosen completion of each pair, and the DPO loss trains on the pair against a frozen copy of the starting model.
For a learned judge, pass ``judge=PairRMJudge(<a reward model>)`` in place of ``reward_funcs``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import OnlineDPOModule, PromptDataModule
from lightning_llm.rewards import ContainsReward

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/online_dpo")
    module = OnlineDPOModule(args.model, reward_funcs=[ContainsReward("2")], beta=0.1,
                             max_completion_length=8 if args.fast else 16, max_length=128, learning_rate=1e-2,
                             export_dir="hf")
    data = PromptDataModule("sample:prompt_only", batch_size=8)  # completions per step: 4 prompts x 2
    trainer = Trainer(max_steps=args.steps(40), log_every_n_steps=1, default_root_dir=str(args.output_dir),
                      logger=args.logger())
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    print(f"share of completions with a '2': {float(metrics['objective/scores']):.2f}, "
          f"reward margin {float(metrics['rewards/margins']):+.3f}")


if __name__ == "__main__":
    main()
