"""Offline assets shipped with the package: the tiny tokenizer and the sample datasets."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
DATA_DIR = ASSETS_DIR / "data"


def sample_names() -> list[str]:
    """Names of the shipped sample datasets (usable as ``train_data="sample:<name>"``)."""
    return sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))


def sample_path(name: str) -> Path:
    """Path of the shipped sample dataset ``name`` (e.g. ``"messages"``, ``"preference"``)."""
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise ValueError(f"Unknown sample dataset {name!r}; the shipped samples are {sample_names()}")
    return path
