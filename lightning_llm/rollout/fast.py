"""Our own decode loop for one device: prefill once, then one token per step with the model's KV cache.

What it saves over HF ``generate``: the per-step Python machinery (logits-processor lists, stopping-criteria lists,
growing ``input_ids`` / attention-mask concatenations, ``output_scores`` tuples). Outputs live in tensors allocated
once; logits are processed by :mod:`lightning_llm.rollout.sampling` (the semantics of ``generate``'s processors, so
the tokens come from the same distribution); the log-prob of each sampled token is computed on the fly.

On CUDA the KV cache is a ``transformers`` ``StaticCache`` (fixed shapes, kept between calls of the same batch size
and length), and the one-token decode step is ``torch.compile``-d (``mode="reduce-overhead"``: CUDA graphs); the
prefill stays eager. On CPU a ``DynamicCache`` and eager steps are the default (both choices can be forced).
Stopping when every row has produced an EOS needs a device-to-host read; on CUDA it is done every
``stop_check_interval`` steps (8) so that the GPU is not drained at each token; the few extra steps after the last
EOS cost little and change nothing (finished rows are fed padding, and their tokens are discarded).

On CPU, for the Llama family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``,
``Qwen3ForCausalLM``; see :func:`~lightning_llm.rollout.lean.supports_lean`), the steps run by default through
:class:`~lightning_llm.rollout.lean.LeanDecoder` instead of the model's ``forward``: the same computation in plain
torch ops over the model's own parameters, with a preallocated KV cache of its own. For small models the per-token
cost of HF's ``forward`` is mostly Python (module calls, mask building, cache objects), which this removes; the
tokens and log-probs are those of the HF path (the logits agree to float rounding). ``lean=False`` turns it off.

Given a :class:`~lightning_llm.rollout.mixture.GeometricMixture` instead of a model, it samples from the mixture
of its two models: both run side by side, one KV cache each, and their logits are mixed at every step.

Not for sharded models (FSDP, ZeRO-3, tensor parallel): use :class:`~lightning_llm.rollout.hf.HFGenerateEngine`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_llm.models.parts import unwrap_model
from lightning_llm.models.sharding import is_dtensor
from lightning_llm.rollout.base import (
    RolloutEngine,
    Rollouts,
    SamplingSettings,
    call_seed,
    check_prompts,
    check_special_ids,
    eval_mode,
    left_pad,
    model_device,
)
from lightning_llm.rollout.lean import LeanDecoder, lean_unsupported_reason
from lightning_llm.rollout.mixture import GeometricMixture
from lightning_llm.rollout.sampling import (
    SAMPLERS,
    draw_by_inverse_cdf,
    mark_present_,
    process_logits,
    select_tokens,
    token_presence,
)

CACHE_KINDS = ("dynamic", "static")


@dataclass
class _Batch:
    """The left-padded prompts of one call and the buffers the loop fills."""

    input_ids: Tensor  # [B, P]
    attention_mask: Tensor  # [B, C] int64: ones where a slot holds a real token (C = P + new tokens, or the cache size)
    prompt_lengths: Tensor  # [B]
    tokens: Tensor  # [B, N] the new tokens (padding after a row's EOS)
    next_input: Tensor  # [B, 1] the token fed at the next step
    logprobs: Tensor  # [B, N] float32
    lengths: Tensor  # [B] completion lengths (N until the row's EOS)
    finished: Tensor  # [B] bool


class FastDecodeEngine(RolloutEngine):
    """Completions from our own single-device decode loop (see the module docstring).

    Returns the log-prob of every sampled token under the processed distribution it was drawn from.

    Args:
        cache: ``"dynamic"`` (``DynamicCache``) or ``"static"`` (``StaticCache``: fixed shapes, what compiling
            needs); None = static on CUDA or when compiling, dynamic elsewhere.
        compile: ``torch.compile`` the one-token decode step (needs the static cache); None = on for CUDA.
        compile_mode: the ``torch.compile`` mode; None = ``"reduce-overhead"`` (CUDA graphs) on CUDA, the default
            mode elsewhere.
        stop_check_interval: look for "every row has finished" every this many steps; None = 1 on CPU, 8 on CUDA.
        cache_length_multiple: the static cache's length is prompt + completion length rounded up to a multiple of
            this, so that calls with slightly different prompt lengths reuse the cache and the compiled step.
        lean: run the prefill and the steps through :class:`~lightning_llm.rollout.lean.LeanDecoder` (plain torch
            ops on the model's parameters, its own KV cache) instead of the model's ``forward``. None = on when the
            model is on CPU, ``cache`` and ``compile`` are not set, and
            :func:`~lightning_llm.rollout.lean.supports_lean` is True for the model (else the HF forward, silently);
            True = always, and a ``ValueError`` naming the model class where it is not supported; False = off.
            ``cache`` and ``compile`` concern the HF forward, so ``lean=True`` excludes them.
        sampler: how a token is drawn from the processed distribution (the distribution is the same either way):
            ``"inverse_cdf"`` (one uniform number per row against the cumulative probabilities; the cheaper one) or
            ``"multinomial"`` (``torch.multinomial``, as ``generate``: for the same generator, the tokens
            :class:`~lightning_llm.rollout.hf.HFGenerateEngine` draws). Greedy decoding takes the argmax either way.
    """

    name = "fast"

    def __init__(self, *, cache: str | None = None, compile: bool | None = None, compile_mode: str | None = None,
                 stop_check_interval: int | None = None, cache_length_multiple: int = 64,
                 lean: bool | None = None, sampler: str = "inverse_cdf") -> None:
        if cache is not None and cache not in CACHE_KINDS:
            raise ValueError(f"FastDecodeEngine cache must be one of {CACHE_KINDS} or None, got {cache!r}")
        if compile and cache == "dynamic":
            raise ValueError("FastDecodeEngine compile=True needs cache='static' (or None): a DynamicCache grows "
                             "every step, so the compiled step would recompile at each token")
        if stop_check_interval is not None and (not isinstance(stop_check_interval, int) or stop_check_interval < 1):
            raise ValueError(f"FastDecodeEngine stop_check_interval must be an integer >= 1 or None, "
                             f"got {stop_check_interval!r}")
        if not isinstance(cache_length_multiple, int) or cache_length_multiple < 1:
            raise ValueError(f"FastDecodeEngine cache_length_multiple must be an integer >= 1, "
                             f"got {cache_length_multiple!r}")
        if lean is not None and not isinstance(lean, bool):
            raise ValueError(f"FastDecodeEngine lean must be True, False or None, got {lean!r}")
        if lean and (cache is not None or compile):
            raise ValueError("FastDecodeEngine lean=True runs its own KV cache and eager steps; leave cache and "
                             "compile unset (they choose the HF forward's cache and compilation)")
        if sampler not in SAMPLERS:
            raise ValueError(f"FastDecodeEngine sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.cache = cache
        self.compile = compile
        self.sampler = sampler
        self.lean = lean
        self.compile_mode = compile_mode
        self.stop_check_interval = stop_check_interval
        self.cache_length_multiple = cache_length_multiple
        self._static: tuple[tuple[Any, ...], Any] | None = None  # (key, StaticCache) kept between calls
        self._static_reference: tuple[tuple[Any, ...], Any] | None = None  # the same for a mixture's reference
        self._compiled: Callable[..., Tensor] | None = None

    # ------------------------------------------------------------------------------------------------ choices
    def _static_cache_on(self, device: torch.device) -> bool:
        return self.cache == "static" or (self.cache is None and (device.type == "cuda" or bool(self.compile)))

    def _compile_on(self, device: torch.device) -> bool:
        return bool(self.compile) if self.compile is not None else device.type == "cuda"

    def _lean_on(self, model: nn.Module, device: torch.device) -> bool:
        if self.lean is False:
            return False
        if self.lean is None and (device.type != "cpu" or self.cache is not None or self.compile):
            return False
        reason = lean_unsupported_reason(model)
        if reason is not None and self.lean:
            raise ValueError(f"FastDecodeEngine lean=True: no lean forward for {type(model).__name__} ({reason}); "
                             f"use lean=None or lean=False for the model's own forward")
        return reason is None

    def _interval(self, device: torch.device) -> int:
        if self.stop_check_interval is not None:
            return self.stop_check_interval
        return 8 if device.type == "cuda" else 1

    # ------------------------------------------------------------------------------------------------- generate
    def generate(self, model: nn.Module, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, *,
                 eos_token_ids: Sequence[int], pad_token_id: int,
                 generator: torch.Generator | None = None, prompts: Sequence[Any] | None = None) -> Rollouts:
        prompts = check_prompts(prompt_ids)
        eos = check_special_ids(eos_token_ids, pad_token_id)
        _check_single_device(model)
        mixture = model if isinstance(model, GeometricMixture) else None
        hf_model = unwrap_model(model.policy if mixture is not None else model)
        device = model_device(hf_model)
        seed = call_seed(generator)
        rng = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        with eval_mode(model), torch.no_grad():
            batch = self._decode(hf_model, prompts, settings, eos, pad_token_id, rng, device, mixture)
        return _to_rollouts(batch)

    def _decode(self, model: nn.Module, prompts: list[list[int]], settings: SamplingSettings, eos: list[int],
                pad_token_id: int, rng: torch.Generator | None, device: torch.device,
                mixture: GeometricMixture | None = None) -> _Batch:
        """Prefill the left-padded prompts, then feed one token per step until every row has ended (from the
        geometric mixture of ``mixture``'s two models when given: ``model`` is then its unwrapped policy)."""
        new_tokens = settings.max_completion_length
        reference = unwrap_model(mixture.reference) if mixture is not None else None
        # both models of a mixture take the same path: the masks they are fed are built for one
        lean = self._lean_on(model, device) and (reference is None or self._lean_on(reference, device))
        static = not lean and self._static_cache_on(device)
        input_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
        rows, prompt_width = input_ids.shape
        slots = prompt_width + new_tokens
        if static:
            slots = -(-slots // self.cache_length_multiple) * self.cache_length_multiple
        batch = _allocate(input_ids, prompt_mask, slots, new_tokens, pad_token_id)
        step: _Step | _LeanStep | _MixtureStep = self._make_step(model, rows, slots, device, lean, static)
        if mixture is not None:
            with mixture.as_reference():
                reference_step = self._make_step(reference, rows, slots, device, lean, static, slot="reference")
            step = _MixtureStep(step, reference_step, mixture)
        eos_ids = torch.tensor(eos, device=device)
        presence = None
        if settings.repetition_penalty != 1.0:
            vocab = _vocab_size(model)
            presence = token_presence(input_ids, vocab, prompt_mask)

        # the lean cache is sized from the mask's slots; a DynamicCache grows with the mask it is given
        logits = step.prefill(input_ids, batch.attention_mask if static or lean
                              else batch.attention_mask[:, :prompt_width], prompt_width)
        interval = self._interval(device)
        for position in range(new_tokens):
            if position > 0:
                slot = prompt_width + position - 1  # where the token fed now is stored
                batch.attention_mask[:, slot] = 1
                mask = batch.attention_mask if static else batch.attention_mask[:, : slot + 1]
                logits = step.decode(batch.next_input, batch.prompt_lengths + (position - 1), mask, slot)
            token = _sample_step(logits, settings, presence, rng, batch, position, eos_ids, pad_token_id,
                                 self.sampler)
            if presence is not None:
                mark_present_(presence, token)
            if (position + 1) % interval == 0 and bool(batch.finished.all()):
                batch.tokens = batch.tokens[:, : position + 1]
                batch.logprobs = batch.logprobs[:, : position + 1]
                break
        return batch

    def _make_step(self, model: nn.Module, rows: int, slots: int, device: torch.device, lean: bool, static: bool,
                   slot: str = "policy") -> _Step | _LeanStep:
        if lean:
            return _LeanStep(LeanDecoder(model))
        if not static:
            return _Step(model, _dynamic_cache(model), None)
        cache = self._static_cache(model, rows, slots, device, slot)
        return _Step(model, cache, self._compiled_step(device) if self._compile_on(device) else None)

    def release(self) -> None:
        """Drop the static caches kept between calls (their memory is freed once nothing else holds them)."""
        self._static = None
        self._static_reference = None

    # ----------------------------------------------------------------------------------------------- the cache
    def _static_cache(self, model: nn.Module, rows: int, slots: int, device: torch.device,
                      slot: str = "policy") -> Any:
        """A ``StaticCache`` for ``rows`` x ``slots``, reused (reset) when the last call had the same shape, so that
        the compiled step keeps its CUDA graphs (they hold the cache's addresses). A mixture's reference keeps its
        own (``slot="reference"``)."""
        from transformers import StaticCache

        attribute = "_static" if slot == "policy" else "_static_reference"
        kept = getattr(self, attribute)
        key = (id(model), rows, slots, next(model.parameters()).dtype, device)
        if kept is not None and kept[0] == key:
            cache = kept[1]
            cache.reset()
            return cache
        setattr(self, attribute, None)  # free the previous cache before allocating a new one
        cache = StaticCache(config=model.config, max_cache_len=slots)
        setattr(self, attribute, (key, cache))
        return cache

    def _compiled_step(self, device: torch.device) -> Callable[..., Tensor]:
        if self._compiled is None:
            mode = self.compile_mode
            if mode is None and device.type == "cuda":
                mode = "reduce-overhead"
            self._compiled = torch.compile(_forward_last_logits, mode=mode, dynamic=False, fullgraph=False)
        return self._compiled


# -------------------------------------------------------------------------------------------------------- the loop
def _allocate(input_ids: Tensor, prompt_mask: Tensor, slots: int, new_tokens: int, pad_token_id: int) -> _Batch:
    rows, prompt_width = input_ids.shape
    device = input_ids.device
    attention_mask = torch.zeros((rows, slots), dtype=torch.long, device=device)
    attention_mask[:, :prompt_width] = prompt_mask
    return _Batch(
        input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_mask.sum(dim=1),
        tokens=torch.full((rows, new_tokens), pad_token_id, dtype=torch.long, device=device),
        next_input=torch.full((rows, 1), pad_token_id, dtype=torch.long, device=device),
        logprobs=torch.zeros((rows, new_tokens), dtype=torch.float32, device=device),
        lengths=torch.full((rows,), new_tokens, dtype=torch.long, device=device),
        finished=torch.zeros(rows, dtype=torch.bool, device=device),
    )


def _sample_step(logits: Tensor, settings: SamplingSettings, presence: Tensor | None, rng: torch.Generator | None,
                 batch: _Batch, position: int, eos_ids: Tensor, pad_token_id: int, sampler: str) -> Tensor:
    """Choose the token at ``position`` of every row, record it and its log-prob; returns the tokens ``[B]``."""
    scores = process_logits(logits, settings, presence)  # [B, V] float32
    if settings.do_sample and sampler == "inverse_cdf":
        logprobs = torch.log_softmax(scores, dim=-1)
        token = draw_by_inverse_cdf(logprobs, rng)
        logprob = logprobs.gather(1, token[:, None])[:, 0]
    else:
        token = select_tokens(scores, settings.do_sample, rng)
        # log_softmax at one entry per row: the normaliser is a reduction, no [B, V] tensor is written
        logprob = scores.gather(1, token[:, None])[:, 0] - torch.logsumexp(scores, dim=-1)
    # finished rows are fed padding, as generate does (their tokens are discarded)
    token = token.masked_fill(batch.finished, pad_token_id)
    batch.tokens[:, position] = token
    batch.next_input[:, 0] = token  # the next step's input, in one buffer of fixed shape and strides
    batch.logprobs[:, position] = logprob
    ends_now = torch.isin(token, eos_ids) & ~batch.finished
    batch.lengths.masked_fill_(ends_now, position + 1)
    batch.finished |= ends_now
    return token


class _Step:
    """Runs the model's forward for the prefill and for one-token steps, returning float32 next-token logits."""

    def __init__(self, model: nn.Module, cache: Any, compiled: Callable[..., Tensor] | None) -> None:
        self.model = model
        self.cache = cache
        self.compiled = compiled
        parameters = inspect.signature(model.forward).parameters
        # transformers renamed past_key_values to cache (5.x) and dropped cache_position; support both
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.cache_position = "cache_position" in parameters
        self.logits_to_keep = "logits_to_keep" in parameters

    def _kwargs(self, first_slot: int, width: int, device: torch.device) -> dict[str, Any]:
        kwargs: dict[str, Any] = {self.cache_arg: self.cache}
        if self.cache_position:
            kwargs["cache_position"] = torch.arange(first_slot, first_slot + width, device=device)
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return kwargs

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
        position_ids = _prompt_positions(attention_mask[:, :prompt_width])
        kwargs = self._kwargs(0, prompt_width, input_ids.device)
        return _forward_last_logits(self.model, input_ids, position_ids, attention_mask, kwargs)

    def decode(self, tokens: Tensor, positions: Tensor, attention_mask: Tensor, slot: int) -> Tensor:
        kwargs = self._kwargs(slot, 1, tokens.device)
        if self.compiled is None:
            return _forward_last_logits(self.model, tokens, positions[:, None], attention_mask, kwargs)
        if tokens.device.type == "cuda":
            # the CUDA graphs of the previous step may be overwritten now: nothing of them is held any more
            torch.compiler.cudagraph_mark_step_begin()
        # clone: a CUDA graph's output buffer is rewritten by its next replay
        return self.compiled(self.model, tokens, positions[:, None], attention_mask, kwargs).clone()


class _LeanStep:
    """:class:`_Step`'s interface over a :class:`~lightning_llm.rollout.lean.LeanDecoder`."""

    def __init__(self, decoder: LeanDecoder) -> None:
        self.decoder = decoder

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
        position_ids = _prompt_positions(attention_mask[:, :prompt_width])
        return self.decoder.prefill(input_ids, attention_mask, position_ids)

    def decode(self, tokens: Tensor, positions: Tensor, attention_mask: Tensor, slot: int) -> Tensor:
        return self.decoder.decode(tokens, positions[:, None], attention_mask, slot)


class _MixtureStep:
    """Two steps side by side, one KV cache each: the policy's and the reference's next-token logits, mixed by a
    :class:`~lightning_llm.rollout.mixture.GeometricMixture` into the log-probs sampled from."""

    def __init__(self, policy: _Step | _LeanStep, reference: _Step | _LeanStep, mixture: GeometricMixture) -> None:
        self.policy = policy
        self.reference = reference
        self.mixture = mixture

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
        policy_logits = self.policy.prefill(input_ids, attention_mask, prompt_width)
        with self.mixture.as_reference():
            reference_logits = self.reference.prefill(input_ids, attention_mask, prompt_width)
        return self.mixture.mix(policy_logits, reference_logits)

    def decode(self, tokens: Tensor, positions: Tensor, attention_mask: Tensor, slot: int) -> Tensor:
        policy_logits = self.policy.decode(tokens, positions, attention_mask, slot)
        with self.mixture.as_reference():
            reference_logits = self.reference.decode(tokens, positions, attention_mask, slot)
        return self.mixture.mix(policy_logits, reference_logits)


def _prompt_positions(prompt_mask: Tensor) -> Tensor:
    """``[B, P]`` positions that count real tokens only (left padding gets position 0), as ``generate`` does."""
    return (prompt_mask.cumsum(dim=-1) - 1).masked_fill(prompt_mask == 0, 0)


def _forward_last_logits(model: nn.Module, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                         kwargs: dict[str, Any]) -> Tensor:
    """``[B, V]`` float32 logits of the last position (the function the decode step compiles)."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   **kwargs)
    return output.logits[:, -1].float()


def _dynamic_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers versions whose DynamicCache takes no config
        return DynamicCache()


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def _check_single_device(model: nn.Module) -> None:
    """``ValueError`` for a sharded model (FSDP1, FSDP2 / tensor parallel, ZeRO-3): this loop does not gather."""
    sharded = any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()) or any(
        is_dtensor(param) or hasattr(param, "ds_id") for param in model.parameters())
    if sharded:
        raise ValueError("FastDecodeEngine runs on one device and the model's parameters are sharded (FSDP, "
                         "tensor parallel or ZeRO-3); use HFGenerateEngine (rollout engine 'hf') for sharded models")


def _to_rollouts(batch: _Batch) -> Rollouts:
    """The buffers as lists, each row cut at its length (one device-to-host copy per buffer)."""
    tokens, logprobs, lengths = batch.tokens.tolist(), batch.logprobs.tolist(), batch.lengths.tolist()
    return Rollouts(
        completion_ids=[row[:length] for row, length in zip(tokens, lengths)],
        logprobs=[row[:length] for row, length in zip(logprobs, lengths)],
    )
