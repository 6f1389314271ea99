"""Shared plumbing of the judges that run a local ``transformers`` model: device, batching, chat formatting."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


def resolve_device(device: str | torch.device | None, model: nn.Module, loaded: bool) -> torch.device:
    """The device to run the judge on: ``device`` if given; else CUDA (when present) for a model the judge loaded
    itself, or the device a model object passed in already lives on."""
    if device is not None:
        return torch.device(device)
    if not loaded:
        first = next(model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batched(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``batch_size`` elements."""
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` if it is a positive integer, else a ``ValueError`` naming it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
