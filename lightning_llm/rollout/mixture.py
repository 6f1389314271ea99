"""Sampling from the geometric mixture of two causal LMs (Nash-MD's second completion).

:class:`GeometricMixture` bundles a policy, a reference model and a coefficient ``c``; an engine given one in place of
a model draws every token from ``log_softmax(c · z_ref + (1 - c) · z_π)``, the normalised ``π_ref^c · π^(1-c)``, where
``z_π`` and ``z_ref`` are the two models' next-token logits on the same prefix (TRL 1.13's
``GeometricMixtureWrapper``). The sampling settings (temperature, top-k, top-p, min-p, repetition penalty) then apply
to those mixed log-probs as they would to a model's logits.

- :class:`~lightning_llm.rollout.fast.FastDecodeEngine` runs the two models side by side, one KV cache each, and
  mixes their last-position logits at every step.
- :class:`~lightning_llm.rollout.hf.HFGenerateEngine` calls ``generate`` on :meth:`GeometricMixture.for_generate`, a
  ``GenerationMixin`` over both models that runs them without a KV cache (as TRL does): correct but quadratic in the
  completion length.
- :class:`~lightning_llm.rollout.fixed.FixedRollouts` replays completions and never calls a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_llm.losses.nash_md import geometric_mixture_logps

__all__ = ["GeometricMixture"]


class GeometricMixture(nn.Module):
    """The geometric mixture of ``policy`` and ``reference`` with weight ``mixture_coef`` on the reference, as a thing
    a rollout engine samples from (see the module docstring). ``c = 0`` is the policy, ``c = 1`` the reference.

    It holds the two models as submodules (so that ``eval()`` and ``parameters()`` reach both) and has no forward of
    its own: engines call :meth:`mix` on the two models' logits.

    Args:
        policy: the policy (a ``transformers`` causal LM, possibly wrapped).
        reference: the reference model, with the policy's vocabulary; may be the policy object itself when
            ``reference_context`` turns it into the reference (a PEFT policy with its adapters disabled).
        mixture_coef: ``c`` in ``[0, 1]``.
        reference_context: a callable returning a context manager entered around every reference forward (e.g.
            ``lambda: disabled_adapters(peft_policy)``); None: none needed.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, mixture_coef: float,
                 reference_context: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        super().__init__()
        coef = float(mixture_coef)
        if not 0 <= coef <= 1:
            raise ValueError(f"GeometricMixture mixture_coef must lie in [0, 1] (0: the policy, 1: the reference), "
                             f"got {mixture_coef!r}")
        self.policy = policy
        self.reference = reference
        self.mixture_coef = coef
        self.reference_context = reference_context

    def as_reference(self) -> AbstractContextManager[Any]:
        """The context inside which :attr:`reference` computes the reference's logits."""
        return self.reference_context() if self.reference_context is not None else contextlib.nullcontext()

    def mix(self, policy_logits: Tensor, reference_logits: Tensor) -> Tensor:
        """``[..., V]`` mixed next-token log-probs (float32 or wider) from the two models' logits."""
        return geometric_mixture_logps(policy_logits, reference_logits, self.mixture_coef)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("GeometricMixture is sampled from by a rollout engine (FastDecodeEngine, HFGenerateEngine); "
                        "it has no forward of its own")

    def for_generate(self, policy: nn.Module, reference: nn.Module) -> _MixtureForGeneration:
        """A ``GenerationMixin`` whose forward returns the mixed log-probs of ``policy`` and ``reference`` (the
        unwrapped ``transformers`` models of :attr:`policy` and :attr:`reference`), for HF ``generate``."""
        return _MixtureForGeneration(policy, reference, self)

    def extra_repr(self) -> str:
        return f"mixture_coef={self.mixture_coef}"


def _generation_mixin() -> type:
    from transformers import GenerationMixin

    return GenerationMixin


class _MixtureForGeneration(_generation_mixin()):  # type: ignore[misc]
    """Both models behind ``generate``'s model interface, without a KV cache: at every step both read the whole
    sequence so far and the "logits" ``generate`` sees are the mixed log-probs."""

    main_input_name = "input_ids"
    _supports_cache_class = False
    _supports_static_cache = False
    _is_stateful = False

    def __init__(self, policy: nn.Module, reference: nn.Module, mixture: GeometricMixture) -> None:
        self.policy = policy
        self.reference = reference
        self.mixture = mixture
        self.config = policy.config
        self.generation_config = policy.generation_config
        self.device = next(policy.parameters()).device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = {**kwargs, "use_cache": False}
        kwargs.pop("past_key_values", None)
        output = self.policy(*args, **kwargs)
        with self.mixture.as_reference():
            reference_logits = self.reference(*args, **kwargs).logits
        output.logits = self.mixture.mix(output.logits, reference_logits)
        return output

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        kwargs["use_cache"] = False
        return self.policy.prepare_inputs_for_generation(*args, **kwargs)

    def _validate_model_class(self) -> None:
        self.policy._validate_model_class()

    def _validate_model_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        self.policy._validate_model_kwargs(model_kwargs)

    def __getattr__(self, name: str) -> Any:
        # whatever else generate asks of the model (its dtype, experts implementation, ...) is the policy's
        if name in ("policy", "reference", "mixture"):
            raise AttributeError(name)
        return getattr(self.policy, name)
