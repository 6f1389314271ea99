"""Batching: right-padding, best-fit-decreasing packing, and padding-free (flattened) batches.

A padding-free batch is one row holding every sequence back to back, with ``position_ids`` restarting at 0 at each
sequence start and no ``attention_mask``; ``transformers`` then builds a block-diagonal causal mask from the
position restarts (and flash-attention uses the varlen kernel), so packed sequences never attend to each other.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

IGNORE_INDEX = -100


def pad_sequences(
    sequences: Sequence[Sequence[int]], value: int, *, side: str = "right", multiple_of: int | None = None,
    length: int | None = None,
) -> torch.Tensor:
    """Stack integer sequences into a ``[B, T]`` tensor padded with ``value`` on ``side``."""
    longest = max((len(s) for s in sequences), default=0)
    target = max(longest, length or 0)
    if multiple_of:
        target = -(-target // multiple_of) * multiple_of
    out = torch.full((len(sequences), target), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not len(seq):
            continue
        row = torch.as_tensor(seq, dtype=torch.long)
        if side == "right":
            out[i, : len(seq)] = row
        else:
            out[i, target - len(seq):] = row
    return out


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: group item indices into bins whose lengths sum to at most ``capacity``.

    Items are placed longest first, each into the open bin with the least room that still fits it, which wastes
    little room and keeps every item whole. Items longer than ``capacity`` must be truncated beforehand.
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"item {i} has length {size} > capacity {capacity}; truncate before packing")
        pos = bisect.bisect_left(room, (size, -1))
        if pos < len(room):
            free, b = room.pop(pos)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - size > 0:
            bisect.insort(room, (free - size, b))
    return bins


def pack_examples(examples: Sequence[dict], capacity: int, keys: Sequence[str] = ("input_ids", "labels")) -> list[dict]:
    """Concatenate examples into packed rows of at most ``capacity`` tokens (best fit decreasing).

    Each packed row keeps the per-example ``seq_lengths`` so that a padding-free collate can restart positions.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    packed = []
    for members in pack_bfd(lengths, capacity):
        row: dict = {key: [] for key in keys}
        for i in members:
            for key in keys:
                row[key].extend(examples[i][key])
        row["seq_lengths"] = [lengths[i] for i in members]
        packed.append(row)
    return packed


def position_ids_for(seq_lengths: Sequence[int]) -> list[int]:
    """``[0..n1-1, 0..n2-1, ...]`` for sequences of lengths ``n1, n2, ...``."""
    return [p for n in seq_lengths for p in range(n)]


def collate_lm(
    examples: Sequence[dict], pad_token_id: int, *, padding_free: bool = False, multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Collate tokenized language-modelling examples (``input_ids``, ``labels``, optional ``seq_lengths``).

    Padded: ``input_ids``/``attention_mask``/``labels`` of shape ``[B, T]`` (labels ``-100`` on padding).
    Padding-free: one row ``[1, N]`` with ``position_ids`` and labels ``-100`` at every sequence start, so no token
    is trained to predict the first token of the next sequence.
    """
    if not padding_free:
        return {
            "input_ids": pad_sequences([ex["input_ids"] for ex in examples], pad_token_id, multiple_of=multiple_of),
            "attention_mask": pad_sequences([[1] * len(ex["input_ids"]) for ex in examples], 0,
                                            multiple_of=multiple_of),
            "labels": pad_sequences([ex["labels"] for ex in examples], IGNORE_INDEX, multiple_of=multiple_of),
        }
    ids: list[int] = []
    labels: list[int] = []
    seq_lengths: list[int] = []
    for ex in examples:
        ids.extend(ex["input_ids"])
        labels.extend(ex["labels"])
        seq_lengths.extend(ex.get("seq_lengths") or [len(ex["input_ids"])])
    positions = position_ids_for(seq_lengths)
    labels = [IGNORE_INDEX if p == 0 else lab for p, lab in zip(positions, labels)]
    return {
        "input_ids": pad_sequences([ids], pad_token_id, multiple_of=multiple_of),
        "position_ids": pad_sequences([positions], 0, multiple_of=multiple_of),
        "labels": pad_sequences([labels], IGNORE_INDEX, multiple_of=multiple_of),
    }
