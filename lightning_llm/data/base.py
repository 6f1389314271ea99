"""``LLMDataModule``: what every data module shares (sources, validation split, tokenizer, preparation, loaders).

Rows stay in a ``datasets.Dataset`` (Arrow). Preparation is one batched ``map`` per step (validate + tokenize, then
the module's own steps such as packing), optionally over ``num_proc`` processes, each step cached on disk under an
explicit fingerprint (source, tokenizer files, settings; see :mod:`lightning_llm.data.cache`). Lightning calls
:meth:`~LLMDataModule.prepare_data` on one process per node, which writes the cache; every process's
:meth:`~LLMDataModule.setup` then loads it (and prepares on its own when called alone). A bad row raises a
``ValueError`` naming the row, the column and what was expected, before the first training step.

A stream (a ``datasets.IterableDataset``, or ``streaming=True``) goes through the same validation and encoding as it
is read (:mod:`lightning_llm.data.stream`): nothing is materialised, and a bad row fails naming its index before the
batch that holds it trains.

Subclasses say which columns an example has (:meth:`LLMDataModule.example_features`), how a validated row becomes
one (:meth:`LLMDataModule.encode`) and how examples become a typed batch (:meth:`LLMDataModule.collate`).
"""

from __future__ import annotations

import abc
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_llm.data.batches import Batch, PromptBatch
from lightning_llm.data.cache import default_cache_dir, fingerprint, tokenizer_fingerprint
from lightning_llm.data.chat import with_chat_template
from lightning_llm.data.formats import DataFormat, detect_format, validate_row, validate_rows
from lightning_llm.data.sampling import EpochSampler, resume_position
from lightning_llm.data.sources import DataSource, load_source, split_indices
from lightning_llm.data.stream import ExampleStream
from lightning_llm.models.loading import load_tokenizer

log = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_start", "keep_end")
OVERFLOW_POLICIES = ("truncate", "drop", "error")
#: columns every encoded split carries until its drops are applied
_DROP, _TRUNCATED = "_drop", "_truncated"
#: splits below this size are prepared without progress bars
_QUIET_BELOW = 10_000

#: ``batch -> {column: [B] values}``: scores a batch (e.g. reference log-probs) for :meth:`precompute_reference`
ScoreFn = Callable[[Batch], Mapping[str, Tensor]]


@dataclass
class PreparationReport:
    """What preparation did to one split: rows in, examples out, rows dropped by reason (with row indices) and the
    number of rows cut to ``max_length``."""

    split: str
    rows: int = 0
    examples: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)
    truncated: int = 0

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
        if self.truncated:
            text += f"; truncated {self.truncated} to max_length"
        return text


class RowNotes:
    """What :meth:`LLMDataModule.encode` says about the row it encodes: dropped (and why), or cut to
    ``max_length``. ``split`` names the data in error messages."""

    def __init__(self, split: str) -> None:
        self.split = split
        self.dropped: str | None = None
        self.truncated = False

    def drop(self, reason: str, row: int) -> None:
        self.dropped = reason

    def truncate(self, row: int) -> None:
        self.truncated = True


def plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row read from Arrow as the row it was written: Arrow gives absent values (whole columns, and message keys
    that only some messages have) as ``None``; they are left out again."""
    out = {}
    for key, value in row.items():
        if value is None:
            continue
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = [{k: v for k, v in item.items() if v is not None} if isinstance(item, dict) else item
                     for item in value]
        out[key] = value
    return out


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """``datasets``' progress bars on or off for a block (restored afterwards)."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    if enabled == was_enabled:
        yield
        return
    (ds_logging.enable_progress_bar if enabled else ds_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (ds_logging.enable_progress_bar if was_enabled else ds_logging.disable_progress_bar)()


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is a stream (no length, no random access)."""
    return isinstance(dataset, ExampleStream)


class LLMDataModule(L.LightningDataModule, abc.ABC):
    """Base of the data modules: loads, validates, tokenizes and batches a dataset.

    Args:
        train_data: training rows: a hub dataset id, a local json/jsonl/parquet/csv file, ``"sample:<name>"`` (a shipped
            sample such as ``sample:messages``), a ``datasets.Dataset``, a ``datasets.IterableDataset`` (a stream)
            or a list of dicts.
        val_data: validation rows, same forms; or use ``val_split``.
        test_data: rows for ``trainer.test`` (evaluated like the validation rows, metrics under ``test/``).
        predict_data: rows for ``trainer.predict``: their ``prompt`` column, or each conversation (``messages`` or
            ``chosen``) up to its last assistant turn, is completed with the module's ``generate``.
        tokenizer: tokenizer or its id/path; by default the one of the module being trained
            (``trainer.lightning_module.tokenizer``, copied before anything about it is changed).
        val_split: fraction of ``train_data`` carved out for validation when ``val_data`` is not given.
        split: split of a hub dataset (or ``DatasetDict``) to read ``train_data`` from.
        val_split_name: split to read ``val_data`` from.
        test_split_name: split to read ``test_data`` from.
        predict_split_name: split to read ``predict_data`` from.
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
        num_proc: processes that tokenize in parallel (``datasets.map``'s ``num_proc``); ``None`` for one.
        cache_dir: where prepared datasets and precomputed reference log-probs are cached (default
            ``$LIGHTNING_LLM_CACHE`` or ``~/.cache/lightning_llm``); files and hub datasets are also stored there by
            ``datasets`` when it is given.
        streaming: open hub datasets and files as streams (rows are read, validated and tokenized as training goes;
            needs ``Trainer(max_steps=...)``).
        shuffle_buffer_size: rows held by a stream's shuffle buffer (with ``shuffle``).
    """

    #: dataset kinds this module accepts (see ``lightning_llm.data.formats``)
    accepted_kinds: tuple[str, ...] = ()
    #: raise when what :meth:`encode` makes changes, so that no older cached preparation is loaded
    preparation_version: int = 1
    #: keep every source column beside what :meth:`encode` returns (the online algorithms' reward functions read them)
    keeps_source_columns: bool = False

    def __init__(
        self,
        train_data: DataSource | None = None,
        val_data: DataSource | None = None,
        *,
        test_data: DataSource | None = None,
        predict_data: DataSource | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        val_split: float = 0.0,
        split: str = "train",
        val_split_name: str = "test",
        test_split_name: str = "test",
        predict_split_name: str = "test",
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
        num_proc: int | None = None,
        cache_dir: str | None = None,
        streaming: bool = False,
        shuffle_buffer_size: int = 1000,
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
        if num_proc is not None and num_proc < 1:
            raise ValueError(f"num_proc must be >= 1 or None, got {num_proc}")
        if shuffle_buffer_size < 1:
            raise ValueError(f"shuffle_buffer_size must be >= 1, got {shuffle_buffer_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1 or None, got {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.train_data = train_data
        self.val_data = val_data
        self.test_data = test_data
        self.predict_data = predict_data
        self.tokenizer = tokenizer
        self.val_split = val_split
        self.split = split
        self.val_split_name = val_split_name
        self.test_split_name = test_split_name
        self.predict_split_name = predict_split_name
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
        self.num_proc = num_proc
        self.cache_dir = cache_dir
        self.streaming = streaming
        self.shuffle_buffer_size = shuffle_buffer_size
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.test_dataset: Any = None
        self.predict_dataset: Any = None
        self.reports: dict[str, PreparationReport] = {}
        self.format: DataFormat | None = None
        self._sources: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # What preparation workers and data loader workers need: not the trainer (and through it the model).
        state = self.__dict__.copy()
        state.pop("trainer", None)
        state["_sources"] = {}
        return state

    # ----------------------------------------------------------------------------------------------- subclass API
    @abc.abstractmethod
    def example_features(self, columns: Sequence[str], fmt: DataFormat) -> dict[str, Any]:
        """``datasets`` feature types of the columns :meth:`encode` returns, for a source with ``columns``."""

    @abc.abstractmethod
    def encode(self, row: dict, fmt: DataFormat, index: int, report: RowNotes) -> dict | None:
        """Tokenize one validated row; return ``None`` to drop it (after ``report.drop(reason, index)``)."""

    def encode_batch(self, rows: list[dict], fmt: DataFormat, indices: list[int], notes: list[RowNotes]
                     ) -> list[dict | None]:
        """Encode validated rows (one batch of the preparation ``map``): one :meth:`encode` each by default; modules
        whose encoding is mostly tokenization override it to tokenize the whole batch in one call."""
        return [self.encode(row, fmt, index, report) for row, index, report in zip(rows, indices, notes)]

    @abc.abstractmethod
    def collate(self, examples: list[dict]) -> Batch:
        """Turn a list of encoded examples into a typed batch."""

    def preprocess(self, dataset: Any, name: str) -> Any:
        """Hook run on a split's source rows before encoding (renaming, unpairing, whole-split checks)."""
        return dataset

    def finalize(self, dataset: Any, name: str) -> Any:
        """Hook run on a whole encoded split (packing, pairing, ...)."""
        return dataset

    def finalize_block(self, examples: list[dict], name: str) -> list[dict]:
        """Hook run on each batch-sized block of a stream's encoded examples (what :meth:`finalize` does in blocks)."""
        return examples

    def preparation_settings(self) -> dict[str, Any]:
        """Every setting what :meth:`encode` makes depends on (part of the cache fingerprint)."""
        return {"max_length": self.max_length, "truncation_mode": self.truncation_mode,
                "on_overflow": self.on_overflow}

    def check_format(self, fmt: DataFormat, name: str) -> DataFormat:
        """Refuse a dataset kind this module cannot train on (subclasses may convert, e.g. unpairing)."""
        if self.accepted_kinds and fmt.kind not in self.accepted_kinds:
            raise ValueError(
                f"{name}: {type(self).__name__} needs a dataset of kind {' or '.join(self.accepted_kinds)}, got "
                f"{fmt.kind} (see lightning_llm.data.formats for the columns of each kind)"
            )
        return fmt

    # -------------------------------------------------------------------------------------- the max_length rule
    def fits(self, length: int, name: str, index: int, column: str, report: RowNotes,
             prompt_length: int | None = None) -> bool:
        """Apply ``on_overflow`` to an example of ``length`` tokens (``prompt_length`` of them its prompt).

        Returns ``False`` when the example is dropped (recorded in ``report``); raises under ``on_overflow="error"``;
        records a truncation and returns ``True`` otherwise. With ``keep_start`` an example whose prompt alone fills
        ``max_length`` keeps no completion token and is dropped.
        """
        if self.max_length is None or length <= self.max_length:
            return True
        if self.on_overflow == "error":
            prompt = f" (prompt {prompt_length})" if prompt_length is not None else ""
            raise ValueError(
                f"{name}: row {index}, column '{column}': {length} tokens{prompt} do not fit max_length="
                f"{self.max_length} (raise max_length, or set on_overflow='truncate' or 'drop')"
            )
        if self.on_overflow == "drop":
            report.drop("longer than max_length", index)
            return False
        if prompt_length is not None and self.truncation_mode == "keep_start" and prompt_length >= self.max_length:
            report.drop("prompt alone fills max_length", index)
            return False
        report.truncate(index)
        return True

    def cut(self, sequence: list) -> list:
        """``sequence`` cut to ``max_length`` following ``truncation_mode``."""
        if self.max_length is None or len(sequence) <= self.max_length:
            return sequence
        return sequence[: self.max_length] if self.truncation_mode == "keep_start" else sequence[-self.max_length:]

    # ----------------------------------------------------------------------------------------------------- set-up
    def resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer given, or the trained module's (set when the trainer attaches this data module).

        A tokenizer object is never changed: when it needs a pad token or another chat template, a copy gets it.
        """
        tokenizer = self.tokenizer
        if tokenizer is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            tokenizer = getattr(module, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    f"{type(self).__name__} has no tokenizer: pass tokenizer=..., or attach it to a Trainer together "
                    "with a module that has one"
                )
        tokenizer = load_tokenizer(tokenizer, chat_template=self.chat_template)
        self.tokenizer = with_chat_template(tokenizer)
        return self.tokenizer

    def prepare_data(self) -> None:
        """Prepare every split and write the cache (Lightning calls this on one process per node, first)."""
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        """Prepare what ``stage`` needs (``fit``/``validate``: training and validation data, ``test``: the test
        data, ``predict``: the prompts; ``None``: everything given)."""
        self.resolve_tokenizer()
        if all(data is None for data in (self.train_data, self.val_data, self.test_data, self.predict_data)):
            raise ValueError(f"{type(self).__name__}: give train_data and/or val_data (or test_data / predict_data)")
        if stage in (None, "fit", "validate") and self.train_dataset is None and self.val_dataset is None:
            train, val = self._open_sources()
            if train is None and val is None and stage is not None:
                raise ValueError(f"{type(self).__name__}: give train_data and/or val_data")
            if train is not None:
                self.train_dataset = self._prepare(train, "train_data")
            if val is not None:
                self.val_dataset = self._prepare(val, "val_data")
        if stage in (None, "test") and self.test_dataset is None:
            if self.test_data is None and stage == "test":
                raise ValueError(f"{type(self).__name__}: `test` needs test_data")
            if self.test_data is not None:
                self.test_dataset = self._prepare(self._open(self.test_data, self.test_split_name, "test_data"),
                                                  "test_data")
        if stage in (None, "predict") and self.predict_dataset is None:
            if self.predict_data is None and stage == "predict":
                raise ValueError(f"{type(self).__name__}: `predict` needs predict_data (rows with a prompt)")
            if self.predict_data is not None:
                self.predict_dataset = self._prepare_prompts(
                    self._open(self.predict_data, self.predict_split_name, "predict_data", check=False), "predict_data")

    def _open(self, data: DataSource, split: str, name: str, check: bool = True) -> Any:
        return load_source(data, split=split, subset=self.subset, name=name, streaming=self.streaming,
                           cache_dir=self.cache_dir, check=self._check_rows if check else None)

    def _prepare_prompts(self, source: Any, name: str) -> Any:
        """The rows of ``predict_data``, each checked to give a prompt (``ValueError`` naming the first that does
        not)."""
        if is_stream(source) or not hasattr(source, "__len__"):
            raise ValueError(f"{name}: predict needs a map-style dataset, not a stream")
        if not len(source):
            raise ValueError(f"{name}: the dataset is empty")
        for index, row in enumerate(source):
            if _row_prompt(plain_row(row)) is None:
                raise ValueError(f"{name}: row {index}: no prompt to complete (expected a 'prompt' column, or "
                                 "'messages'/'chosen' with an assistant turn after the first message)")
        self._sources[name] = source
        return source

    def collate_prompts(self, indexed_rows: list[tuple[int, dict]]) -> PromptBatch:
        """A batch of ``predict_data`` rows: their prompts, row indices, and the rows themselves."""
        rows = [plain_row(row) for _, row in indexed_rows]
        return PromptBatch(prompts=[_row_prompt(row) for row in rows], indices=[i for i, _ in indexed_rows],
                           rows=rows)

    def _check_rows(self, rows: list[dict], name: str) -> None:
        """The format's row validation over plain rows (named errors when Arrow cannot store them)."""
        if rows:
            columns = set().union(*(row.keys() for row in rows[:100]))
            validate_rows(rows, detect_format(columns, rows[0]), name)

    def _open_sources(self) -> tuple[Any, Any]:
        import datasets

        train = self._open(self.train_data, self.split, "train_data") if self.train_data is not None else None
        val = self._open(self.val_data, self.val_split_name, "val_data") if self.val_data is not None else None
        if self.val_split and train is not None:
            if isinstance(train, datasets.IterableDataset):
                raise ValueError("val_split cannot carve a validation set out of a stream (train_data is streamed); "
                                 "give val_data instead")
            train_indices, val_indices = split_indices(len(train), self.val_split, self.seed)
            train, val = train.select(train_indices), train.select(val_indices)
        return train, val

    def _prepare(self, source: Any, name: str) -> Any:
        import datasets

        if isinstance(source, datasets.IterableDataset):
            return self._prepare_stream(source, name)
        if not len(source):
            raise ValueError(f"{name}: the dataset is empty")
        self._sources[name] = source
        with _progress_bars(len(source) >= _QUIET_BELOW):
            rows = self.preprocess(source, name)
            fmt = self.check_format(detect_format(rows.column_names, plain_row(rows[0])), name)
            self.format = fmt
            made = self.example_features(rows.column_names, fmt)
            kept = {}
            if self.keeps_source_columns:
                clash = sorted(set(made) & set(rows.column_names))
                if clash:
                    raise ValueError(f"{name}: column(s) {clash} are names {type(self).__name__} writes itself; "
                                     "rename them in the data")
                kept = dict(rows.features)
            features = datasets.Features({
                **kept, **made, _DROP: datasets.Value("string"), _TRUNCATED: datasets.Value("bool"),
            })
            encoded = self.cached_map(
                rows, self._encode_rows, step="encode", batched=True, with_indices=True, features=features,
                remove_columns=[] if self.keeps_source_columns else rows.column_names,
                fn_kwargs={"fmt": fmt, "name": name}, num_proc=self.num_proc, desc=f"Preparing {name}",
            )
            encoded, report = self._apply_drops(encoded, name)
            encoded = self.finalize(encoded, name)
        report.examples = len(encoded)
        self.reports[name] = report
        log.log(logging.WARNING if report.num_dropped or report.truncated else logging.INFO, "%s", report.summary())
        if not len(encoded):
            raise ValueError(f"{name}: no example left after preparation ({report.summary()})")
        return encoded

    def cached_map(self, dataset: Any, function: Callable, *, step: str, settings: Any = None, **kwargs: Any) -> Any:
        """``dataset.map(function, **kwargs)`` cached under ``cache_dir`` by an explicit fingerprint of the input's
        fingerprint, the tokenizer, the preparation settings, ``step``, its ``settings`` and the function's
        ``fn_kwargs`` (which name the split)."""
        key = fingerprint(
            type(self).__qualname__, self.preparation_version, step, settings, kwargs.get("fn_kwargs"),
            dataset._fingerprint, tokenizer_fingerprint(self.tokenizer), self.preparation_settings(),
        )
        directory = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        directory = directory / "prepared" / type(self).__name__
        directory.mkdir(parents=True, exist_ok=True)
        return dataset.map(function, new_fingerprint=key, cache_file_name=str(directory / f"{step}-{key}.arrow"),
                           load_from_cache_file=True, **kwargs)

    def _encode_rows(self, batch: dict[str, list], indices: list[int], fmt: DataFormat, name: str) -> dict[str, list]:
        """The batched ``map`` function: validate and encode each row; a dropped row keeps its place (its columns
        ``None``, its reason in ``_drop``), so that reports can name it after a cache load."""
        columns = list(batch)
        keys = [key for key in self._feature_names(fmt, columns) if key not in (_DROP, _TRUNCATED)]
        out: dict[str, list] = {key: [] for key in keys}
        rows = [plain_row({column: batch[column][position] for column in columns}) for position in range(len(indices))]
        for row, index in zip(rows, indices):
            validate_row(row, fmt, name, index)
        notes = [RowNotes(name) for _ in rows]
        examples = self.encode_batch(rows, fmt, list(indices), notes)
        for key in keys:
            out[key] = [None if example is None else example.get(key) for example in examples]
        out[_DROP] = [(note.dropped or "dropped") if example is None else "" for example, note in zip(examples, notes)]
        out[_TRUNCATED] = [note.truncated and example is not None for example, note in zip(examples, notes)]
        return out

    def _feature_names(self, fmt: DataFormat, columns: Sequence[str]) -> list[str]:
        return list(self.example_features(columns, fmt))

    def _apply_drops(self, encoded: Any, name: str) -> tuple[Any, PreparationReport]:
        import pyarrow.compute as pc

        report = PreparationReport(split=name, rows=len(encoded))
        table = encoded.with_format("arrow")
        reasons = table[_DROP]
        dropped = pc.not_equal(reasons, "")
        report.truncated = int(pc.sum(table[_TRUNCATED]).as_py() or 0)
        if pc.any(dropped).as_py():
            where = pc.indices_nonzero(dropped)
            for index, reason in zip(where.to_pylist(), pc.take(reasons, where).to_pylist()):
                report.drop(reason, index)
            kept = pc.indices_nonzero(pc.invert(dropped)).to_numpy().astype("int64")
            encoded = encoded.select(kept)
        return encoded.remove_columns([_DROP, _TRUNCATED]), report

    def _prepare_stream(self, source: Any, name: str) -> ExampleStream:
        first = next(iter(source), None)
        if first is None:
            raise ValueError(f"{name}: the stream is empty")
        self._sources[name] = source
        rows = self.preprocess(source, name)
        first = plain_row(next(iter(rows)))
        fmt = self.check_format(detect_format(first.keys(), first), name)
        self.format = fmt
        self.reports[name] = PreparationReport(split=name)

        def validate(block: list[dict], indices: list[int]) -> None:
            for row, index in zip(block, indices):
                validate_row(plain_row(row), fmt, name, index)

        def encode(block: list[dict], indices: list[int]) -> list[dict]:
            report = self.reports[name]
            examples = []
            notes_of = [RowNotes(name) for _ in block]
            encoded = self.encode_batch([plain_row(row) for row in block], fmt, list(indices), notes_of)
            for row, example, index, notes in zip(block, encoded, indices, notes_of):
                report.rows += 1
                if example is None:
                    report.drop(notes.dropped or "dropped", index)
                    log.warning("%s: row %d dropped (%s)", name, index, notes.dropped)
                    continue
                report.truncated += notes.truncated
                report.examples += 1
                examples.append({**row, **example} if self.keeps_source_columns else example)
            return examples

        size = self.batch_size if name == "train_data" else self.val_batch_size
        return ExampleStream(
            rows, validate=validate, encode=encode, finalize_block=lambda block: self.finalize_block(block, name),
            name=name, batch_size=size, shuffle=self.shuffle and name == "train_data", seed=self.seed,
            buffer_size=self.shuffle_buffer_size,
        )

    # ------------------------------------------------------------------------------------------------ the data
    def _split_dataset(self, split: str) -> Any:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train_dataset if split == "train" else self.val_dataset

    def rows(self, split: str = "val", limit: int | None = None) -> list[dict]:
        """The source rows of ``split`` (``train`` or ``val``) as they were given, in order, up to ``limit``."""
        source = self._sources.get("train_data" if split == "train" else "val_data")
        if source is None:
            raise ValueError(f"{type(self).__name__} has no {split} rows; is setup() done and {split} data given?")
        out = []
        for row in source:
            if limit is not None and len(out) >= limit:
                break
            out.append(plain_row(row))
        return out

    def prompts(self, split: str = "val", limit: int | None = None) -> list[str | list[dict]]:
        """Prompts of the rows of ``split`` (``val`` or ``train``), for generation callbacks (win rate, samples).

        A row's prompt is its ``prompt`` column, or for conversations without one, the messages before the last
        assistant turn. Rows are taken in order, up to ``limit``.
        """
        source = self._sources.get("train_data" if split == "train" else "val_data")
        if source is None:
            raise ValueError(f"{type(self).__name__} has no {split} rows; is setup() done and {split} data given?")
        out: list[str | list[dict]] = []
        for row in source:
            prompt = _row_prompt(plain_row(row))
            if prompt is not None:
                out.append(prompt)
            if limit is not None and len(out) >= limit:
                break
        return out

    def examples(self, split: str = "train", indices: Sequence[int] | None = None) -> list[dict]:
        """Encoded examples of ``split`` (all, or those at ``indices``), as :meth:`collate` takes them."""
        dataset = self._split_dataset(split)
        if dataset is None or is_stream(dataset):
            raise ValueError(f"{type(self).__name__} has no prepared map-style {split} split")
        if indices is None:
            return dataset.to_list()
        return dataset.__getitems__(list(indices))

    # ----------------------------------------------------------------------------------------------------- loaders
    def _process(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def train_dataloader(self) -> DataLoader:
        """Batches of this process's share of each epoch, shuffled by ``seed + epoch``; a run resumed from a
        checkpoint continues after the last batch it trained (see :mod:`lightning_llm.data.sampling`)."""
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: no training data (train_data was not given)")
        epoch, trained = resume_position(self.trainer)
        if is_stream(self.train_dataset):
            self.train_dataset.start_at(epoch, trained)
            return self._stream_loader(self.train_dataset)
        rank, world_size = self._process()
        # Lightning leaves a DistributedSampler in place (its own would ignore our seed) and calls its set_epoch.
        sampler = EpochSampler(len(self.train_dataset), shuffle=self.shuffle, seed=self.seed, rank=rank,
                               world_size=world_size, epoch=epoch, skip=trained * self.batch_size)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          generator=self._loader_generator())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        if is_stream(self.val_dataset):
            return self._stream_loader(self.val_dataset)
        return DataLoader(
            self.val_dataset, batch_size=self.val_batch_size, shuffle=False, collate_fn=self.collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, generator=self._loader_generator(),
        )

    def test_dataloader(self) -> DataLoader | list:
        if self.test_dataset is None:
            return []
        if is_stream(self.test_dataset):
            return self._stream_loader(self.test_dataset)
        return DataLoader(
            self.test_dataset, batch_size=self.val_batch_size, shuffle=False, collate_fn=self.collate,
            num_workers=self.num_workers, generator=self._loader_generator(),
        )

    def predict_dataloader(self) -> DataLoader | list:
        if self.predict_dataset is None:
            return []
        return DataLoader(_Indexed(self.predict_dataset), batch_size=self.val_batch_size, shuffle=False,
                          collate_fn=self.collate_prompts, num_workers=self.num_workers,
                          generator=self._loader_generator())

    def _stream_loader(self, stream: ExampleStream) -> DataLoader:
        # Lightning does not shard an IterableDataset: the stream takes this process's share of every round itself.
        stream.for_process(*self._process())
        return DataLoader(stream, batch_size=None, collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=self._loader_generator())

    def _loader_generator(self) -> torch.Generator:
        # A loader without a generator draws its workers' seed from the global generator each time an epoch starts,
        # which would make dropout after an epoch start depend on whether the run was resumed there.
        return torch.Generator().manual_seed(self.seed)

    # ------------------------------------------------------------------------------------ precomputed columns
    def precompute_reference(self, score: ScoreFn, *, columns: Sequence[str], identity: str,
                             batch_size: int | None = None) -> None:
        """Add ``columns`` (e.g. reference log-probs) to every prepared split, scored once by ``score``.

        ``score`` takes a typed batch of this module and returns ``{column: [B] values}``. Each process scores its
        contiguous share of the rows; the shares are gathered so that every process holds the whole column; the
        result is cached under ``cache_dir`` by the split's fingerprint and ``identity`` (what ``score`` computes
        with, e.g. the reference model's source and settings), so a later run with the same data and reference loads
        it. Splits that already have the columns are left as they are.
        """
        batch_size = batch_size or self.batch_size
        for attribute in ("train_dataset", "val_dataset"):
            dataset = getattr(self, attribute)
            if dataset is None:
                continue
            if is_stream(dataset):
                raise ValueError("precompute_ref_log_probs needs the whole dataset before training, but the data is "
                                 "a stream; precompute on a map-style dataset, or use the live reference model")
            if all(column in dataset.column_names for column in columns):
                continue
            setattr(self, attribute, self._with_scores(dataset, score, list(columns), identity, batch_size))

    def _with_scores(self, dataset: Any, score: ScoreFn, columns: list[str], identity: str, batch_size: int) -> Any:
        import numpy as np

        key = fingerprint("scores", dataset._fingerprint, columns, identity)
        directory = (Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()) / "scores"
        path = directory / f"{key}.npy"
        rank, world_size = self._process()
        # Rank 0 decides and, on a hit, hands its copy to the others (whose disks may not hold the file).
        cached = path.is_file()
        if world_size > 1:
            cached = self.trainer.strategy.broadcast(cached, src=0)
        if cached:
            values = np.load(path) if rank == 0 else None
            if world_size > 1:
                values = self.trainer.strategy.broadcast(values, src=0)
            log.info("Loaded precomputed %s from %s", ", ".join(columns), path)
        else:
            values = self._score_all(dataset, score, columns, batch_size)
            if rank == 0:
                import io

                from lightning_llm.data.cache import atomic_write_bytes

                buffer = io.BytesIO()
                np.save(buffer, values)
                atomic_write_bytes(path, buffer.getvalue())
            if world_size > 1:
                self.trainer.strategy.barrier("precompute_reference")
        if values.shape != (len(dataset), len(columns)):
            raise ValueError(f"cached scores {path} have shape {values.shape}, expected {(len(dataset), len(columns))}")
        for k, column in enumerate(columns):
            dataset = dataset.add_column(column, values[:, k].tolist(), new_fingerprint=fingerprint(key, column))
        return dataset

    @torch.no_grad()
    def _score_all(self, dataset: Any, score: ScoreFn, columns: list[str], batch_size: int):
        """``[N, C]`` float64 scores of every row: this process's contiguous share, then gathered."""
        import numpy as np

        rank, world_size = self._process()
        n = len(dataset)
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        parts = []
        for start in range(lo, hi, batch_size):
            batch = self.collate(dataset.__getitems__(list(range(start, min(start + batch_size, hi)))))
            out = score(batch)
            missing = [c for c in columns if c not in out]
            if missing:
                raise ValueError(f"the scoring function returned no {missing} (it returned {sorted(out)})")
            parts.append(torch.stack([out[c].detach().double().cpu().reshape(-1) for c in columns], dim=1))
        local = torch.cat(parts) if parts else torch.zeros((0, len(columns)), dtype=torch.float64)
        if world_size == 1:
            return local.numpy()
        strategy = self.trainer.strategy
        width = -(-n // world_size) + 1  # the longest share
        padded = torch.zeros((width, len(columns)), dtype=torch.float64)
        padded[: hi - lo] = local
        gathered = strategy.all_gather(padded.to(strategy.root_device)).cpu()  # [world, width, C]
        shares = [gathered[r, : n * (r + 1) // world_size - n * r // world_size] for r in range(world_size)]
        return np.ascontiguousarray(torch.cat(shares).numpy())

    def state_dict(self) -> dict[str, Any]:
        return {"reports": {k: vars(v) for k, v in self.reports.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reports = {k: PreparationReport(**v) for k, v in state_dict.get("reports", {}).items()}


class _Indexed(torch.utils.data.Dataset):
    """``(index, row)`` of a dataset, so that a batch knows which rows it holds."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return index, self.dataset[index]


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
