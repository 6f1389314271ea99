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
Row = tuple


def markdown_table(rows: Sequence[Row], columns: Sequence[str] = COLUMNS) -> str:
    """The rows as a Markdown table (TensorBoard renders text summaries as Markdown)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Row], columns: Sequence[str] = COLUMNS) -> None:
    """Append ``rows`` to the CSV file at ``path`` (written with a header when new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    is_new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if is_new:
            writer.writerow(columns)
        writer.writerows(rows)


def log_to_logger(logger: Logger, name: str, new_rows: Sequence[Row], all_rows: Sequence[Row], step: int,
                  columns: Sequence[str] = COLUMNS) -> bool:
    """Send the table to ``logger`` if it is a kind that can show one; returns whether it was."""
    if isinstance(logger, WandbLogger):
        # W&B tables are immutable: log the whole history each time, as TRL does.
        logger.log_table(key=name, columns=list(columns), data=[list(row) for row in all_rows], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(name, markdown_table(new_rows, columns), global_step=step)
    elif isinstance(logger, CSVLogger):
        write_csv(Path(logger.log_dir) / f"{name}.csv", new_rows, columns)
    else:
        return False
    return True


def print_table(rows: Sequence[Row], title: str, columns: Sequence[str] = COLUMNS) -> None:
    """Print the rows as a rich table on the console (above a running rich progress display)."""
    from rich import get_console
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    for column in columns:
        table.add_column(column, justify="right" if column == "step" else "left", overflow="fold")
    for row in rows:
        table.add_row(*(f"{value:.3f}" if isinstance(value, float) else str(value) for value in row))
    get_console().print(table)


def rollout_rows(step: int, rollouts: Sequence[dict], tokenizer: Any) -> tuple[list[str], list[Row]]:
    """``(columns, rows)`` of an online module's rollouts (TRL's ``log_completions`` table): the rendered prompt, the
    completion's text, each reward, the advantage and the columns reward functions added with ``log_extra``."""
    columns = ["step", "prompt", "completion"]
    for row in rollouts:
        columns += [key for key in row if key not in ("prompt", "completion") and key not in columns]
    rows = []
    for row in rollouts:
        completion = row["completion"]
        if isinstance(completion, list):
            completion = "".join(str(message.get("content", "")) for message in completion)
        prompt = prompt_texts(tokenizer, [row["prompt"]])[0]
        rows.append((step, prompt, completion, *(row.get(column) for column in columns[3:])))
    return columns, rows


class LogCompletionsCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps (or at each validation), completes a few prompts with the policy and
    logs a ``step | prompt | completion`` table. With an online module (GRPO, RLOO, ...) it logs the completions the
    module trained on instead, as TRL's ``log_completions`` does: ``step | prompt | completion | rewards/<name> ... |
    advantage`` (and the columns reward functions add with ``log_extra``), at each new generation batch.

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
        source: ``generate`` (complete ``prompts`` with the policy), ``rollouts`` (an online module's training
            rollouts, at most ``num_prompts`` rows per generation batch; ``every_n_steps`` then thins them out), or
            ``auto``: rollouts for an online module when no ``prompts`` are given, else generate.
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
        source: str = "auto",
    ) -> None:
        if source not in ("auto", "generate", "rollouts"):
            raise ValueError(f"source must be 'auto', 'generate' or 'rollouts', got {source!r}")
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
        self.source = source
        self.rows: list[Row] = []
        self.columns: list[str] = list(COLUMNS)
        self._last_step = -1
        self._last_generation: int | None = None

    def logs_rollouts(self, pl_module: L.LightningModule) -> bool:
        """Whether this callback logs ``pl_module``'s training rollouts (rather than generating)."""
        online = hasattr(pl_module, "rollout_table")
        if self.source == "rollouts" and not online:
            raise ValueError(f"LogCompletionsCallback(source='rollouts') needs an online module (GRPO, RLOO, ...), "
                             f"got {type(pl_module).__name__}")
        return self.source == "rollouts" or (self.source == "auto" and online and self.prompts is None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.logs_rollouts(pl_module):
            buffer = getattr(pl_module, "_buffer", None)
            generation = buffer.generation if buffer is not None else getattr(pl_module, "rollout_generation", None)
            if generation is None or generation == self._last_generation:
                return
            if self.every_n_steps is not None and step % self.every_n_steps:
                return
            self._last_generation = generation
            self.log_rollouts(trainer, pl_module)
            return
        # With gradient accumulation this hook runs on every micro-batch; act once per optimizer step.
        if self.every_n_steps is None or step == self._last_step or step == 0 or step % self.every_n_steps:
            return
        self.log_completions(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is None and not trainer.sanity_checking and not self.logs_rollouts(pl_module):
            self.log_completions(trainer, pl_module)

    def log_rollouts(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Row]:
        """Log the online module's last generation batch (every rank calls; rank 0 logs); returns the new rows."""
        table = pl_module.rollout_table()
        if self.num_prompts is not None:
            table = table[: self.num_prompts]
        columns, new_rows = rollout_rows(trainer.global_step, table, pl_module.tokenizer)
        if not self.rows:
            self.columns = columns
        new_rows = [tuple(dict(zip(columns, row)).get(column) for column in self.columns) for row in new_rows]
        self._publish(trainer, new_rows)
        return new_rows

    def _publish(self, trainer: L.Trainer, new_rows: list[Row]) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero:
            return
        self.rows.extend(new_rows)
        for logger in trainer.loggers:
            if not log_to_logger(logger, self.name, new_rows, self.rows, step, self.columns):
                log.debug("LogCompletionsCallback: %s cannot show tables; skipped", type(logger).__name__)
        if self.console:
            print_table(new_rows, f"{self.name} at step {step}", self.columns)

    def log_completions(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Row]:
        """Generate now and log the new rows (all ranks call; rank 0 logs); returns the new rows."""
        step = trainer.global_step
        self._last_step = step
        prompts = resolve_prompts(trainer, self.prompts, self.num_prompts)
        completions = generate_across_ranks(trainer, pl_module, prompts, self.settings)
        new_rows = [(step, text, completion)
                    for text, completion in zip(prompt_texts(pl_module.tokenizer, prompts), completions)]
        self._publish(trainer, new_rows)
        return new_rows
