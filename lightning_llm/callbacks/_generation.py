"""What the generating callbacks (win rate, completion logs) share: prompts, generation settings, rank splitting."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from lightning_llm.data.chat import conversation_text


@dataclass(frozen=True)
class GenerationSettings:
    """Keyword arguments of ``LLMModule.generate``, checked once."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def as_kwargs(self) -> dict[str, Any]:
        return dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, temperature=self.temperature,
                    top_p=self.top_p, batch_size=self.batch_size)


def check_prompt_arguments(prompts: Sequence | None, num_prompts: int | None) -> list | None:
    """Validate the ``prompts`` / ``num_prompts`` arguments of a callback; returns ``prompts`` as a list."""
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1 (or None for all), got {num_prompts}")
    if prompts is None:
        return None
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of prompts (strings or conversations), got a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty (leave it None to use the validation prompts)")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, list)):
            raise ValueError(f"prompts[{index}] must be a string or a list of messages, got {type(prompt).__name__}")
    return prompts


def resolve_prompts(trainer: Any, prompts: list | None, num_prompts: int | None) -> list:
    """The explicit ``prompts``, else the validation prompts of ``trainer.datamodule``; at most ``num_prompts``."""
    if prompts is None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "prompts"):
            raise ValueError(
                "prompts was not given and the trainer has no datamodule with prompts(); pass prompts=[...] or fit "
                "with a lightning_llm data module"
            )
        prompts = datamodule.prompts("val", limit=num_prompts)
        if not prompts:
            raise ValueError("prompts was not given and the datamodule's validation split has no prompts")
    return list(prompts[:num_prompts] if num_prompts is not None else prompts)


def prompt_texts(tokenizer: Any, prompts: Sequence) -> list[str]:
    """Prompts as the model sees them: strings as they are, conversations through the chat template."""
    return [p if isinstance(p, str) else conversation_text(tokenizer, p, add_generation_prompt=True) for p in prompts]


def generate_across_ranks(trainer: Any, pl_module: Any, prompts: list, settings: GenerationSettings,
                          model: nn.Module | None = None) -> list[str]:
    """Completions of ``prompts`` (in order, on every rank), each rank generating a contiguous share.

    Every rank generates the same number of prompts (the last share is padded with repeats, dropped afterwards), so
    sharded models run the same number of ``generate`` calls on every rank.
    """
    world = getattr(trainer, "world_size", 1)
    if world == 1 or not prompts:
        return pl_module.generate(prompts, model=model, **settings.as_kwargs())
    share = math.ceil(len(prompts) / world)
    start = trainer.global_rank * share
    mine = prompts[start: start + share]
    padded = mine + [prompts[-1]] * (share - len(mine))
    completions = pl_module.generate(padded, model=model, **settings.as_kwargs())[: len(mine)]
    return [c for rank_completions in gather_objects(completions, world) for c in rank_completions]


def gather_objects(obj: Any, world: int) -> list:
    """``obj`` of every rank, in rank order (pickled through ``torch.distributed``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size is {world} but torch.distributed is not initialised")
    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def reference_model(pl_module: Any) -> nn.Module | None:
    """The module's separate reference model (``ref_model``), or ``None`` when it has none."""
    return getattr(pl_module, "ref_model", None)
