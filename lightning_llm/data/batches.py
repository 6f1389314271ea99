"""Typed batches: what a data module's ``collate`` hands to a module, one small frozen dataclass per kind.

A module reads a batch's attributes and never probes for keys: whether a batch is padded or padding-free, and
whether it carries precomputed reference log-probs, is stated by its fields (``None`` when absent).

=================  ============================================================  ==============================
batch              holds                                                         made by
=================  ============================================================  ==============================
``LMBatch``        ``input_ids`` and next-token ``labels`` (``-100`` = no loss)   ``SFTDataModule``
``CompletionBatch``  ``R`` prompt+completion sequences and their completion mask  (inside the two below)
``PairBatch``      ``2B`` sequences, chosen rows first; margins; reference logps  ``PreferenceDataModule``
``UnpairedBatch``  ``B`` sequences with a desirable/undesirable label; the         ``UnpairedPreferenceDataModule``
                   mismatched KL sequences; reference logps
``StepBatch``      ``input_ids`` and a class per token (``-100`` = unlabelled)     ``StepwiseDataModule``
``PromptBatch``    prompts (strings or conversations), their rows, token ids and    ``PromptDataModule``, every
                   place in the generation schedule                                data module's ``predict_data``
``RolloutBatch``   generated completions after their prompts, advantages and the   the online modules, from a
                   log-probs of generation time                                    ``PromptBatch``
=================  ============================================================  ==============================

Layouts: *padded* batches are ``[R, T]`` right-padded with an ``attention_mask``; *padding-free* ones are one row
``[1, N]`` of every sequence back to back with ``position_ids`` restarting at 0 at each sequence start (and, for
completion batches, ``seq_index``: the sequence of each token, ``-1`` on padding).

Every batch has ``to(device)`` returning a new instance: Lightning moves any object with a ``to`` method, and a
frozen dataclass cannot be changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
from torch import Tensor

#: label of a token that carries no loss (PyTorch's cross-entropy default)
IGNORE_INDEX = -100

_B = TypeVar("_B", bound="Batch")


class Batch:
    """What every typed batch shares: moving its tensors (and nested batches) returns a new batch."""

    def to(self: _B, device: torch.device | str, non_blocking: bool = False) -> _B:
        """The same batch with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self: _B) -> _B:
        """The same batch in pinned host memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self: _B, function) -> _B:
        changes = {}
        for field in fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                changes[field.name] = function(value)
            elif isinstance(value, Batch):
                changes[field.name] = value._map(function)
        return replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class LMBatch(Batch):
    """Language-modelling batch: ``labels[:, t]`` is the target of position ``t - 1`` (``-100``: no loss).

    Padded: ``input_ids``, ``labels``, ``attention_mask`` of shape ``[B, T]``. Padding-free: ``[1, N]`` with
    ``position_ids`` and no attention mask; ``num_real_tokens`` then counts the tokens that are not padding.
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor | None = None
    position_ids: Tensor | None = None
    num_real_tokens: int | None = None

    @property
    def padding_free(self) -> bool:
        return self.position_ids is not None

    def num_tokens(self) -> Tensor:
        """Tokens fed to the model, padding excluded."""
        if self.attention_mask is not None:
            return self.attention_mask.sum()
        count = self.input_ids.numel() if self.num_real_tokens is None else self.num_real_tokens
        return torch.tensor(float(count), device=self.input_ids.device)


@dataclass(frozen=True)
class CompletionBatch(Batch):
    """``num_sequences`` prompt+completion sequences, scored on their completion tokens.

    ``completion_mask`` is 1 on completion tokens (in the padding-free layout, 0 on each sequence's first token,
    which no token of the same sequence predicts).
    """

    input_ids: Tensor
    completion_mask: Tensor
    num_sequences: int
    attention_mask: Tensor | None = None
    position_ids: Tensor | None = None
    seq_index: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.attention_mask is None) == (self.seq_index is None):
            raise ValueError("a CompletionBatch is either padded (attention_mask) or padding-free (position_ids and "
                             "seq_index), not both or neither")

    @property
    def padding_free(self) -> bool:
        return self.seq_index is not None

    def num_tokens(self) -> Tensor:
        """Tokens fed to the model, padding excluded."""
        if self.attention_mask is not None:
            return self.attention_mask.sum()
        return (self.seq_index >= 0).sum()

    def first_half_tokens(self) -> Tensor:
        """Bool mask of the real tokens of the first ``num_sequences // 2`` sequences (the chosen side of pairs)."""
        half = self.num_sequences // 2
        if self.seq_index is not None:
            return (self.seq_index >= 0) & (self.seq_index < half) & (self.position_ids > 0)
        real = self.attention_mask.bool()
        rows = torch.arange(real.shape[0], device=real.device) < half
        return real & rows[:, None]


