"""A reward model the Lightning way: ``RewardModule`` + ``PreferenceDataModule`` + ``lightning.Trainer``.

    python examples/lightning/reward.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

The causal LM gets a one-output score head and learns to rank the chosen answer of each shipped preference pair
above the rejected one (Bradley-Terry); ``hf/`` is the trained reward model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import PreferenceDataModule, RewardModule

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/reward")
    module = RewardModule(args.model, learning_rate=1e-3, export_dir="hf")
    data = PreferenceDataModule("sample:preference", batch_size=8, max_length=args.max_length())
    trainer = Trainer(max_steps=args.steps(60), log_every_n_steps=1, gradient_clip_val=1.0,
                      default_root_dir=str(args.output_dir), logger=args.logger())
    trainer.fit(module, data)
    question = [{"role": "user", "content": "What is 1 plus 8?"}]
    right, wrong = module.score([question, question], ["1 plus 8 is 9.", "1 plus 8 is 10."])
    print(f"accuracy {float(trainer.callback_metrics['accuracy']):.2f}; reward of a right answer {right:+.3f}, "
          f"of a wrong one {wrong:+.3f}")


if __name__ == "__main__":
    main()
