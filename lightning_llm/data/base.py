"""``LLMDataModule``: what every data module shares (sources, validation split, tokenizer, loaders, reports).

Subclasses say how a validated row becomes a tokenized example (:meth:`LLMDataModule.encode`) and how examples
become a batch (:meth:`LLMDataModule.collate`). Everything is validated and tokenized in :meth:`setup`, before the
first training step, so a bad row fails fast with a message naming it.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import PreTrainedTokenizerBase

from lightning_llm.data.chat import ensure_chat_template
from lightning_llm.data.formats import DataFormat, detect_format, validate_rows
from lightning_llm.data.sources import DataSource, load_rows, split_rows
from lightning_llm.models.loading import load_tokenizer

log = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_start", "keep_end")
OVERFLOW_POLICIES = ("truncate", "drop", "error")


class ExampleDataset(Dataset):
    """A list of tokenized examples as a map-style dataset."""

    def __init__(self, examples: Sequence[dict]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


@dataclass
class PreparationReport:
    """What preparation did to one split: rows in, examples out, and rows dropped by reason (with row indices)."""

    split: str
    rows: int = 0
    examples: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)

    def drop(self, reason: str, row: int) -> None:
        self.dropped.setdefault(reason, []).append(row)

    @property
    def num_dropped(self) -> int:
        return sum(len(rows) for rows in self.dropped.values())

    def summary(self) -> str:
        text = f"{self.split}: {self.rows} rows -> {self.examples} examples"
        for reason, rows in self.dropped.items():
            head = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
            text += f"; dropped {len(rows)} ({reason}: rows {head})"
        return text


class LLMDataModule(L.LightningDataModule, abc.ABC):
    """Base of the data modules: loads, validates, tokenizes and batches a dataset.

    Args:
        train_data: training rows: a hub dataset id, a local json/jsonl/parquet/csv file, ``"sample:<name>"`` (a shipped
            sample such as ``sample:messages``), a ``datasets.Dataset`` or a list of dicts.
        val_data: validation rows, same forms; or use ``val_split``.
        tokenizer: tokenizer or its id/path; by default the one of the module being trained
            (``trainer.lightning_module.tokenizer``).
        val_split: fraction of ``train_data`` carved out for validation when ``val_data`` is not given.
        split: split of a hub dataset (or ``DatasetDict``) to read ``train_data`` from.
        val_split_name: split to read ``val_data`` from.
        subset: configuration name of a hub dataset.
        batch_size: examples per training batch (per device).
        val_batch_size: examples per validation batch (default ``batch_size``).
        num_workers: data loader worker processes.
        seed: seed of the shuffling and of ``val_split``.
        shuffle: shuffle the training set every epoch.
        max_length: longest tokenized example; ``None`` for no limit.
        truncation_mode: ``keep_start`` or ``keep_end`` when an example is longer than ``max_length``.
        on_overflow: what to do with an example longer than ``max_length``: ``truncate`` it, ``drop`` it (counted
            and logged), or raise an ``error`` naming the row.
        chat_template: a Jinja chat template (string or ``.jinja`` path) replacing the tokenizer's.
        pad_to_multiple_of: pad batch lengths to a multiple of this (tensor cores like multiples of 8).
    """

    #: dataset kinds this module accepts (see ``lightning_llm.data.formats``)
    accepted_kinds: tuple[str, ...] = ()

    def __init__(
        self,
        train_data: DataSource | None = None,
        val_data: DataSource | None = None,
        *,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        val_split: float = 0.0,
        split: str = "train",
        val_split_name: str = "test",
        subset: str | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        shuffle: bool = True,
        max_length: int | None = 1024,
        truncation_mode: str = "keep_start",
        on_overflow: str = "truncate",
        chat_template: str | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        super().__init__()
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
        if on_overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {max_length}")
        if val_data is not None and val_split:
            raise ValueError("Give either val_data or val_split, not both")
        self.train_data = train_data
        self.val_data = val_data
        self.tokenizer = tokenizer
        self.val_split = val_split
        self.split = split
        self.val_split_name = val_split_name
        self.subset = subset
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.on_overflow = on_overflow
        self.chat_template = chat_template
        self.pad_to_multiple_of = pad_to_multiple_of
        self.train_dataset: ExampleDataset | None = None
        self.val_dataset: ExampleDataset | None = None
        self.reports: dict[str, PreparationReport] = {}
        self.format: DataFormat | None = None
        self.raw_rows: dict[str, list[dict]] = {}

    # ----------------------------------------------------------------------------------------------- subclass API
    @abc.abstractmethod
    def encode(self, row: dict, fmt: DataFormat, index: int, report: PreparationReport) -> dict | None:
        """Tokenize one validated row; return ``None`` to drop it (after ``report.drop(reason, index)``)."""

    @abc.abstractmethod
    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """Turn a list of encoded examples into a batch of tensors."""

    def finalize(self, examples: list[dict], split: str) -> list[dict]:
        """Hook run on a whole split after encoding (packing, pairing, ...)."""
        return examples

    def check_format(self, fmt: DataFormat, name: str) -> DataFormat:
        """Refuse a dataset kind this module cannot train on (subclasses may convert, e.g. unpairing)."""
        if self.accepted_kinds and fmt.kind not in self.accepted_kinds:
            raise ValueError(
                f"{name}: {type(self).__name__} needs a dataset of kind {' or '.join(self.accepted_kinds)}, got "
                f"{fmt.kind} (see lightning_llm.data.formats for the columns of each kind)"
            )
        return fmt

    # ----------------------------------------------------------------------------------------------------- set-up
    def resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer given, or the trained module's (set when the trainer attaches this data module)."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            tokenizer = getattr(module, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    f"{type(self).__name__} has no tokenizer: pass tokenizer=..., or attach it to a Trainer together "
                    "with a module that has one"
                )
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = load_tokenizer(tokenizer)
        if self.chat_template is not None:
            tokenizer = load_tokenizer(tokenizer, chat_template=self.chat_template)
        ensure_chat_template(tokenizer)
        self.tokenizer = tokenizer
        return tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None or (stage in ("validate", "test") and self.val_dataset is not None):
            return
        self.resolve_tokenizer()
        train_rows = load_rows(self.train_data, split=self.split, subset=self.subset, name="train_data") \
            if self.train_data is not None else None
        val_rows = None
        if self.val_data is not None:
            val_rows = load_rows(self.val_data, split=self.val_split_name, subset=self.subset, name="val_data")
        elif self.val_split and train_rows is not None:
            train_rows, val_rows = split_rows(train_rows, self.val_split, self.seed)
        if train_rows is None and val_rows is None:
            raise ValueError(f"{type(self).__name__}: give train_data and/or val_data")
        if train_rows is not None:
            self.train_dataset = ExampleDataset(self.prepare(train_rows, "train_data"))
        if val_rows is not None:
            self.val_dataset = ExampleDataset(self.prepare(val_rows, "val_data"))

    def prepare(self, rows: list[dict], name: str) -> list[dict]:
        """Detect, validate and encode ``rows``; log what was dropped; raise if nothing is left."""
        if not rows:
            raise ValueError(f"{name}: the dataset is empty")
        self.raw_rows[name] = rows
        columns = set().union(*(row.keys() for row in rows[:100]))
        fmt = self.check_format(detect_format(columns, rows[0]), name)
        validate_rows(rows, fmt, name)
        self.format = fmt
        report = PreparationReport(split=name, rows=len(rows))
        examples = []
        for i, row in enumerate(rows):
            example = self.encode(row, fmt, i, report)
            if example is not None:
                examples.append(example)
        examples = self.finalize(examples, name)
        report.examples = len(examples)
        self.reports[name] = report
        if report.num_dropped:
            log.warning("%s", report.summary())
        else:
            log.info("%s", report.summary())
        if not examples:
            raise ValueError(f"{name}: no example left after preparation ({report.summary()})")
        return examples

    def fit_length(self, ids: list[int], masks: Sequence[list[int]], name: str, index: int, column: str,
                   report: PreparationReport) -> tuple[list[int], list[list[int]]] | None:
        """Apply ``max_length`` to ``ids`` and its parallel ``masks`` following ``on_overflow``/``truncation_mode``.

        Returns ``None`` (after recording the drop) when the example is dropped.
        """
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, list(masks)
        if self.on_overflow == "error":
            raise ValueError(
                f"{name}: row {index}, column {column!r}: {len(ids)} tokens do not fit max_length={self.max_length} "
                "(raise max_length, or set on_overflow='truncate' or 'drop')"
            )
        if self.on_overflow == "drop":
            report.drop("longer than max_length", index)
            return None
        cut = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
        return ids[cut], [mask[cut] for mask in masks]

    def prompts(self, split: str = "val", limit: int | None = None) -> list[str | list[dict]]:
        """Prompts of the rows of ``split`` (``val`` or ``train``), for generation callbacks (win rate, samples).

        A row's prompt is its ``prompt`` column, or for conversations without one, the messages before the last
        assistant turn. Rows are taken in order, up to ``limit``.
        """
        rows = self.raw_rows.get("val_data" if split == "val" else "train_data")
        if rows is None:
            raise ValueError(f"{type(self).__name__} has no {split} rows; is setup() done and {split} data given?")
        out: list[str | list[dict]] = []
        for row in rows:
            prompt = _row_prompt(row)
            if prompt is not None:
                out.append(prompt)
            if limit is not None and len(out) >= limit:
                break
        return out

    # ----------------------------------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: no training data (train_data was not given)")
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # Lightning's own distributed sampler always shuffles and ignores our seed; this one honours both
            # (Lightning leaves a DistributedSampler in place and calls its set_epoch).
            sampler = DistributedSampler(self.train_dataset, num_replicas=trainer.world_size,
                                         rank=trainer.global_rank, shuffle=self.shuffle, seed=self.seed)
            return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate,
                              num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_dataset, batch_size=self.batch_size, shuffle=self.shuffle, collate_fn=self.collate,
            num_workers=self.num_workers, generator=generator, persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return DataLoader(
            self.val_dataset, batch_size=self.val_batch_size, shuffle=False, collate_fn=self.collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"reports": {k: vars(v) for k, v in self.reports.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reports = {k: PreparationReport(**v) for k, v in state_dict.get("reports", {}).items()}


def _row_prompt(row: dict) -> str | list[dict] | None:
    """The prompt of a raw row: ``prompt``, else the turns before the last assistant turn of a conversation."""
    if row.get("prompt") is not None:
        return row["prompt"]
    for column in ("messages", "chosen"):
        conversation = row.get(column)
        if isinstance(conversation, list) and conversation:
            last = max((i for i, m in enumerate(conversation) if m.get("role") == "assistant"), default=None)
            if last:
                return conversation[:last]
    return None
