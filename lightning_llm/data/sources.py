"""Where rows come from: a hub dataset, local files, a ``datasets.Dataset``, a list of dicts, or a shipped sample.

:func:`load_source` opens any of them as a ``datasets.Dataset`` (Arrow, memory-mapped when it comes from files or
the hub, so processes share one copy) or, for streams, a ``datasets.IterableDataset`` that is never materialised.
:func:`load_rows` is the small-data convenience that returns a list of dicts.

Errors name the source: a JSON file's bad line (and, for bytes that are not UTF-8, the column), a list's row that
is not a dict, a row whose column holds a value of another type than the rows before it.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from lightning_llm.assets import sample_path

log = logging.getLogger(__name__)

#: What ``train_data`` / ``val_data`` accept. Strings: ``"sample:<name>"`` (a dataset shipped in
#: ``lightning_llm/assets/data``), a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, a directory written by
#: ``Dataset.save_to_disk`` or holding data files, or a hub dataset id. Objects: a list of dicts, a
#: ``datasets.Dataset``/``DatasetDict`` or a ``datasets.IterableDataset``/``IterableDatasetDict`` (a stream).
DataSource = Union[str, Sequence[dict], Any]

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def check_utf8(path: Path, chunk_size: int = 1 << 22) -> None:
    """Raise ``ValueError`` naming the line and byte of the first bytes of ``path`` that are not UTF-8 (Arrow's JSON
    reader would store them as they are, to fail far from the file)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    read = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                pending = len(err.object) - len(chunk)  # bytes of an unfinished character held from the last chunk
                _raise_not_utf8(path, read - pending + err.start)
            read += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            _raise_not_utf8(path, read - len(err.object) + err.start)


def _raise_not_utf8(path: Path, offset: int) -> None:
    with open(path, "rb") as handle:
        head = handle.read(offset + 1)
    line_start = head.rfind(b"\n", 0, offset) + 1
    line = head.count(b"\n", 0, offset) + 1
    raise ValueError(f"{path}: line {line}, byte {offset - line_start + 1}: not valid UTF-8 (byte "
                     f"0x{head[offset]:02x}); save the file as UTF-8") from None


def read_json_rows(path: Path) -> list[dict]:
    """Rows of a JSON-lines file (or of a JSON array file), read with the standard library.

    Raises ``ValueError`` naming the file and line of a line that is not valid JSON or not valid UTF-8.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}: line {line_no}, byte {column}: not valid UTF-8 (byte 0x{data[err.start]:02x}); save the file "
            "as UTF-8"
        ) from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as err:
            line_no = text[: len(text) - len(stripped)].count("\n") + err.lineno
            raise ValueError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from err
        return rows
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from err
    return rows


def check_rows(rows: Sequence[Any], name: str) -> list[dict]:
    """``rows`` as a list, each checked to be a dict of columns (``ValueError`` naming the first that is not)."""
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{name}: row {i}: expected a dict of columns, got {type(row).__name__}")
    return rows


def _value_kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def first_mixed_column(rows: Sequence[dict]) -> tuple[int, str, str, str] | None:
    """``(row, column, kind, earlier kind)`` of the first value whose kind (string, number, bool, list, dict)
    differs from the column's earlier values, or ``None``: what Arrow cannot store in one column."""
    kinds: dict[str, str] = {}
    for i, row in enumerate(rows):
        for column, value in row.items():
            kind = _value_kind(value)
            if kind is None:
                continue
            seen = kinds.setdefault(column, kind)
            if seen != kind:
                return i, column, kind, seen
    return None


#: called with the rows (and the source's name) before they go to Arrow: raises the format's named errors
RowsCheck = Callable[[list[dict], str], None]


def rows_to_dataset(rows: Sequence[dict], name: str, check: RowsCheck | None = None):
    """A ``datasets.Dataset`` of ``rows``, after ``check`` (the data modules pass their format validation, whose
    errors name the row, the column and what was expected). When Arrow still cannot store a row beside the others, a
    ``ValueError`` names the row and column whose type differs from the rows before."""
    import datasets
    import pyarrow as pa

    rows = check_rows(rows, name)
    if check is not None:
        check(rows, name)  # before Arrow, which would quietly store True among floats as 1.0
    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        mixed = first_mixed_column(rows)
        if mixed is not None:
            row, column, kind, seen = mixed
            raise ValueError(f"{name}: row {row}, column {column!r}: a {kind} where the rows before hold a {seen} "
                             "(every row must give a column the same type)") from err
        raise ValueError(f"{name}: the rows cannot be stored as one table ({err})") from err


