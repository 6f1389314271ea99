"""KTO the Lightning way: ``KTOModule`` + ``UnpairedPreferenceDataModule`` + ``lightning.Trainer``.

    python examples/lightning/kto.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

Unpaired feedback (``prompt``, ``completion``, ``label`` rows: was this answer good?); the data module adds the
mismatched prompt/completion pairs of KTO's KL term (``kl_pairs=True``, the default).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import KTOModule, UnpairedPreferenceDataModule

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/kto")
    module = KTOModule(args.model, beta=0.1, desirable_weight=0.6, learning_rate=5e-4, export_dir="hf")
    data = UnpairedPreferenceDataModule("sample:unpaired_preference", batch_size=8, max_length=args.max_length())
    trainer = Trainer(max_steps=args.steps(60), log_every_n_steps=1, gradient_clip_val=1.0,
                      default_root_dir=str(args.output_dir), logger=args.logger())
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    print(f"loss {float(metrics['loss']):.4f}, kl {float(metrics['kl']):.4f}")


if __name__ == "__main__":
    main()
