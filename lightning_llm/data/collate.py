"""Batching: right-padding, best-fit-decreasing packing, and padding-free (flattened) batches.

A padding-free batch is one row holding every sequence back to back, with ``position_ids`` restarting at 0 at each
sequence start and no ``attention_mask``; ``transformers`` then builds a block-diagonal causal mask from the
position restarts (and flash-attention uses the varlen kernel), so packed sequences never attend to each other.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import torch

from lightning_llm.data.batches import IGNORE_INDEX, CompletionBatch, LMBatch


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


def pack_table(table: Any, capacity: int, keys: Sequence[str] = ("input_ids", "labels")) -> Any:
    """:func:`pack_examples` on a ``pyarrow.Table`` of list columns, without leaving Arrow: the rows are taken in
    bin order and each column's values regrouped at the bin boundaries. The same rows, in the same order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = pc.list_value_length(table[keys[0]]).to_numpy(zero_copy_only=False).astype(np.int64)
    bins = pack_bfd(lengths.tolist(), capacity)
    order = np.fromiter((i for members in bins for i in members), dtype=np.int64, count=len(lengths))
    taken = table.take(pa.array(order))
    seq_lengths = lengths[order]
    seq_starts = np.concatenate([[0], np.cumsum([len(members) for members in bins])])  # first sequence of each bin
    token_starts = np.concatenate([[0], np.cumsum(seq_lengths)])[seq_starts]  # first token of each bin
    columns = {}
    for key in keys:
        values = pc.list_flatten(taken[key]).combine_chunks()
        columns[key] = pa.ListArray.from_arrays(pa.array(token_starts, pa.int64()), values)
    columns["seq_lengths"] = pa.ListArray.from_arrays(pa.array(seq_starts, pa.int64()),
                                                      pa.array(seq_lengths, pa.int32()))
    return pa.table(columns)


def position_ids_for(seq_lengths: Sequence[int]) -> list[int]:
    """``[0..n1-1, 0..n2-1, ...]`` for sequences of lengths ``n1, n2, ...``."""
    return [p for n in seq_lengths for p in range(n)]


def collate_lm(
    examples: Sequence[dict], pad_token_id: int, *, padding_free: bool = False, multiple_of: int | None = None
) -> LMBatch:
    """Collate tokenized language-modelling examples (``input_ids``, ``labels``, optional ``seq_lengths``).

    Padded: ``input_ids``/``attention_mask``/``labels`` of shape ``[B, T]`` (labels ``-100`` on padding).
    Padding-free: one row ``[1, N]`` with ``position_ids`` and labels ``-100`` at every sequence start, so no token
    is trained to predict the first token of the next sequence.
    """
    if not padding_free:
        return LMBatch(
            input_ids=pad_sequences([ex["input_ids"] for ex in examples], pad_token_id, multiple_of=multiple_of),
            attention_mask=pad_sequences([[1] * len(ex["input_ids"]) for ex in examples], 0, multiple_of=multiple_of),
            labels=pad_sequences([ex["labels"] for ex in examples], IGNORE_INDEX, multiple_of=multiple_of),
        )
    ids: list[int] = []
    labels: list[int] = []
    seq_lengths: list[int] = []
    for ex in examples:
        ids.extend(ex["input_ids"])
        labels.extend(ex["labels"])
        seq_lengths.extend(ex.get("seq_lengths") or [len(ex["input_ids"])])
    positions = position_ids_for(seq_lengths)
    labels = [IGNORE_INDEX if p == 0 else lab for p, lab in zip(positions, labels)]
    return LMBatch(
        input_ids=pad_sequences([ids], pad_token_id, multiple_of=multiple_of),
        position_ids=pad_sequences([positions], 0, multiple_of=multiple_of),
        labels=pad_sequences([labels], IGNORE_INDEX, multiple_of=multiple_of),
        num_real_tokens=len(ids),
    )


def collate_completions(
    sequences: Sequence[Sequence[int]], completion_masks: Sequence[Sequence[int]], pad_token_id: int, *,
    padding_free: bool = False, multiple_of: int | None = None,
) -> CompletionBatch:
    """Batch prompt+completion token sequences with their 0/1 completion masks.

    Padded: ``[R, T]`` right-padded with an attention mask. Padding-free: one row of every sequence back to back,
    ``position_ids`` restarting at each sequence, ``seq_index`` naming each token's sequence (``-1`` on padding), and
    the completion mask 0 on each sequence's first token (predicted by no token of its own sequence).
    """
    if not padding_free:
        return CompletionBatch(
            input_ids=pad_sequences(sequences, pad_token_id, multiple_of=multiple_of),
            attention_mask=pad_sequences([[1] * len(s) for s in sequences], 0, multiple_of=multiple_of),
            completion_mask=pad_sequences(completion_masks, 0, multiple_of=multiple_of),
            num_sequences=len(sequences),
        )
    lengths = [len(s) for s in sequences]
    positions = position_ids_for(lengths)
    flat_mask = [m if p > 0 else 0 for p, m in zip(positions, (x for mask in completion_masks for x in mask))]
    return CompletionBatch(
        input_ids=pad_sequences([[t for s in sequences for t in s]], pad_token_id, multiple_of=multiple_of),
        position_ids=pad_sequences([positions], 0, multiple_of=multiple_of),
        completion_mask=pad_sequences([flat_mask], 0, multiple_of=multiple_of),
        seq_index=pad_sequences([[i for i, n in enumerate(lengths) for _ in range(n)]], -1, multiple_of=multiple_of),
        num_sequences=len(sequences),
    )


def float_column(examples: Sequence[dict], key: str) -> torch.Tensor | None:
    """``[B]`` float32 tensor of ``key`` of every example, or ``None`` when the examples do not carry it."""
    if not examples or examples[0].get(key) is None:
        return None
    return torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
