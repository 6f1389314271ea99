"""SFT the Lightning way: ``SFTModule`` + ``SFTDataModule`` + ``lightning.Trainer``.

    python examples/lightning/sft.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

Trains on the shipped chat data (``messages`` rows), the loss on the assistant turns only; writes ``metrics.csv``,
``checkpoints/last.ckpt`` and the Hugging Face export ``hf/`` under the output directory, then answers a few questions.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Trainer

from lightning_llm import RunCheckpoint, SFTDataModule, SFTModule

sys.path.append(str(Path(__file__).resolve().parents[1]))  # examples/_common.py
from _common import parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "outputs/lightning/sft")
    module = SFTModule(args.model, learning_rate=3e-3, warmup_ratio=0.05, export_dir="hf")
    data = SFTDataModule("sample:messages", val_split=0.05, batch_size=16, max_length=args.max_length(),
                         assistant_only_loss=True)
    trainer = Trainer(max_steps=args.steps(200), val_check_interval=args.steps(50), check_val_every_n_epoch=None,
                      log_every_n_steps=1, gradient_clip_val=1.0, default_root_dir=str(args.output_dir),
                      logger=args.logger(),
                      callbacks=[RunCheckpoint(dirpath=str(args.output_dir / "checkpoints"))])
    trainer.fit(module, data)
    questions = ["What is 2 plus 3?", "What is the capital of France?", "What sound does a cow make?"]
    for question, answer in zip(questions, module.generate([[{"role": "user", "content": q}] for q in questions],
                                                           max_new_tokens=24)):
        print(f"{question!r} -> {answer!r}")


if __name__ == "__main__":
    main()
