"""Nash Mirror Descent (Nash-MD), as pure functions of per-token log-probs, logits and preference probabilities.

Nash-MD (Munos et al., 2024, "Nash Learning from Human Feedback", https://huggingface.co/papers/2312.00886) seeks
the Nash equilibrium of a preference game, regularised towards a reference policy. Each step samples a completion
``y`` from the policy ``π`` and ``y'`` from the geometric mixture ``π^c_ref ∝ π_ref^c · π^(1-c)`` (in logit
space ``c · z_ref + (1 - c) · z_π``), and follows a REINFORCE estimate of the gradient of
``P(y ≻ y') - β KL(π ‖ π_ref)``. This is TRL 1.13 ``trl.experimental.nash_md.NashMDTrainer``, where the preference
probability is ``σ(s(y) - s(y'))`` of a reward model's scores and ``1/2`` serves as the control variate.

Conventions: ``B`` prompts, one policy sample and one mixture sample each; ``T`` completion positions of the policy
samples (right padding); ``mask`` ``[B, T]`` is 1 on the policy sample's completion tokens (up to and with the first
EOS, TRL's ``truncate_right`` mask). Only the policy sample is scored by the models; the mixture sample enters
through the preference alone (its reward score, or a pairwise judge's verdict: TRL 1.0's judge path takes the
judge's probability that the policy sample is better as ``P(y ≻ y')``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast

__all__ = [
    "NASH_MD_MIXTURE_COEF",
    "NashMDLossOutput",
    "check_nash_md_arguments",
    "geometric_mixture_logps",
    "nash_md_loss",
    "nash_md_metrics",
    "nash_md_probability",
]

#: TRL 1.13 ``NashMDConfig.mixture_coef`` default: the weight ``c`` of the reference logits in the mixture.
NASH_MD_MIXTURE_COEF = 0.5


def check_nash_md_arguments(
    betas: Sequence[float], mixture_coefs: Sequence[float], missing_eos_penalty: float | None
) -> None:
    """Validate Nash-MD's hyperparameters (``beta`` and ``mixture_coef`` may be lists, one value per epoch)."""
    if not betas:
        raise ValueError("`beta` must be a number or a non-empty list of numbers (one per epoch).")
    if [b for b in betas if not 0 <= b < float("inf")]:
        raise ValueError(f"every `beta` must be finite and >= 0; got {list(betas)}.")
    if not mixture_coefs:
        raise ValueError("`mixture_coef` must be a number or a non-empty list of numbers (one per epoch).")
    if [c for c in mixture_coefs if not 0 <= c <= 1]:
        raise ValueError(
            f"every `mixture_coef` must lie in [0, 1] (0: the policy itself, 1: the reference); got "
            f"{list(mixture_coefs)}."
        )
    if missing_eos_penalty is not None and not missing_eos_penalty >= 0:
        raise ValueError(f"`missing_eos_penalty` must be >= 0 (it is subtracted); got {missing_eos_penalty}.")


def geometric_mixture_logps(policy_logits: Tensor, ref_logits: Tensor, mixture_coef: float) -> Tensor:
    """Next-token log-probs of the geometric mixture: ``log_softmax(c · z_ref + (1 - c) · z_π)`` over the vocabulary.

    The distribution ``∝ π_ref^c · π^(1-c)`` that Nash-MD samples its second completion from (TRL 1.13
    ``GeometricMixtureWrapper.forward``; generation then applies its own temperature / top-k / top-p to these
    log-probs as to logits). ``c = 0`` gives the policy, ``c = 1`` the reference.

    Args:
        policy_logits: ``[..., V]`` policy logits.
        ref_logits: ``[..., V]`` reference logits at the same positions.
        mixture_coef: ``c`` in ``[0, 1]`` (TRL default 0.5).

    Returns:
        ``[..., V]`` log-probs, in the logits' dtype upcast to at least float32.
    """
    if not 0 <= mixture_coef <= 1:
        raise ValueError(f"`mixture_coef` must lie in [0, 1]; got {mixture_coef}.")
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"`ref_logits` must have the shape of `policy_logits` {tuple(policy_logits.shape)}; got "
            f"{tuple(ref_logits.shape)}."
        )
    mixed = mixture_coef * _upcast(ref_logits) + (1 - mixture_coef) * _upcast(policy_logits)
    return torch.log_softmax(mixed, dim=-1)


