"""Rollouts from HF ``generate``: the reference backend, and the one that works under every sharding strategy.

Prompts are left-padded (with an attention mask) and completed with ``generate``'s KV cache,
``max_new_tokens=max_completion_length``, the sampling settings mapped onto ``generate``'s arguments. Completions are
the tokens after the prompt, cut after the first EOS (kept), padding removed.

What happens under each strategy (every rank calls :meth:`HFGenerateEngine.generate` together):

- **one device, DDP**: nothing special; a DDP (or PEFT, or compiled) wrapper is looked through and ``generate``
  runs on the ``transformers`` model inside.
- **FSDP2** (``ModelParallelStrategy``, :func:`lightning_llm.models.sharding.shard_fsdp2`): nothing to gather by
  hand. ``generate`` calls the model's forward, and FSDP2's hooks on each sharded block and on the root all-gather
  that unit's parameters for the forward and free them after. Ranks finish at different lengths, so ``synced_gpus``
  (on by default when ``torch.distributed`` runs with several processes) keeps every rank stepping until all are
  done and the all-gathers pair up. ``gather_parameters`` has no effect (``DTensor`` parameters are left as they
  are by :func:`~lightning_llm.models.sharding.full_parameters`).
- **DeepSpeed ZeRO-3**: without gathering, ZeRO-3's hooks fetch each layer's parameters at every forward (correct,
  slow; ``synced_gpus`` needed). ``gather_parameters=True`` gathers every parameter once around the whole call
  (``deepspeed.zero.GatheredParameters`` through :func:`~lightning_llm.models.sharding.full_parameters`, like TRL's
  ``ds3_gather_for_generation``): much faster, at the cost of one full copy of the model on every rank.
  ``tests/rollout/test_rollout_sharded.py`` runs the gathered case on two CPU processes where ``deepspeed`` is
  installed (it is not a dependency of the project, so CI skips it).
- **FSDP1** (``FSDPStrategy``): ``generate`` runs the ``transformers`` model inside the FSDP root, never the
  root's own forward, so the parameters held by the root unit (typically embeddings, final norm, head) must be
  summoned around the call, while each nested unit (a decoder layer) gathers its own in its forward (``synced_gpus``
  needed): :func:`~lightning_llm.models.sharding.fsdp1_generation_context`, as TRL does, which the online modules
  set as ``gather=`` under that strategy. Summoning every unit (``summon_full_params`` with ``recurse=True``, what
  ``gather_parameters=True`` does for FSDP1) fails there: the nested units' forwards reshard inside the summon.
  ``tests/rollout/test_rollout_sharded.py`` runs this case on two CPU processes.

Given a :class:`~lightning_llm.rollout.mixture.GeometricMixture` instead of a model, ``generate`` runs on a wrapper
whose forward calls both models on the whole sequence so far and returns their mixed log-probs: no KV cache (as TRL
1.13's ``GeometricMixtureWrapper``), so each step recomputes the prefix; the fast engine keeps one cache per model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from lightning_llm.models.parts import unwrap_model
from lightning_llm.models.sharding import full_parameters
from lightning_llm.rollout.base import (
    RolloutEngine,
    Rollouts,
    SamplingSettings,
    call_seed,
    check_prompts,
    check_special_ids,
    cut_completion,
    eval_mode,
    left_pad,
    model_device,
    seeded,
)
from lightning_llm.rollout.mixture import GeometricMixture

#: ``generate`` arguments set to their neutral value so that a model's own ``generation_config`` (hub models often
#: ship top-k, top-p, temperature or minimum lengths) cannot change the distribution the settings describe
_NEUTRAL = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0}


def generation_kwargs(settings: SamplingSettings, default_config: Any = None) -> dict[str, Any]:
    """``generate`` keyword arguments for ``settings``; ``default_config`` is the model's ``generation_config``,
    whose sampling defaults are overridden."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_completion_length,
        "do_sample": settings.do_sample,
        "repetition_penalty": float(settings.repetition_penalty),
        **_NEUTRAL,
    }
    if settings.do_sample:
        # generate's warpers demand floats and skip themselves at their neutral values (1.0, 0, 1.0)
        kwargs.update(temperature=float(settings.temperature), top_p=float(settings.top_p), top_k=int(settings.top_k))
        if settings.min_p is not None:
            kwargs["min_p"] = float(settings.min_p)
        elif getattr(default_config, "min_p", None) is not None:
            kwargs["min_p"] = 0.0  # None would fall back to the model's default; min_p=0 filters nothing
    return kwargs


