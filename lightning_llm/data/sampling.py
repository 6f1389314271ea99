"""Where a training epoch starts: the per-epoch shuffle, each process's share, and the position a resumed run
continues from.

A run killed at any step and resumed from its last checkpoint must see the batches the uninterrupted run saw. Two
pieces make that so:

- :class:`EpochSampler` orders an epoch by ``seed + epoch`` alone (not by a generator that advanced through earlier
  epochs), shares the order out across processes exactly as ``torch``'s ``DistributedSampler`` does, and can start
  ``skip`` indices into the epoch;
- :class:`GenerationSampler` does the same for the online algorithms, in TRL's repeat-sampler order (each prompt
  ``num_generations`` times, each generation batch drawn ``steps_per_generation * num_iterations`` times);
- :func:`resume_position` reads, from the trainer's progress counters that Lightning saves in every checkpoint and
  restores before it asks for the data loader, which epoch the run is in and how many of its batches were trained.

Lightning's own resumable-loader path (a loader with ``state_dict``, e.g. torchdata's ``StatefulDataLoader``) is not
used: for a loader without a length Lightning fetches one batch ahead, so the loader's saved state is one batch past
the last trained one (torchdata issue #1520), and in epoch-bounded runs the state is dropped when the optimizer set-up
asks for ``trainer.estimated_stepping_batches`` (Lightning issue #20550). The progress counters have neither problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """Indices of one epoch for process ``rank`` of ``world_size``: ``randperm(num_rows)`` seeded by ``seed + epoch``
    (or ``0..num_rows-1`` without ``shuffle``), padded by repeating its start to a multiple of ``world_size``, every
    ``world_size``-th index from ``rank`` (``DistributedSampler``'s order), the first ``skip`` of them left out.

    ``len()`` is the whole epoch's share, so that Lightning's batch count for the epoch stays right when a resumed
    epoch starts part-way. Lightning calls :meth:`set_epoch` at each epoch start; a new epoch starts from its first
    index. It is a ``DistributedSampler`` so that Lightning, which wraps any other sampler to shard it, leaves it as
    it is.
    """

    def __init__(self, num_rows: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, skip: int = 0) -> None:
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        # DistributedSampler's own set-up is not run: it would look up the process group, and the order is ours.
        self.num_rows = num_rows
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.skip = skip
        self.num_samples = math.ceil(num_rows / world_size)
        self.num_replicas, self.total_size, self.drop_last = world_size, self.num_samples * world_size, False

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.skip = 0

    def order(self) -> list[int]:
        """This process's indices of the current epoch, from its start."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            indices = list(range(self.num_rows))
        total = self.num_samples * self.world_size
        indices += (indices * math.ceil(total / len(indices)))[: total - len(indices)]
        return indices[self.rank: total: self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self.order()[self.skip:]
        self.skip = 0  # a later pass over the same epoch (a second fit) starts from the beginning
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples


def resume_position(trainer: Any) -> tuple[int, int]:
    """``(epoch, batches of it already trained)`` for the training data loader Lightning is about to build.

    A fresh run starts at ``(trainer's epoch, 0)``. A run resumed from a checkpoint continues in the checkpoint's
    epoch after the batches it trained; a checkpoint written after the last batch of an epoch continues with the next
    epoch from its start (see :func:`finish_epoch_of_last_batch_checkpoint`).
    """
    if trainer is None:
        return 0, 0
    loop = trainer.fit_loop
    epoch = loop.epoch_progress.current.processed
    batches = loop.epoch_loop.batch_progress
    if not loop.restarting or batches.is_last_batch:
        return epoch, 0
    return epoch, batches.current.processed


def finish_epoch_of_last_batch_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Make a checkpoint written at the end of an epoch's last batch resume with the next epoch's first batch.

    Lightning restores such a checkpoint (its batch counter says the epoch's last batch ran, its epoch counter that the
    epoch did not end yet) by running on in the finished epoch, or by closing it and then running the next one with
    the old epoch's batch counter; either way the resumed run does not see the next epoch's batches as the
    uninterrupted run did. The loop counters are set to those of a checkpoint written at the start of the next epoch,
    before its first batch, which Lightning resumes from that batch with the epoch-start hooks. Returns whether the
    checkpoint was changed.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop")
    if not loops:
        return False
    batches, epochs = loops.get("epoch_loop.batch_progress"), loops.get("epoch_progress")
    if not batches or not epochs or not batches.get("is_last_batch"):
        return False
    current, epoch = batches["current"], epochs["current"]
    if current["completed"] != current["processed"] - 1 or epoch["processed"] != epoch["started"] - 1:
        return False
    batches["total"]["completed"] += 1
    batches["current"] = {key: 0 for key in current}
    batches["is_last_batch"] = False
    for tracker in (epochs["total"], epochs["current"]):
        finished = tracker["started"]
        tracker.update(ready=finished + 1, started=finished, processed=finished, completed=finished)
    # (the logging step, ``_batches_that_stepped``, Lightning advances itself on every restart)
    return True


@dataclass(frozen=True)
class GenerationSchedule:
    """How an online algorithm draws its prompts (TRL's repeat-sampler semantics).

    Attributes:
        num_generations: completions generated per prompt (a group); the prompt's index repeats this many times in a
            row.
        steps_per_generation: micro-batches each generation batch is split into (one loader batch holds
            ``batch_size * steps_per_generation`` completions of one process).
        num_iterations: passes over each generation batch (TRL's μ) before the next is generated.
        num_generations_eval: completions per prompt for validation (default ``num_generations``).
    """

    num_generations: int = 1
    steps_per_generation: int = 1
    num_iterations: int = 1
    num_generations_eval: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_generations", "steps_per_generation", "num_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.num_generations_eval is not None and (not isinstance(self.num_generations_eval, int)
                                                      or self.num_generations_eval < 1):
            raise ValueError(f"num_generations_eval must be a whole number >= 1 or None, got "
                             f"{self.num_generations_eval!r}")

    @property
    def repeats(self) -> int:
        """Loader batches drawn from each generation batch: ``steps_per_generation * num_iterations``."""
        return self.steps_per_generation * self.num_iterations

    @property
    def eval_generations(self) -> int:
        return self.num_generations_eval or self.num_generations

    def unique_prompts(self, batch_size: int, world_size: int) -> int:
        """Distinct prompts per generation batch of ``batch_size`` completions per micro-batch and process; raises a
        ``ValueError`` naming the settings when ``num_generations`` does not divide the generation batch."""
        completions = batch_size * self.steps_per_generation * world_size
        if completions % self.num_generations:
            raise ValueError(
                f"num_generations={self.num_generations} must divide the generation batch: batch_size={batch_size} x "
                f"steps_per_generation={self.steps_per_generation} x {world_size} process(es) = {completions} "
                "completions; change batch_size, steps_per_generation or num_generations"
            )
        return completions // self.num_generations


class GenerationSampler(DistributedSampler):
    """Training indices of one epoch for process ``rank`` of ``world_size``, as ``(row, generation, repeat)``.

    The epoch's order is ``randperm(num_rows)`` seeded by ``seed + epoch`` (the same on every process), cut into chunks
    of ``unique_prompts`` rows (an incomplete last chunk is dropped, as TRL's ``RepeatSampler`` does). Each chunk is one
    generation batch: every row repeated ``num_generations`` times in a row, the ``world_size`` processes taking
    consecutive equal shares (so a group may span processes), and the whole generation batch drawn ``repeats`` times
    in a row (``steps_per_generation * num_iterations`` loader batches). ``generation`` numbers the generation batches
    of the run (``epoch * chunks + chunk``), ``repeat`` counts the draws of one.

    ``skip`` leaves out the first indices of the epoch (a resumed run); ``len()`` is the whole epoch's share.
    """

    def __init__(self, num_rows: int, schedule: GenerationSchedule, *, unique_prompts: int, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, epoch: int = 0, skip: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if unique_prompts < 1:
            raise ValueError(f"unique_prompts must be >= 1, got {unique_prompts}")
        if num_rows < unique_prompts:
            raise ValueError(
                f"a generation batch needs {unique_prompts} distinct prompts but the data has {num_rows} rows; give "
                "more prompts or lower batch_size / steps_per_generation"
            )
        self.num_rows = num_rows
        self.schedule = schedule
        self.unique_prompts = unique_prompts
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.skip = skip
        self.chunks = num_rows // unique_prompts
        self.share = unique_prompts * schedule.num_generations // world_size  # indices per process per draw
        self.num_samples = self.chunks * schedule.repeats * self.share
        self.num_replicas, self.total_size, self.drop_last = world_size, self.num_samples * world_size, True

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.skip = 0

    def order(self) -> list[tuple[int, int, int]]:
        """This process's ``(row, generation, repeat)`` of the current epoch, from its start."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            rows = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            rows = list(range(self.num_rows))
        n = self.schedule.num_generations
        out = []
        for chunk in range(self.chunks):
            expanded = [row for row in rows[chunk * self.unique_prompts: (chunk + 1) * self.unique_prompts]
                        for _ in range(n)]
            mine = expanded[self.rank * self.share: (self.rank + 1) * self.share]
            generation = self.epoch * self.chunks + chunk
            for repeat in range(self.schedule.repeats):
                out += [(row, generation, repeat) for row in mine]
        return out

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        order = self.order()[self.skip:]
        self.skip = 0
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples


class GroupedEvalSampler(DistributedSampler):
    """Validation indices for process ``rank``: every row ``num_generations`` times in a row, in order, cut into global
    batches of ``batch_size * world_size`` indices of which each process takes its consecutive share (so the groups
    of a batch are whole once gathered). The last batch is completed with the first groups again; ``generation``
    numbers the global batches, ``repeat`` is 0.
    """

    def __init__(self, num_rows: int, num_generations: int, *, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if (batch_size * world_size) % num_generations:
            raise ValueError(
                f"num_generations_eval={num_generations} must divide the validation batch: val_batch_size={batch_size} "
                f"x {world_size} process(es) = {batch_size * world_size} completions"
            )
        self.num_rows = num_rows
        self.num_generations = num_generations
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        groups_per_batch = batch_size * world_size // num_generations
        self.batches = math.ceil(num_rows / groups_per_batch)
        self.groups_per_batch = groups_per_batch
        self.num_samples = self.batches * batch_size
        self.num_replicas, self.total_size, self.drop_last, self.shuffle = world_size, self.num_samples * world_size, \
            False, False

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        total = self.batches * self.groups_per_batch
        rows = [k % self.num_rows for k in range(total)]
        out = []
        for batch in range(self.batches):
            expanded = [row for row in rows[batch * self.groups_per_batch: (batch + 1) * self.groups_per_batch]
                        for _ in range(self.num_generations)]
            out += [(row, batch, 0) for row in expanded[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]]
        return iter(out)

    def __len__(self) -> int:
        return self.num_samples