@dataclass(frozen=True)
class PairBatch(Batch):
    """Preference pairs: ``sequences`` holds the ``B`` chosen sequences, then the ``B`` rejected ones (rows ``i`` and
    ``B + i`` are one pair). ``margin`` and the precomputed reference log-probs are ``[B]`` float32, or ``None``."""

    sequences: CompletionBatch
    margin: Tensor | None = None
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.sequences.num_sequences // 2

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logps is not None and self.ref_rejected_logps is not None

    def num_tokens(self) -> Tensor:
        return self.sequences.num_tokens()


@dataclass(frozen=True)
class UnpairedBatch(Batch):
    """Unpaired feedback: ``B`` sequences with ``label`` (bool ``[B]``, True = desirable); ``kl_sequences`` pairs each
    prompt with another example's completion (KTO's KL estimate), or is ``None``. Precomputed reference log-probs of
    both are ``[B]`` float32, or ``None``."""

    sequences: CompletionBatch
    label: Tensor
    kl_sequences: CompletionBatch | None = None
    ref_logps: Tensor | None = None
    ref_kl_logps: Tensor | None = None

    def num_tokens(self) -> Tensor:
        return self.sequences.num_tokens()


@dataclass(frozen=True)
class StepBatch(Batch):
    """Stepwise supervision: ``labels[:, t]`` is the class of token ``t`` (1 correct step, 0 incorrect, ``-100``
    unlabelled), right-padded ``[B, T]``."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def num_tokens(self) -> Tensor:
        return self.attention_mask.sum()


@dataclass(frozen=True)
class PromptBatch(Batch):
    """Prompts to complete: strings or conversations (``prompts``), the row each came from (``indices``), and the
    rows' other columns (``rows``; what reward functions read).

    From :class:`~lightning_llm.data.prompts.PromptDataModule` a batch also carries each prompt's token ids
    (``prompt_ids``, unpadded) and where it stands in the generation schedule: every batch of one generation batch has
    the same ``generation`` number (unique within a run), and ``repeat`` counts the batches of it so far (``0`` to
    ``steps_per_generation * num_iterations - 1``); a module generates at a new ``generation`` number and trains the
    slice ``repeat % steps_per_generation`` of what it generated.
    """

    prompts: list
    indices: list[int]
    rows: list[dict] | None = None
    prompt_ids: list[list[int]] | None = None
    generation: int | None = None
    repeat: int = 0


@dataclass(frozen=True)
class RolloutBatch(Batch):
    """``B`` generated completions, ready for a policy-gradient loss (made by an online module from the completions
    of a :class:`PromptBatch`, TRL's ``_generate_and_score_completions`` output).

    Prompts are left-padded ``[B, P]``, completions right-padded ``[B, C]``: ``input_ids`` is their concatenation.
    ``completion_mask`` is 1 on the completion tokens that are trained (up to and with the first EOS; all 0 for a
    truncated completion under ``mask_truncated_completions``). ``advantages`` is ``[B]``; ``num_items_in_batch`` the
    trained completion tokens of the whole generation batch over all processes (what the token-sum losses divide by).
    The per-token log-probs of generation time are ``[B, C]``, ``None`` where not computed: the policy's
    (``old_per_token_logps``, for importance ratios), the reference model's, and the sampling engine's own.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    advantages: Tensor
    num_items_in_batch: Tensor
    old_per_token_logps: Tensor | None = None
    ref_per_token_logps: Tensor | None = None
    sampling_per_token_logps: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:
        """``[B, P + C]`` prompt and completion ids."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """``[B, P + C]`` 1 on prompt tokens and on trained completion tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def size(self) -> int:
        return self.completion_ids.shape[0]

    def num_tokens(self) -> Tensor:
        return self.attention_mask.sum()

    def select(self, rows: Tensor) -> RolloutBatch:
        """The completions at ``rows`` (a ``[k]`` index tensor), with the padding no selected row needs cut off."""
        picked = {}
        for item in fields(self):
            value = getattr(self, item.name)
            picked[item.name] = value[rows] if isinstance(value, Tensor) and value.dim() > 0 else value
        prompt_width = int(picked["prompt_mask"].sum(dim=1).max().item()) if rows.numel() else 0
        completion_width = int(picked["completion_mask"].sum(dim=1).max().item()) if rows.numel() else 0
        completion_width = max(completion_width, 1)
        total_p = picked["prompt_ids"].shape[1]
        for name in ("prompt_ids", "prompt_mask"):
            picked[name] = picked[name][:, total_p - max(prompt_width, 1):]
        for name in ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps",
                     "sampling_per_token_logps"):
            if picked[name] is not None:
                picked[name] = picked[name][:, :completion_width]
        return RolloutBatch(**picked)