def default_synced_gpus() -> bool:
    """Whether ranks must step together: ``torch.distributed`` is initialised with more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class HFGenerateEngine(RolloutEngine):
    """Completions from HF ``generate`` (KV cache, left-padded prompts); see the module docstring for sharding.

    Args:
        return_logprobs: also return the log-prob of each sampled token under the processed distribution (from
            ``generate``'s ``output_scores``). ``generate`` then keeps every step's ``[B, V]`` float32 scores until
            it returns (B × max_completion_length × V × 4 bytes); :class:`~lightning_llm.rollout.fast.FastDecodeEngine`
            computes them on the fly.
        synced_gpus: keep every rank stepping until all ranks are done (needed when the model's forward gathers
            sharded parameters); None = on when ``torch.distributed`` runs with more than one process.
        gather_parameters: gather FSDP1 / ZeRO-3 parameters once around the whole call
            (:func:`~lightning_llm.models.sharding.full_parameters`).
        gather: a callable ``model -> context manager`` to use instead of ``full_parameters`` when
            ``gather_parameters`` is on (or always, when given).
        generate_kwargs: further ``generate`` arguments (e.g. ``{"cache_implementation": "static"}``); they win over
            the ones derived from the settings.
    """

    name = "hf"

    def __init__(self, *, return_logprobs: bool = False, synced_gpus: bool | None = None,
                 gather_parameters: bool = False,
                 gather: Callable[[nn.Module], AbstractContextManager[Any]] | None = None,
                 generate_kwargs: Mapping[str, Any] | None = None) -> None:
        self.return_logprobs = return_logprobs
        self.synced_gpus = synced_gpus
        self.gather_parameters = gather_parameters
        self.gather = gather
        self.generate_kwargs = dict(generate_kwargs or {})

    def gathered(self, model: nn.Module) -> AbstractContextManager[Any]:
        """The context inside which ``model``'s parameters are usable by ``generate`` (see the module docstring)."""
        if self.gather is not None:
            return self.gather(model)
        if self.gather_parameters:
            return full_parameters([model])
        return nullcontext()

    def generate(self, model: nn.Module, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, *,
                 eos_token_ids: Sequence[int], pad_token_id: int,
                 generator: torch.Generator | None = None, prompts: Sequence[Any] | None = None) -> Rollouts:
        prompts = check_prompts(prompt_ids)
        eos = check_special_ids(eos_token_ids, pad_token_id)
        seed = call_seed(generator)
        synced = default_synced_gpus() if self.synced_gpus is None else self.synced_gpus
        mixture = isinstance(model, GeometricMixture)
        with self.gathered(model):
            hf_model = unwrap_model(model.policy if mixture else model)
            device = model_device(hf_model)
            if mixture:  # both models behind generate's interface, without a KV cache (see rollout.mixture)
                hf_model = model.for_generate(hf_model, unwrap_model(model.reference))
            input_ids, attention_mask = left_pad(prompts, pad_token_id, device)
            kwargs = {
                **generation_kwargs(settings, getattr(hf_model, "generation_config", None)),
                "eos_token_id": eos, "pad_token_id": pad_token_id, "synced_gpus": synced, "use_cache": not mixture,
                "return_dict_in_generate": True, "output_scores": self.return_logprobs,
                **self.generate_kwargs,
            }
            with eval_mode(model), torch.no_grad(), seeded(seed, device):
                output = hf_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new_tokens = output.sequences[:, input_ids.shape[1]:]
        logprobs = _chosen_logprobs(output.scores, new_tokens) if self.return_logprobs else None
        del output  # the returned cache and scores are large; drop them before building the lists
        return _to_rollouts(new_tokens, logprobs, eos, settings.max_completion_length)


def _chosen_logprobs(scores: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log-probs of ``tokens`` under each step's processed scores (one ``[B, V]`` tensor per step),
    normalised one step at a time so that no ``[B, T, V]`` tensor is built."""
    columns = [
        torch.log_softmax(step_scores.float(), dim=-1).gather(-1, tokens[:, step, None].to(step_scores.device))[:, 0]
        for step, step_scores in enumerate(scores)
    ]
    return torch.stack(columns, dim=1)


def _to_rollouts(tokens: torch.Tensor, logprobs: torch.Tensor | None, eos: Sequence[int],
                 max_completion_length: int) -> Rollouts:
    token_rows = tokens.tolist()
    logprob_rows = logprobs.tolist() if logprobs is not None else None
    completions, kept_logprobs = [], []
    for row, ids in enumerate(token_rows):
        length = cut_completion(ids, eos, max_completion_length)
        completions.append(ids[:length])
        if logprob_rows is not None:
            kept_logprobs.append(logprob_rows[row][:length])
    return Rollouts(completions, kept_logprobs if logprob_rows is not None else None)
