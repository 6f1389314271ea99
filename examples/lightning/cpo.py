"""CPO and SimPO the Lightning way: ``CPOModule`` + ``PreferenceDataModule`` + ``lightning.Trainer``.

    python examples/lightning/cpo.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

SimPO here (``loss_type="simpo"``, length-normalised rewards with a target margin ``simpo_gamma``, no NLL term with
``cpo_alpha=0``); ``loss_type="sigmoid"`` with ``cpo_alpha=1`` is CPO. No reference model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import CPOModule, PreferenceDataModule

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/cpo")
    module = CPOModule(args.model, loss_type="simpo", beta=0.1, simpo_gamma=0.5, cpo_alpha=0.0, learning_rate=1e-3,
                       export_dir="hf")
    data = PreferenceDataModule("sample:preference", batch_size=8, max_length=args.max_length())
    trainer = Trainer(max_steps=args.steps(60), log_every_n_steps=1, gradient_clip_val=1.0,
                      default_root_dir=str(args.output_dir), logger=args.logger())
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    print(f"loss {float(metrics['loss']):.4f}, reward margin {float(metrics['rewards/margins']):+.4f}")


if __name__ == "__main__":
    main()
