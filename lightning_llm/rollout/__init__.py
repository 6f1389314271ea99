"""Generation backends for the online algorithms, behind one interface.

An online module (GRPO, RLOO, PPO, Online DPO, ...) holds a :class:`RolloutEngine` and calls, once per generation
round, ``engine.sync_weights(policy)`` then
``engine.generate(policy, prompt_ids, settings, eos_token_ids=..., pad_token_id=..., generator=...)``, which returns
:class:`Rollouts`: one completion per prompt, in order, cut right after its first EOS (kept), and where the engine
has them, the log-prob of each sampled token under the distribution it was drawn from.

- :class:`HFGenerateEngine` (``"hf"``): HF ``generate`` with its KV cache; works under DDP, FSDP1, FSDP2 and ZeRO-3
  (``synced_gpus``, parameter gathering); log-probs on request.
- :class:`FastDecodeEngine` (``"fast"``): our one-device decode loop: prefill once, one token per step, outputs
  allocated once, our logits processing (:mod:`~lightning_llm.rollout.sampling`, the distribution of ``generate``);
  static cache and ``torch.compile`` on CUDA; always returns log-probs.
- :class:`FixedRollouts` (``"fixed"``): replays given completions (tests, parity checks, offline debugging).
- :class:`FunctionRollouts`: completions from a user's ``rollout_func(prompts, trainer)`` (TRL's contract).

``make_engine("fast")`` (or ``"hf"``, ``"fixed"``, with the class's keyword arguments) builds one by name.

Plugging in vLLM
----------------
A vLLM backend is one more :class:`RolloutEngine`; nothing else changes. Two shapes, as in TRL:

- **colocated**: the engine owns a ``vllm.LLM(model=..., gpu_memory_utilization=..., enable_sleep_mode=True)`` on
  the training GPUs. ``generate`` turns :class:`SamplingSettings` into
  ``vllm.SamplingParams(max_tokens=max_completion_length, temperature=..., top_p=..., top_k=top_k or -1,
  min_p=min_p or 0.0, repetition_penalty=..., stop_token_ids=eos_token_ids, logprobs=0, seed=...)`` (greedy:
  ``temperature=0``), calls ``llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)`` and reads
  ``output.outputs[0].token_ids`` and the sampled tokens' log-probs, then applies the same EOS cut;
- **server**: ``vllm serve`` (TRL's ``trl vllm-serve``) on separate GPUs; ``generate`` posts the prompt ids and
  sampling parameters to it and reads the same fields back.

``sync_weights(policy)`` is where it differs from the in-process engines: before each generation round, it pushes
the policy's current weights to vLLM — colocated, through the model's ``load_weights`` with ``(name, tensor)`` pairs
(the vLLM model behind the ``LLM`` object, reached with ``llm.collective_rpc`` on recent vLLM versions); server,
through a weight-update channel (an NCCL broadcast from rank 0, as TRL's ``VLLMClient.update_named_param``). Under
sharding every rank takes part in gathering each parameter (:func:`lightning_llm.models.sharding.read_full` inside
:func:`~lightning_llm.models.sharding.full_parameters`, or
:func:`~lightning_llm.models.sharding.full_state_dict`), names are cleaned of wrapper prefixes
(:func:`~lightning_llm.models.sharding.clean_name`), PEFT adapters are merged into the weights first, and only rank
0 sends. Then ``llm.reset_prefix_cache()``: cached prefixes were computed with the old weights. :class:`Rollouts`
log-probs are those of the processed distribution; vLLM reports raw log-probs unless asked for processed ones
(``logprobs_mode="processed_logprobs"`` on recent versions), and its numerics differ slightly from the trainer's,
which is why TRL corrects vLLM-sampled rollouts with truncated importance sampling.
"""

from __future__ import annotations

from typing import Any

from lightning_llm.rollout.base import RolloutEngine, Rollouts, SamplingSettings
from lightning_llm.rollout.fast import FastDecodeEngine
from lightning_llm.rollout.fixed import FixedRollouts
from lightning_llm.rollout.function import FunctionRollouts
from lightning_llm.rollout.hf import HFGenerateEngine

#: engine name -> class
ENGINES: dict[str, type[RolloutEngine]] = {
    HFGenerateEngine.name: HFGenerateEngine,
    FastDecodeEngine.name: FastDecodeEngine,
    FixedRollouts.name: FixedRollouts,
}


def make_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """The rollout engine called ``name`` (``"hf"``, ``"fast"`` or ``"fixed"``), built with ``kwargs``."""
    if name not in ENGINES:
        raise ValueError(f"Unknown rollout engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name](**kwargs)


__all__ = [
    "ENGINES", "FastDecodeEngine", "FixedRollouts", "FunctionRollouts", "HFGenerateEngine", "RolloutEngine", "Rollouts",
    "SamplingSettings", "make_engine",
]
