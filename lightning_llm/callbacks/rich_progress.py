"""Lightning's rich progress bar with a live table of every logged metric, grouped by prefix."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar


def group_metrics(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"rewards/chosen": 1, "loss": 2}`` → ``{"rewards": {"chosen": 1}, "": {"loss": 2}}``.

    The group is the text before the first ``/`` (``""`` for names without one); ``val/rewards/chosen`` goes to
    ``val`` as ``rewards/chosen``. Ungrouped metrics come first, then groups in alphabetical order.
    """
    groups: dict[str, dict[str, float]] = {}
    for name in sorted(metrics):
        group, _, rest = name.partition("/")
        group, rest = (group, rest) if rest else ("", name)
        groups.setdefault(group, {})[rest] = metrics[name]
    return dict(sorted(groups.items(), key=lambda item: (item[0] != "", item[0])))


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one-element numeric entries of ``metrics`` as floats (one device sync for all tensors)."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if tensors:
        stacked = torch.stack([t.detach().reshape(()).float().cpu() for t in tensors.values()]).tolist()
        values.update(zip(tensors, stacked))
    return values


def format_value(value: float, float_format: str) -> str:
    """``value`` formatted with ``float_format`` (integers as integers)."""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return format(value, float_format)


class RichProgressCallback(RichProgressBar):
    """Lightning's ``RichProgressBar`` plus a table of the latest value of every logged metric
    (``trainer.callback_metrics``), one panel per name prefix (``rewards/``, ``logps/``, ``val/``, ... and the
    ungrouped ones), redrawn in place under the bars.

    The table is refreshed after each optimizer step and each validation. On a terminal it updates live; when the
    output is not a terminal (CI logs, files) rich draws the display once, when it stops, so the log ends with
    the final bars and metrics.

    Args:
        refresh_rate: redraws per second; 0 disables the display.
        leave: keep each finished epoch's bar on screen.
        console_kwargs: keyword arguments of the ``rich.console.Console`` (``file``, ``width``,
            ``force_terminal``...).
        float_format: format spec of the metric values.
        show_table: show the metrics table (else this is the plain ``RichProgressBar``).
    """

    def __init__(
        self,
        refresh_rate: int = 10,
        leave: bool = False,
        console_kwargs: dict[str, Any] | None = None,
        float_format: str = ".4g",
        show_table: bool = True,
    ) -> None:
        try:
            format(1.5, float_format)
        except ValueError as error:
            raise ValueError(f"float_format {float_format!r} is not a valid float format spec") from error
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs)
        self.float_format = float_format
        self.show_table = show_table
        self.metrics: dict[str, float] = {}
        self._metrics_step: int | None = None
        self._step = 0

    # -------------------------------------------------------------------------------------------- rendering
    def metrics_renderable(self) -> Any:
        """The grouped metrics table as a rich renderable (``None`` when there is nothing to show)."""
        from rich.columns import Columns
        from rich.panel import Panel
        from rich.table import Table

        metrics = self.metrics  # replaced, never mutated: safe to read from rich's refresh thread
        if not metrics:
            return None
        panels = []
        for group, values in group_metrics(metrics).items():
            table = Table(box=None, show_header=False, padding=(0, 1))
            table.add_column("metric", no_wrap=True)
            table.add_column("value", justify="right")
            for name, value in values.items():
                table.add_row(name, format_value(value, self.float_format))
            panels.append(Panel(table, title=f"[bold]{group}/[/]" if group else None, title_align="left",
                                border_style="cyan", expand=False))
        return Panel(Columns(panels), title=f"step {self._step}", title_align="left", border_style="green")

    def _init_progress(self, trainer: L.Trainer) -> None:
        super()._init_progress(trainer)
        progress = self.progress
        if progress is None or not self.show_table or getattr(progress, "_metrics_table_added", False):
            return
        bars = progress.get_renderables

        def with_table() -> Iterable[Any]:
            yield from bars()
            table = self.metrics_renderable()
            if table is not None:
                yield table

        # Progress.get_renderables is rich's documented extension point for what the live display shows.
        progress.get_renderables = with_table
        progress._metrics_table_added = True

    # ----------------------------------------------------------------------------------------------- updates
    def update_metrics_table(self, trainer: L.Trainer, force: bool = False) -> None:
        """Read ``trainer.callback_metrics`` into the table (once per optimizer step unless ``force``)."""
        if not self.show_table or (not force and self._metrics_step == trainer.global_step):
            return
        self._metrics_step = trainer.global_step
        self._step = trainer.global_step
        self.metrics = scalar_metrics(trainer.callback_metrics)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.update_metrics_table(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.update_metrics_table(trainer, force=True)
        self.refresh()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.update_metrics_table(trainer, force=True)
        self.refresh()

    def _get_train_description(self, current_epoch: int) -> str:
        # Post-training runs are usually bounded by max_steps (max_epochs -1): show the step count, not "Epoch 1/-2".
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            description += f" (max_steps {trainer.max_steps})"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger version says nothing about training
        return items
