"""What a reward function gets besides the rows: the training state (``trainer_state``) and the two logging hooks
(``log_metric``, ``log_extra``), TRL's ``GRPOTrainer`` conventions.

The caller (an online module) builds a :class:`RewardState` per generation step and passes its own hooks; a
:class:`RewardLog` is a ready-made pair of hooks that collects what the reward functions log until the caller
takes it for the step's metrics and the completions table.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RewardState:
    """The training progress a reward function may shape its reward by (TRL passes its ``TrainerState``; these are
    the fields of it that reward functions read, under the same names).

    Attributes:
        global_step: optimizer steps taken so far.
        epoch: epochs done, fractional within the current one (TRL's ``state.epoch``).
        max_steps: the planned number of optimizer steps, ``None`` when unknown.
        is_world_process_zero: whether this is the global rank-0 process (the one that should write files).
    """

    global_step: int = 0
    epoch: float = 0.0
    max_steps: int | None = None
    is_world_process_zero: bool = True

    @classmethod
    def from_trainer(cls, trainer: Any) -> RewardState:
        """The state of a running ``lightning.Trainer``."""
        return cls(
            global_step=int(trainer.global_step),
            epoch=trainer.current_epoch + _epoch_fraction(trainer),
            max_steps=_planned_steps(trainer),
            is_world_process_zero=bool(trainer.is_global_zero),
        )


def _epoch_fraction(trainer: Any) -> float:
    """The fraction of the current epoch's batches already trained (0 when the epoch length is unknown: streams)."""
    try:
        total = float(trainer.num_training_batches)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    except (AttributeError, TypeError, RuntimeError):
        return 0.0
    return min(done / total, 1.0) if math.isfinite(total) and total > 0 else 0.0


def _planned_steps(trainer: Any) -> int | None:
    if getattr(trainer, "max_steps", -1) and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # no data loader yet, or an unsized one: the plan is unknown
        return None
    return int(steps) if isinstance(steps, (int, float)) and math.isfinite(steps) else None


class RewardLog:
    """Collects what reward functions log through the hooks: pass ``log.log_metric`` and ``log.log_extra`` to
    :func:`~lightning_llm.rewards.compute_rewards`, then take the values when the step logs.

    ``log_metric(name, value)`` records a scalar (TRL averages them over the logging step: :meth:`take_metrics`
    returns their means); ``log_extra(column, values)`` adds one value per completion to a column of the completions
    table (:meth:`take_extra`).
    """

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.extra: dict[str, list] = defaultdict(list)

    def log_metric(self, name: str, value: Any) -> None:
        """Record the scalar ``value`` of metric ``name`` for this step."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"log_metric: the metric name must be a non-empty string, got {name!r}")
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"log_metric({name!r}, ...): expected a number, got {value!r}") from error
        self.metrics[name].append(number)

    def log_extra(self, column: str, values: Sequence) -> None:
        """Add ``values`` (one per completion of the batch) to the completions-table column ``column``."""
        if not isinstance(column, str) or not column:
            raise ValueError(f"log_extra: the column name must be a non-empty string, got {column!r}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"log_extra({column!r}, ...): expected a list with one value per completion, "
                             f"got {type(values).__name__}")
        self.extra[column].extend(values)

    def take_metrics(self) -> dict[str, float]:
        """The mean of each metric logged since the last call; the record is emptied."""
        means = {name: sum(values) / len(values) for name, values in self.metrics.items() if values}
        self.metrics.clear()
        return means

    def take_extra(self) -> dict[str, list]:
        """The extra columns logged since the last call; the record is emptied."""
        columns = dict(self.extra)
        self.extra.clear()
        return columns
