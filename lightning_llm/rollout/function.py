"""Rollouts from a user's function: TRL's ``rollout_func(prompts, trainer) -> dict`` contract, as an engine."""

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

#: ``rollout_func(prompts, owner) -> {"prompt_ids", "completion_ids", "logprobs", ...}``
RolloutFunc = Callable[[list, Any], dict]

_REQUIRED = ("prompt_ids", "completion_ids", "logprobs")


class FunctionRollouts(RolloutEngine):
    """Completions made by ``rollout_func``, TRL's ``GRPOTrainer(rollout_func=...)`` contract.

    ``rollout_func(prompts, owner)`` receives this process's prompts of the generation batch as given (strings or
    conversations, each repeated once per generation, in order) and ``owner`` (the TRL-style trainer that built the
    engine, or whatever object was given). It returns a dict with ``prompt_ids`` (the prompts' token ids),
    ``completion_ids`` (one list of token ids per prompt) and ``logprobs`` (per completion token the sampled token's
    log-prob, or ``None``); any other key holds one value per completion and reaches the reward functions as a
    dataset column. Completions are cut like sampled ones (after the first EOS, at ``max_completion_length``).

    Training always runs on the prompt tokens the data module made; ``prompt_ids`` must equal them (checked,
    naming the first row that differs), where TRL would train on the returned ones.
    """

    name = "function"

    def __init__(self, rollout_func: RolloutFunc, owner: Any = None) -> None:
        if not callable(rollout_func):
            raise ValueError(f"rollout_func must be callable, got {type(rollout_func).__name__}")
        self.rollout_func = rollout_func
        self.owner = owner

    def generate(self, model: nn.Module | None, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, *,
                 eos_token_ids: Sequence[int], pad_token_id: int,
                 generator: torch.Generator | None = None, prompts: Sequence[Any] | None = None) -> Rollouts:
        ids = check_prompts(prompt_ids)
        eos = check_special_ids(eos_token_ids, pad_token_id)
        if prompts is None or len(prompts) != len(ids):
            raise ValueError("FunctionRollouts needs the prompts themselves (generate(..., prompts=...)), one per "
                             "prompt_ids row")
        out = self.rollout_func(list(prompts), self.owner)
        if not isinstance(out, dict) or any(key not in out for key in _REQUIRED):
            found = sorted(out) if isinstance(out, dict) else type(out).__name__
            raise ValueError(f"rollout_func must return a dict with the keys {list(_REQUIRED)}; got {found}")
        completions = [list(map(int, row)) for row in out["completion_ids"]]
        if len(completions) != len(ids):
            raise ValueError(f"rollout_func returned {len(completions)} completions for {len(ids)} prompts; it must "
                             "return one per prompt")
        returned = out["prompt_ids"]
        if returned is not None:
            for row, (given, mine) in enumerate(zip(returned, ids)):
                if list(map(int, given)) != mine:
                    raise ValueError(f"rollout_func's prompt_ids[{row}] differ from the prompt's tokens "
                                     f"({list(given)[:8]}... vs {mine[:8]}...): tokenize prompts as the data module "
                                     "does (the chat template with a generation prompt, no special tokens added)")
        logprobs = out["logprobs"]
        lengths = [cut_completion(row, eos, settings.max_completion_length) for row in completions]
        extra = {key: list(values) for key, values in out.items() if key not in _REQUIRED}
        return Rollouts(
            completion_ids=[row[:length] for row, length in zip(completions, lengths)],
            logprobs=None if logprobs is None else [list(map(float, row))[:length]
                                                    for row, length in zip(logprobs, lengths)],
            extra_fields=extra or None,
        )
