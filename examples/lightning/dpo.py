"""DPO the Lightning way: ``DPOModule`` + ``PreferenceDataModule`` + ``lightning.Trainer``.

    python examples/lightning/dpo.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

Sigmoid DPO against a frozen copy of the starting model (the reference) on the shipped preference pairs; point
``--model`` at an SFT export (e.g. ``outputs/lightning/sft/hf``) to start from a trained policy.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import DPOModule, PreferenceDataModule

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/dpo")
    module = DPOModule(args.model, beta=0.1, loss_type="sigmoid", learning_rate=5e-4, export_dir="hf")
    data = PreferenceDataModule("sample:preference", batch_size=8, max_length=args.max_length())
    trainer = Trainer(max_steps=args.steps(60), log_every_n_steps=1, gradient_clip_val=1.0,
                      default_root_dir=str(args.output_dir), logger=args.logger())
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    print(f"loss {float(metrics['loss']):.4f}, reward margin {float(metrics['rewards/margins']):+.4f}, "
          f"pair accuracy {float(metrics['rewards/accuracies']):.2f}")


if __name__ == "__main__":
    main()