def load_source(source: DataSource, *, split: str = "train", subset: str | None = None, name: str = "data",
                streaming: bool = False, cache_dir: str | None = None, check: RowsCheck | None = None):
    """Open ``source`` as a ``datasets.Dataset``, or as a ``datasets.IterableDataset`` when it is a stream (a
    stream object, or ``streaming=True`` with a file or hub id).

    Args:
        source: see :data:`DataSource`.
        split: split to take from a hub dataset, a directory or a ``DatasetDict``.
        subset: hub dataset configuration name.
        name: how error messages call this source (``"train_data"``, ``"val_data"``).
        streaming: open files and hub datasets as streams (rows are read as training goes).
        cache_dir: where ``datasets`` keeps the Arrow copies of loaded files (its default cache when ``None``).
        check: see :func:`rows_to_dataset` (for rows that are read as Python objects: lists, samples, JSON files
            that ``datasets`` cannot read).
    """
    import datasets

    if source is None:
        raise ValueError(f"{name}: no data given")
    if isinstance(source, (list, tuple)):
        dataset = rows_to_dataset(source, name, check)
        return dataset.to_iterable_dataset() if streaming else dataset
    if isinstance(source, (str, Path)):
        return _load_path_or_hub(str(source), split=split, subset=subset, name=name, streaming=streaming,
                                 cache_dir=cache_dir, check=check)
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise ValueError(f"{name}: split {split!r} not in the {type(source).__name__} (has {list(source)})")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return source.to_iterable_dataset() if streaming else source
    if isinstance(source, datasets.IterableDataset):
        return source
    raise ValueError(
        f"{name}: expected a hub id, a file path, 'sample:<name>', a datasets.Dataset or IterableDataset, or a list "
        f"of dicts; got {type(source).__name__}"
    )


def _load_json_file(path: Path, *, name: str, streaming: bool, cache_dir: str | None, check: RowsCheck | None):
    """A JSON(-lines) file through ``datasets`` (Arrow, memory-mapped); when ``datasets`` cannot read it, the
    standard library reads it again to name the bad line, or the row and column Arrow could not store."""
    import datasets

    check_utf8(path)
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train", streaming=streaming,
                                     cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - the file is read again below, which names what is wrong
        try:
            rows = read_json_rows(path)
        except ValueError as named:
            raise named from err
        log.info("datasets could not read %s (%s: %s); read it with the json module instead", path,
                 type(err).__name__, err)
        dataset = rows_to_dataset(rows, f"{name} ({path})", check)
        return dataset.to_iterable_dataset() if streaming else dataset


def _load_path_or_hub(source: str, *, split: str, subset: str | None, name: str, streaming: bool,
                      cache_dir: str | None, check: RowsCheck | None):
    import datasets

    if source.startswith("sample:"):
        dataset = rows_to_dataset(read_json_rows(sample_path(source.removeprefix("sample:"))), name, check)
        return dataset.to_iterable_dataset() if streaming else dataset
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"{name}: unsupported file type {suffix!r} ({path}); use one of {sorted(_FILE_BUILDERS)}")
        if suffix in (".json", ".jsonl"):
            return _load_json_file(path, name=name, streaming=streaming, cache_dir=cache_dir, check=check)
        return datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), split="train", streaming=streaming,
                                     cache_dir=cache_dir)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return load_source(datasets.load_from_disk(str(path)), split=split, name=name, streaming=streaming)
        return datasets.load_dataset(str(path), subset, split=split, streaming=streaming, cache_dir=cache_dir)
    if source.count("/") > 1 or source.startswith((".", "~", "/")) or Path(source).suffix.lower() in _FILE_BUILDERS:
        raise ValueError(f"{name}: no such file or directory: {source}")
    return datasets.load_dataset(source, subset, split=split, streaming=streaming, cache_dir=cache_dir)


def load_rows(source: DataSource, *, split: str = "train", subset: str | None = None, name: str = "data") -> list[dict]:
    """Load ``source`` into a list of row dicts (for small data; the data modules keep rows in Arrow).

    Lists of dicts, shipped samples and JSON files are read without converting them; other sources go through
    :func:`load_source`.
    """
    if source is None:
        raise ValueError(f"{name}: no data given")
    if isinstance(source, (list, tuple)):
        return check_rows(source, name)
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith("sample:"):
            return read_json_rows(sample_path(text.removeprefix("sample:")))
        path = Path(text).expanduser()
        if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
            return read_json_rows(path)
    dataset = load_source(source, split=split, subset=subset, name=name)
    return dataset.to_list()


def split_indices(num_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)`` row indices: a reproducible ``fraction`` (at least one row) for validation, each part in the
    original order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_split must be a fraction in (0, 1), got {fraction}")
    if num_rows < 2:
        raise ValueError(f"val_split needs at least 2 training rows, got {num_rows}")
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(num_rows * fraction))
    val = sorted(order[:n_val])
    chosen = set(val)
    return [i for i in range(num_rows) if i not in chosen], val


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Carve a validation set of ``fraction`` of the rows (at least one) out of ``rows``, reproducibly."""
    train, val = split_indices(len(rows), fraction, seed)
    return [rows[i] for i in train], [rows[i] for i in val]
