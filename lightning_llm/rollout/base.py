"""The rollout interface: sampling settings, the rollouts an engine returns, and the engine base class.

An online algorithm (GRPO, RLOO, PPO, ...) hands an engine the current policy, a batch of tokenized prompts and the
sampling settings; the engine returns one completion per prompt, in order, cut right after its first EOS token, and,
where it can, the log-prob of each sampled token under the distribution it was drawn from. What runs underneath (HF
``generate``, our own decode loop, replayed completions, an external server) is the engine's business.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _fail(name: str, allowed: str, value: object) -> None:
    raise ValueError(f"SamplingSettings.{name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled; the semantics of each field are those of HF ``generate``.

    With ``do_sample=False`` (greedy) only ``repetition_penalty`` and ``max_completion_length`` apply, as in
    ``generate``: temperature, top-k, top-p and min-p shape a sampling distribution only.
    """

    #: the most tokens a completion has (its EOS included)
    max_completion_length: int = 256
    #: logits are divided by it before top-k / top-p / min-p; > 0
    temperature: float = 1.0
    #: nucleus sampling: keep the most probable tokens whose probabilities add up to at least ``top_p``; in (0, 1]
    top_p: float = 1.0
    #: keep the ``top_k`` most probable tokens (ties with the k-th included); 0 = no top-k
    top_k: int = 0
    #: drop tokens whose probability is below ``min_p`` times the top token's; None = off; in [0, 1]
    min_p: float | None = None
    #: logits of tokens already present (prompt included) are divided by it when positive, multiplied when
    #: negative; 1 = off; > 0
    repetition_penalty: float = 1.0
    #: False = greedy decoding (argmax of the repetition-penalised logits)
    do_sample: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.max_completion_length) or self.max_completion_length < 1:
            _fail("max_completion_length", "an integer >= 1", self.max_completion_length)
        if not _is_real(self.temperature) or self.temperature <= 0:
            _fail("temperature", "a finite number > 0 (use do_sample=False for greedy decoding)", self.temperature)
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            _fail("top_p", "a number in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < 0:
            _fail("top_k", "an integer >= 0 (0 = no top-k)", self.top_k)
        if self.min_p is not None and (not _is_real(self.min_p) or not 0 <= self.min_p <= 1):
            _fail("min_p", "None or a number in [0, 1]", self.min_p)
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            _fail("repetition_penalty", "a finite number > 0 (1 = no penalty)", self.repetition_penalty)
        if not isinstance(self.do_sample, bool):
            _fail("do_sample", "True or False", self.do_sample)


@dataclass(frozen=True)
class Rollouts:
    """What an engine returns for a batch of prompts."""

    #: one completion per prompt, in order; cut right after the first EOS (the EOS kept); at most
    #: ``max_completion_length`` tokens; no padding
    completion_ids: list[list[int]]
    #: per completion token, the log-prob of the sampled token under the processed distribution it was drawn from
    #: (repetition penalty, temperature, top-k, top-p, min-p applied; greedy: repetition penalty only), when the
    #: engine has them
    logprobs: list[list[float]] | None = None
    #: further per-completion values (name -> one value per completion) that the reward functions receive as dataset
    #: columns, e.g. what a rollout function measured while generating
    extra_fields: dict[str, list] | None = None

    def __post_init__(self) -> None:
        for name, values in (self.extra_fields or {}).items():
            if len(values) != len(self.completion_ids):
                raise ValueError(f"Rollouts.extra_fields[{name!r}] has {len(values)} values for "
                                 f"{len(self.completion_ids)} completions; it needs one per completion")
        if self.logprobs is None:
            return
        if len(self.logprobs) != len(self.completion_ids):
            raise ValueError(f"Rollouts.logprobs has {len(self.logprobs)} rows for {len(self.completion_ids)} "
                             "completions; it needs one row per completion")
        for index, (ids, logps) in enumerate(zip(self.completion_ids, self.logprobs)):
            if len(ids) != len(logps):
                raise ValueError(f"Rollouts.logprobs[{index}] has {len(logps)} values for a completion of "
                                 f"{len(ids)} tokens; it needs one per token")


class RolloutEngine(abc.ABC):
    """A generation backend: completes a batch of prompts with the current policy."""

    #: the engine's short name (what :func:`lightning_llm.rollout.make_engine` takes)
    name: str = ""

    @abc.abstractmethod
    def generate(self, model: nn.Module, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, *,
                 eos_token_ids: Sequence[int], pad_token_id: int,
                 generator: torch.Generator | None = None, prompts: Sequence[Any] | None = None) -> Rollouts:
        """One completion per prompt of ``prompt_ids`` (token ids, no padding), sampled from ``model``.

        Args:
            model: the policy (a ``transformers`` causal LM, possibly wrapped).
            prompt_ids: the prompts, each a non-empty list of token ids.
            settings: how to sample.
            eos_token_ids: the ids that end a completion (kept as its last token).
            pad_token_id: the id used to pad prompts (left) and finished rows.
            generator: the source of randomness of sampling; None = torch's global RNG.
            prompts: the same prompts as given (strings or conversations), for engines that work from them (a user's
                rollout function, an external server); the in-process engines read ``prompt_ids`` only.
        """

    def sync_weights(self, model: nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights.

        A no-op for in-process engines, which read the weights at each call; an external engine (vLLM) receives the
        policy's new weights here, before each generation.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ----------------------------------------------------------------------------------------------------- shared helpers
def check_prompts(prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """``prompt_ids`` as lists of ints; a ``ValueError`` names the first empty prompt."""
    prompts = [list(map(int, prompt)) for prompt in prompt_ids]
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt_ids[{index}] is empty; every prompt needs at least one token")
    return prompts


def check_special_ids(eos_token_ids: Sequence[int], pad_token_id: int) -> list[int]:
    """The EOS ids as a list of ints; ``ValueError`` when there are none or the pad id is missing."""
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos = [int(token) for token in eos_token_ids]
    if not eos:
        raise ValueError("eos_token_ids is empty; give at least one id (an id that never occurs disables EOS)")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; give the id used for padding (the tokenizer's pad or EOS id)")
    return eos


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[B, P]`` (P the longest prompt), prompts aligned to the right."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_completion(ids: Sequence[int], eos_token_ids: Sequence[int], max_completion_length: int) -> int:
    """How many tokens of ``ids`` form the completion: up to and including the first EOS, at most
    ``max_completion_length``."""
    eos = set(eos_token_ids)
    limit = min(len(ids), max_completion_length)
    for position in range(limit):
        if ids[position] in eos:
            return position + 1
    return limit


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def call_seed(generator: torch.Generator | None) -> int | None:
    """A seed for one generation call drawn from ``generator`` (None without one).

    Both in-process engines turn ``generator`` into one seed per call the same way, so that the same generator state
    gives the same random stream to HF ``generate`` (through the global RNG) and to our decode loop.
    """
    if generator is None:
        return None
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside (no dropout); each submodule's own ``training`` flag restored on exit."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Inside, torch's global RNG of the CPU (and of ``device`` when it is a GPU) starts from ``seed``; the previous
    states are restored on exit. A no-op for ``seed=None``."""
    if seed is None:
        yield
        return
    gpu = device.type == "cuda"
    index = device.index if device.index is not None else (torch.cuda.current_device() if gpu else None)
    with torch.random.fork_rng(devices=[index] if gpu else [], device_type="cuda" if gpu else None):
        torch.default_generator.manual_seed(seed)
        if gpu:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
