"""``JsonlPredictionWriter``: ``trainer.predict``'s completions, one JSON line per prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes what :meth:`~lightning_llm.modules.base.LLMModule.predict_step` returns (``index``, ``prompt``,
    ``completion`` of each prompt) as JSON lines, batch by batch, so nothing waits in memory.

    Args:
        output_path: the file (default ``<default_root_dir>/predictions.jsonl``); with several processes each writes
            its own, ``predictions.rank<r>.jsonl``, its lines carrying the rows' ``index``.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.path: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.output_path) if self.output_path else Path(trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self.path = path

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in prediction:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
