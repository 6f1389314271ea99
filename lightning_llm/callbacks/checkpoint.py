"""``RunCheckpoint``: Lightning's ``ModelCheckpoint`` that also writes ``last.ckpt`` when ``fit`` ends."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (every argument its own; ``save_last`` on by default) that writes ``last.ckpt`` at the end
    of ``fit`` too, when the last steps were not saved yet.

    Lightning's checkpoints are written at their triggers only (every ``every_n_train_steps``, at validation, at an
    epoch's end), so a run stopped by ``max_steps`` between two triggers, or one shorter than the first trigger, would
    leave its last steps (or everything) unsaved. The policy of the shipped recipes: ``last.ckpt`` every
    ``every_n_train_steps`` steps and at the end, to resume from with ``--ckpt_path``.
    """

    def __init__(self, *args: Any, save_last: bool | str = True, **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
