"""Streaming datasets: rows validated and tokenized as they stream through, never materialised.

:class:`ExampleStream` wraps a ``datasets.IterableDataset`` (or any re-iterable of row dicts) as a torch
``IterableDataset`` that yields, per round, this process's list of encoded examples (one batch: the data loader
runs with ``batch_size=None`` and collates each list). Rows are read in *rounds* of ``batch_size × world_size``:
every process reads every row (the stream has no random access) and validates it, so a bad row fails on every
process at once, naming its index in the stream, before the batch that holds it trains; each process then tokenizes
only its own ``batch_size`` rows of the round. The last, shorter round is split evenly so that every process still
runs the same number of steps (fewer rows than processes are left out, and logged). Memory holds one round, whatever
the length of the stream.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)

#: ``(rows, indices) -> examples``: validates every row, encodes them, drops what encoding drops
EncodeRows = Callable[[list[dict], list[int]], list[dict]]
#: ``rows, indices -> None``: raises naming the first bad row
ValidateRows = Callable[[list[dict], list[int]], None]


class ExampleStream(IterableDataset):
    """Batches (lists) of encoded examples of a stream of rows, each process its share (see the module docstring).

    Args:
        source: the rows: a ``datasets.IterableDataset`` or any iterable that can be iterated again each epoch.
        validate: checks a round's rows (every process checks every row).
        encode: encodes this process's rows of a round (examples dropped by encoding are left out).
        finalize_block: applied to each process's encoded examples of a round (e.g. KTO's mismatched pairs).
        name: how errors call this data (``train_data``, ``val_data``).
        batch_size: rows per process per round (the data loader's batch size).
        shuffle: shuffle a ``datasets.IterableDataset`` with its buffer shuffle, seeded by ``seed + epoch``.
        seed: shuffling seed.
        buffer_size: rows in the shuffle buffer.
    """

    def __init__(self, source: Iterable[dict], *, validate: ValidateRows, encode: EncodeRows,
                 finalize_block: Callable[[list[dict]], list[dict]] | None = None, name: str = "train_data",
                 batch_size: int = 8, shuffle: bool = False, seed: int = 0, buffer_size: int = 1000) -> None:
        super().__init__()
        self.source = source
        self.validate = validate
        self.encode = encode
        self.finalize_block = finalize_block
        self.name = name
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_size = buffer_size
        self.rank = 0
        self.world_size = 1
        self.epoch = 0  # the epoch the next pass runs
        self.skip_rounds = 0  # rounds of that pass already trained (a resumed run)

    def for_process(self, rank: int, world_size: int) -> ExampleStream:
        """Take process ``rank``'s share of each round (of ``world_size`` processes)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        return self

    def start_at(self, epoch: int, trained_rounds: int = 0) -> ExampleStream:
        """Make the next pass epoch ``epoch`` (its shuffle is seeded by ``seed + epoch``), continuing after its first
        ``trained_rounds`` rounds, which are read but neither validated nor encoded again."""
        self.epoch, self.skip_rounds = epoch, trained_rounds
        return self

    def _rows(self, epoch: int) -> Iterable[dict]:
        source = self.source
        if self.shuffle and hasattr(source, "shuffle"):
            source = source.shuffle(seed=self.seed, buffer_size=self.buffer_size)
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)
        return source

    def rounds(self, skip: int = 0, epoch: int | None = None) -> Iterator[tuple[list[int], list[dict]]]:
        """``(indices, rows)`` of this process's share of each round after the first ``skip``, every row of the round
        validated."""
        round_size = self.batch_size * self.world_size
        worker = get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        rows = iter(self._rows(self.epoch if epoch is None else epoch))
        for number in itertools.count():
            block = list(itertools.islice(rows, round_size))
            if not block:
                return
            if number < skip or number % num_workers != worker_id:  # trained already, or another worker's turn
                continue
            start = number * round_size
            indices = list(range(start, start + len(block)))
            self.validate(block, indices)
            if len(block) == round_size:
                lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
            elif len(block) < self.world_size:
                log.warning("%s: the last %d rows of the stream (rows %d-%d) are left out: fewer than the %d "
                            "processes, which must all run the same number of steps", self.name, len(block),
                            indices[0], indices[-1], self.world_size)
                return
            else:
                lo, hi = len(block) * self.rank // self.world_size, len(block) * (self.rank + 1) // self.world_size
            yield indices[lo:hi], block[lo:hi]

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        skip = self.skip_rounds
        source_epoch = self.epoch
        self.epoch, self.skip_rounds = self.epoch + 1, 0
        for indices, rows in self.rounds(skip, source_epoch):
            examples = self.encode(rows, indices)
            if not examples:
                if self.world_size > 1:
                    raise ValueError(
                        f"{self.name}: every row of this process's share of the stream (rows {indices[0]}-"
                        f"{indices[-1]}) was dropped in preparation; with a stream on several processes each needs a "
                        "batch per round: raise max_length or use on_overflow='truncate'"
                    )
                continue
            if self.finalize_block is not None:
                examples = self.finalize_block(examples)
            yield examples
