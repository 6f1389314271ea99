"""Replayed rollouts: completions given in advance, for tests, parity checks against another library's run, and
offline debugging of an algorithm without a sampler in the way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_llm.rollout.base import (
    RolloutEngine,
    Rollouts,
    SamplingSettings,
    check_prompts,
    check_special_ids,
    cut_completion,
)

#: what a completion source callable may return for a batch of prompts
CompletionSource = Callable[[list[list[int]]], "Sequence[Sequence[int]] | Rollouts"]


class FixedRollouts(RolloutEngine):
    """Replays given completions; the model is not called.

    Each completion is cut like a sampled one: right after its first EOS (kept), at most ``max_completion_length``
    tokens; its log-probs, when given, are cut with it.

    Args:
        completions: either a list of completions (token-id lists) consumed in order across calls, one per prompt;
            or a callable ``prompt_ids -> completions`` (a list with one completion per prompt, or a
            :class:`~lightning_llm.rollout.base.Rollouts`, whose log-probs are then replayed too).
        logprobs: per-token log-probs of the listed completions (one list per completion, as long as it); only
            with a list of completions.
    """

    name = "fixed"

    def __init__(self, completions: Sequence[Sequence[int]] | CompletionSource,
                 logprobs: Sequence[Sequence[float]] | None = None) -> None:
        self.source: CompletionSource | None = completions if callable(completions) else None
        if self.source is not None:
            if logprobs is not None:
                raise ValueError("FixedRollouts logprobs go with a list of completions; a callable returns them "
                                 "itself (as a Rollouts)")
            self.completions: list[list[int]] = []
            self.logprobs: list[list[float]] | None = None
        else:
            self.completions = [list(map(int, ids)) for ids in completions]
            self.logprobs = [list(map(float, row)) for row in logprobs] if logprobs is not None else None
            # the same checks as any rollout's
            Rollouts(self.completions, self.logprobs)
        self.used = 0

    @property
    def remaining(self) -> int:
        """How many listed completions are left to replay."""
        return len(self.completions) - self.used

    def generate(self, model: nn.Module | None, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, *,
                 eos_token_ids: Sequence[int], pad_token_id: int,
                 generator: torch.Generator | None = None, prompts: Sequence[Any] | None = None) -> Rollouts:
        prompts = check_prompts(prompt_ids)
        eos = check_special_ids(eos_token_ids, pad_token_id)
        completions, logprobs = self._next(prompts)
        lengths = [cut_completion(ids, eos, settings.max_completion_length) for ids in completions]
        return Rollouts(
            completion_ids=[ids[:length] for ids, length in zip(completions, lengths)],
            logprobs=[row[:length] for row, length in zip(logprobs, lengths)] if logprobs is not None else None,
        )

    def _next(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]] | None]:
        if self.source is not None:
            return self._from_source(prompts)
        needed = len(prompts)
        if needed > self.remaining:
            raise ValueError(f"FixedRollouts is exhausted: it holds {len(self.completions)} completions, "
                             f"{self.used} were replayed, and this call needs {needed} (one per prompt)")
        start, self.used = self.used, self.used + needed
        logprobs = [list(row) for row in self.logprobs[start: self.used]] if self.logprobs is not None else None
        return [list(ids) for ids in self.completions[start: self.used]], logprobs

    def _from_source(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]] | None]:
        produced = self.source(prompts)
        if isinstance(produced, Rollouts):
            completions, logprobs = produced.completion_ids, produced.logprobs
        else:
            completions, logprobs = list(produced), None
        if len(completions) != len(prompts):
            raise ValueError(f"FixedRollouts' completion callable returned {len(completions)} completions for "
                             f"{len(prompts)} prompts; it must return one per prompt")
        self.used += len(prompts)
        completions = [list(map(int, ids)) for ids in completions]
        return completions, [list(map(float, row)) for row in logprobs] if logprobs is not None else None
