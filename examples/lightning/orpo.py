"""ORPO the Lightning way: ``ORPOModule`` + ``PreferenceDataModule`` + ``lightning.Trainer``.

    python examples/lightning/orpo.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

An NLL loss on the chosen answers plus an odds-ratio term against the rejected ones; no reference model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import ORPOModule, PreferenceDataModule

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/orpo")
    module = ORPOModule(args.model, beta=0.1, learning_rate=1e-3, export_dir="hf")
    data = PreferenceDataModule("sample:preference", batch_size=8, max_length=args.max_length())
    trainer = Trainer(max_steps=args.steps(60), log_every_n_steps=1, gradient_clip_val=1.0,
                      default_root_dir=str(args.output_dir), logger=args.logger())
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    print(f"loss {float(metrics['loss']):.4f}, nll {float(metrics['nll_loss']):.4f}, "
          f"log odds ratio {float(metrics['log_odds_ratio']):+.4f}")


if __name__ == "__main__":
    main()
