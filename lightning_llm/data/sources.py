"""Where rows come from: a hub dataset, local files, a ``datasets.Dataset``, a list of dicts, or a shipped sample."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence, Union

from lightning_llm.assets import sample_path

#: What ``train_data`` / ``val_data`` accept. Strings: ``"sample:<name>"`` (a dataset shipped in
#: ``lightning_llm/assets/data``), a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, a directory written by
#: ``Dataset.save_to_disk`` or holding data files, or a hub dataset id.
DataSource = Union[str, Sequence[dict], Any]

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(stripped)
    else:
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from err
    return rows


def load_rows(source: DataSource, *, split: str = "train", subset: str | None = None, name: str = "data") -> list[dict]:
    """Load ``source`` into a list of row dicts.

    Args:
        source: see :data:`DataSource`.
        split: split to take from a hub dataset or a ``DatasetDict``.
        subset: hub dataset configuration name.
        name: how error messages call this source (``"train_data"``, ``"val_data"``).
    """
    if source is None:
        raise ValueError(f"{name}: no data given")
    if isinstance(source, (list, tuple)):
        rows = list(source)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{name}: row {i}: expected a dict of columns, got {type(row).__name__}")
        return rows
    if isinstance(source, (str, Path)):
        return _load_path_or_hub(str(source), split=split, subset=subset, name=name)
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise ValueError(f"{name}: unsupported source type {type(source).__name__}") from err
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"{name}: split {split!r} not in the DatasetDict (has {list(source)})")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return source.to_list()
    if isinstance(source, datasets.IterableDataset):
        return list(source)
    raise ValueError(
        f"{name}: expected a hub id, a file path, 'sample:<name>', a datasets.Dataset or a list of dicts; got "
        f"{type(source).__name__}"
    )


def _load_path_or_hub(source: str, *, split: str, subset: str | None, name: str) -> list[dict]:
    if source.startswith("sample:"):
        return _read_json(sample_path(source.removeprefix("sample:")))
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl"):
            return _read_json(path)
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"{name}: unsupported file type {suffix!r} ({path}); use one of {sorted(_FILE_BUILDERS)}")
        import datasets  # only what JSON cannot do needs it

        return datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), split="train").to_list()
    import datasets

    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return load_rows(loaded, split=split, name=name)
        return datasets.load_dataset(str(path), subset, split=split).to_list()
    if source.count("/") > 1 or source.startswith((".", "~")) or Path(source).suffix.lower() in _FILE_BUILDERS:
        raise ValueError(f"{name}: no such file or directory: {source}")
    return datasets.load_dataset(source, subset, split=split).to_list()


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Carve a validation set of ``fraction`` of the rows (at least one) out of ``rows``, reproducibly."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_split must be a fraction in (0, 1), got {fraction}")
    if len(rows) < 2:
        raise ValueError(f"val_split needs at least 2 training rows, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * fraction))
    val_idx = set(order[:n_val])
    train = [row for i, row in enumerate(rows) if i not in val_idx]
    val = [row for i, row in enumerate(rows) if i in val_idx]
    return train, val
