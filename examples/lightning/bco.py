"""BCO the Lightning way: ``BCOModule`` + ``UnpairedPreferenceDataModule`` + ``lightning.Trainer``.

    python examples/lightning/bco.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

Binary classifier optimisation on unpaired feedback; the reward shift is a running mean of the rewards (kept in
the checkpoints). BCO needs no KL pairs (``kl_pairs=False``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import BCOModule, UnpairedPreferenceDataModule

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/bco")
    module = BCOModule(args.model, beta=0.1, learning_rate=5e-4, export_dir="hf")
    data = UnpairedPreferenceDataModule("sample:unpaired_preference", batch_size=8, max_length=args.max_length(),
                                        kl_pairs=False)
    trainer = Trainer(max_steps=args.steps(60), log_every_n_steps=1, gradient_clip_val=1.0,
                      default_root_dir=str(args.output_dir), logger=args.logger())
    trainer.fit(module, data)
    print(f"loss {float(trainer.callback_metrics['loss']):.4f}, running reward mean {module.running.mean:+.4f}")


if __name__ == "__main__":
    main()