def nash_md_probability(scores: Tensor, mixture_scores: Tensor) -> Tensor:
    """``[B]`` preference probability of the policy sample over the mixture sample: ``σ(s(y) - s(y'))`` (Bradley-Terry
    on the reward model's scores, after any missing-EOS penalty). No gradient."""
    if scores.shape != mixture_scores.shape or scores.dim() != 1:
        raise ValueError(f"`scores` and `mixture_scores` must both be [B]; got {tuple(scores.shape)} and "
                         f"{tuple(mixture_scores.shape)}.")
    return torch.sigmoid(_upcast(scores) - _upcast(mixture_scores)).detach()


class NashMDLossOutput(NamedTuple):
    """Result of :func:`nash_md_loss` (``[B]`` unless noted; all but ``loss`` detached).

    - ``loss``: ``mean(β · kl_loss - score)`` (0-d, with gradient).
    - ``score``: ``(P - 1/2) · log π(y)`` -> ``loss/score``.
    - ``kl``: ``Σ_t m_t (log π(y_t) - log π_ref(y_t))`` -> ``loss/kl``.
    - ``logps`` / ``ref_logps``: ``log π(y)`` / ``log π_ref(y)`` of the policy sample -> ``logps/chosen`` /
      ``logps/rejected``.
    - ``probability``: ``P(y ≻ y')`` -> ``rewards/probabilities``.
    - ``beta``: the KL coefficient used.
    """

    loss: Tensor
    score: Tensor
    kl: Tensor
    logps: Tensor
    ref_logps: Tensor
    probability: Tensor
    beta: float


def nash_md_loss(
    per_token_logps: Tensor, ref_per_token_logps: Tensor, mask: Tensor, probability: Tensor, *, beta: float
) -> NashMDLossOutput:
    """The Nash-MD loss of ``B`` policy samples (TRL 1.13 ``NashMDTrainer._compute_losses``).

    With ``ℓ_t = log π(y_t)`` on the completion tokens (``m``), ``ρ_t = sg(ℓ_t - log π_ref(y_t))`` (no gradient) and
    ``P = P(y ≻ y')``::

        score = (P - 1/2) · Σ_t m_t ℓ_t            # REINFORCE on the preference, 1/2 as the control variate
        kl_loss = Σ_t m_t ρ_t ℓ_t                   # REINFORCE on KL(π ‖ π_ref): its gradient is Σ_t ρ_t ∇ℓ_t
        loss = mean_i(β · kl_loss_i - score_i)

    so ``∂loss/∂ℓ_it = (β ρ_it - (P_i - 1/2)) / B``: the policy sample is reinforced when it beats the mixture
    sample, and each token is pushed back towards the reference in proportion to its log-ratio.

    Args:
        per_token_logps: ``[B, T]`` policy log-probs of the policy sample's tokens (with gradient).
        ref_per_token_logps: ``[B, T]`` reference log-probs of the same tokens.
        mask: ``[B, T]`` completion mask; values outside it are ignored.
        probability: ``[B]`` preference probabilities (:func:`nash_md_probability`), used as constants.
        beta: ``β >= 0``, the KL coefficient (TRL default 0.1; a list per epoch there, pass this epoch's value).
    """
    if not 0 <= beta < float("inf"):
        raise ValueError(f"`beta` must be finite and >= 0; got {beta}.")
    if per_token_logps.dim() != 2:
        raise ValueError(f"`per_token_logps` must be 2-D [B, T]; got shape {tuple(per_token_logps.shape)}.")
    for name, tensor in (("ref_per_token_logps", ref_per_token_logps), ("mask", mask)):
        if tensor.shape != per_token_logps.shape:
            raise ValueError(
                f"`{name}` must have the shape of `per_token_logps` {tuple(per_token_logps.shape)}; got "
                f"{tuple(tensor.shape)}."
            )
    if probability.shape != (per_token_logps.shape[0],):
        raise ValueError(f"`probability` must be [B] = [{per_token_logps.shape[0]}]; got {tuple(probability.shape)}.")
    mask = mask.bool()
    per_token_logps = _upcast(per_token_logps)
    zero = torch.zeros((), dtype=per_token_logps.dtype, device=per_token_logps.device)
    token_logps = torch.where(mask, per_token_logps, zero)
    ref_token_logps = torch.where(mask, _upcast(ref_per_token_logps).detach(), zero)
    log_ratio = (token_logps - ref_token_logps).detach()
    logps = token_logps.sum(dim=1)
    probability = _upcast(probability).detach()
    score = (probability - 0.5) * logps
    kl_loss = (log_ratio * token_logps).sum(dim=1)
    loss = (beta * kl_loss - score).mean()
    return NashMDLossOutput(
        loss=loss,
        score=score.detach(),
        kl=log_ratio.sum(dim=1),
        logps=logps.detach(),
        ref_logps=ref_token_logps.sum(dim=1),
        probability=probability,
        beta=float(beta),
    )


