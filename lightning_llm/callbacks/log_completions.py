"""A table of sample completions during training, sent to every attached logger and to the console."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from lightning_llm.callbacks._generation import (
    GenerationSettings,
    check_prompt_arguments,
    generate_across_ranks,
    prompt_texts,
    resolve_prompts,
)

log = logging.getLogger(__name__)

COLUMNS = ("step", "prompt", "completion")
Row = tuple[int, str, str]


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (TensorBoard renders text summaries as Markdown)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """Append ``rows`` to the CSV file at ``path`` (written with a header when new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    is_new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if is_new:
            writer.writerow(COLUMNS)
        writer.writerows(rows)


def log_to_logger(logger: Logger, name: str, new_rows: Sequence[Row], all_rows: Sequence[Row], step: int) -> bool:
    """Send the table to ``logger`` if it is a kind that can show one; returns whether it was."""
    if isinstance(logger, WandbLogger):
        # W&B tables are immutable: log the whole history each time, as TRL does.
        logger.log_table(key=name, columns=list(COLUMNS), data=[list(row) for row in all_rows], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(name, markdown_table(new_rows), global_step=step)
    elif isinstance(logger, CSVLogger):
        write_csv(Path(logger.log_dir) / f"{name}.csv", new_rows)
    else:
        return False
    return True


def print_table(rows: Sequence[Row], title: str) -> None:
    """Print the rows as a rich table on the console (above a running rich progress display)."""
    from rich import get_console
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    table.add_column("step", justify="right")
    table.add_column("prompt", overflow="fold")
    table.add_column("completion", overflow="fold")
    for step, prompt, completion in rows:
        table.add_row(str(step), prompt, completion)
    get_console().print(table)


class LogCompletionsCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps (or at each validation), completes a few prompts with the policy and
    logs a ``step | prompt | completion`` table.

    Loggers: TensorBoard gets a Markdown text summary of the new rows, CSV loggers a ``<name>.csv`` in their log
    directory (rows appended), Weights & Biases the whole table so far (``log_table``); other loggers are skipped.
    The new rows are also printed on the console with rich. Generation is split across ranks; rank 0 writes.

    Args:
        prompts: prompts (strings or conversations); default the validation prompts of the trainer's datamodule.
        num_prompts: use at most this many prompts (``None``: all).
        every_n_steps: log every this many optimizer steps; ``None`` logs at the end of each validation instead.
        max_new_tokens: generation length limit.
        do_sample: sample (else greedy decoding).
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        batch_size: prompts per ``generate`` call.
        name: key of the table in the loggers (and stem of the CSV file).
        console: print the table on the console.
    """

    def __init__(
        self,
        prompts: list[str | list[dict]] | None = None,
        num_prompts: int | None = 8,
        every_n_steps: int | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 16,
        name: str = "completions",
        console: bool = True,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 (or None to log at each validation), got {every_n_steps}")
        if not name:
            raise ValueError("name must be a non-empty string")
        self.prompts = check_prompt_arguments(prompts, num_prompts)
        self.num_prompts = num_prompts
        self.every_n_steps = every_n_steps
        self.settings = GenerationSettings(max_new_tokens, do_sample, temperature, top_p, batch_size)
        self.name = name
        self.console = console
        self.rows: list[Row] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs on every micro-batch; act once per optimizer step.
        if self.every_n_steps is None or step == self._last_step or step == 0 or step % self.every_n_steps:
            return
        self.log_completions(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is None and not trainer.sanity_checking:
            self.log_completions(trainer, pl_module)

    def log_completions(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Row]:
        """Generate now and log the new rows (all ranks call; rank 0 logs); returns the new rows."""
        step = trainer.global_step
        self._last_step = step
        prompts = resolve_prompts(trainer, self.prompts, self.num_prompts)
        completions = generate_across_ranks(trainer, pl_module, prompts, self.settings)
        new_rows = [(step, text, completion)
                    for text, completion in zip(prompt_texts(pl_module.tokenizer, prompts), completions)]
        if trainer.is_global_zero:
            self.rows.extend(new_rows)
            for logger in trainer.loggers:
                if not log_to_logger(logger, self.name, new_rows, self.rows, step):
                    log.debug("LogCompletionsCallback: %s cannot show tables; skipped", type(logger).__name__)
            if self.console:
                print_table(new_rows, f"{self.name} at step {step}")
        return new_rows
