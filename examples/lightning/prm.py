"""A process reward model the Lightning way: ``PRMModule`` + ``StepwiseDataModule`` + ``lightning.Trainer``.

    python examples/lightning/prm.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

Each row is a prompt and its reasoning steps, each step labelled right or wrong; the model gets a two-class token
head and learns the label of every step from the step's last token.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import PRMModule, StepwiseDataModule

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/prm")
    module = PRMModule(args.model, learning_rate=3e-3, export_dir="hf")
    data = StepwiseDataModule("sample:stepwise", val_split=0.1, batch_size=8, max_length=args.max_length(256),
                              step_separator="\n")
    trainer = Trainer(max_steps=args.steps(60), val_check_interval=args.steps(20), check_val_every_n_epoch=None,
                      log_every_n_steps=1, gradient_clip_val=1.0, default_root_dir=str(args.output_dir),
                      logger=args.logger())
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    print(f"loss {float(metrics['loss']):.4f}, step accuracy on held-out rows {float(metrics['val/accuracy']):.2f}")


if __name__ == "__main__":
    main()