@torch.no_grad()
def nash_md_metrics(
    output: NashMDLossOutput,
    scores: Tensor,
    mixture_scores: Tensor,
    *,
    contains_eos: Tensor | None = None,
    mixture_contains_eos: Tensor | None = None,
    mixture_coef: float | None = None,
) -> dict[str, Tensor | float]:
    """TRL 1.13's Nash-MD metrics of one micro-batch (``NashMDTrainer._log_statistics``), local values.

    - ``loss/score``, ``loss/kl``: means of :attr:`NashMDLossOutput.score` and ``.kl``;
    - ``logps/chosen`` / ``logps/rejected``: mean ``log π(y)`` / ``log π_ref(y)`` (both of the *policy* sample);
    - ``rewards/chosen`` / ``rewards/rejected``: mean score of the policy / mixture samples;
    - ``rewards/probabilities``: mean ``P(y ≻ y')``;
    - ``objective/entropy``: mean ``-log π(y)``;
    - ``rewards/margins``: mean ``log π(y) - log π_ref(y)``; ``rewards/accuracies``: fraction of those > 0;
    - ``val/model_contain_eos_token`` / ``val/ref_contain_eos_token`` (the mixture's; TRL's name): fraction of
      completions holding EOS, when ``contains_eos`` / ``mixture_contains_eos`` are given;
    - ``beta``, and ``mixture_coef`` when given.

    TRL gathers each value over processes and logs the mean (the global mean for equal per-process batches).
    """
    batch = output.logps.shape[0]
    for name, tensor in (("scores", scores), ("mixture_scores", mixture_scores), ("contains_eos", contains_eos),
                         ("mixture_contains_eos", mixture_contains_eos)):  # fmt: skip
        if tensor is not None and tensor.shape != (batch,):
            raise ValueError(f"`{name}` must be [B] = [{batch}]; got {tuple(tensor.shape)}.")
    margins = output.logps - output.ref_logps
    metrics: dict[str, Tensor | float] = {
        "loss/score": output.score.mean(),
        "loss/kl": output.kl.mean(),
        "logps/chosen": output.logps.mean(),
        "logps/rejected": output.ref_logps.mean(),
        "rewards/chosen": _upcast(scores).mean(),
        "rewards/rejected": _upcast(mixture_scores).mean(),
        "rewards/probabilities": output.probability.mean(),
        "objective/entropy": (-output.logps).mean(),
        "rewards/margins": margins.mean(),
        "rewards/accuracies": (margins > 0).to(margins.dtype).mean(),
    }
    if contains_eos is not None:
        metrics["val/model_contain_eos_token"] = contains_eos.to(margins.dtype).mean()
    if mixture_contains_eos is not None:
        metrics["val/ref_contain_eos_token"] = mixture_contains_eos.to(margins.dtype).mean()
    metrics["beta"] = output.beta
    if mixture_coef is not None:
        metrics["mixture_coef"] = float(mixture_coef)
    return metrics
