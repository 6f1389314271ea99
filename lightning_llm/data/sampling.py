"""Where a training epoch starts: the per-epoch shuffle, each process's share, and the position a resumed run
continues from.

A run killed at any step and resumed from its last checkpoint must see the batches the uninterrupted run saw. Two
pieces make that so:

- :class:`EpochSampler` orders an epoch by ``seed + epoch`` alone (not by a generator that advanced through earlier
  epochs), shares the order out across processes exactly as ``torch``'s ``DistributedSampler`` does, and can start
  ``skip`` indices into the epoch;
- :func:`resume_position` reads, from the trainer's progress counters that Lightning saves in every checkpoint and
  restores before it asks for the data loader, which epoch the run is in and how many of its batches were trained.

Lightning's own resumable-loader path (a loader with ``state_dict``, e.g. torchdata's ``StatefulDataLoader``) is not
used: for a loader without a length Lightning fetches one batch ahead, so the loader's saved state is one batch past
the last trained one (torchdata issue #1520), and in epoch-bounded runs the state is dropped when the optimizer set-up
asks for ``trainer.estimated_stepping_batches`` (Lightning issue #20550). The progress counters have neither problem.
"""

from __future__ import annotations

import math
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
