"""Contrastive Preference Optimization and its reference-free relatives: SimPO and AlphaPO.

CPO (Xu et al., 2024, https://huggingface.co/papers/2401.08417) drops DPO's reference model: the reward of a
completion is ``β · log π(y|x)`` and a behaviour-cloning NLL term on the chosen answers (weight ``cpo_alpha``) keeps the
policy close to the preferred data. SimPO (Meng et al., 2024, https://huggingface.co/papers/2405.14734) uses the
length-averaged log-prob and a target margin ``γ``; AlphaPO (Gupta et al., 2025,
https://huggingface.co/papers/2501.03884) reshapes the reward with a parameter ``α``. Variants live in
:data:`CPO_LOSSES`; :func:`cpo_loss` is the entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast

__all__ = [
    "CPO_AVERAGE_LOGPS_LOSS_TYPES",
    "CPO_LOSSES",
    "CPOLossOutput",
    "alphapo_rewards",
    "cpo_loss",
]



def alphapo_rewards(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO reward shape (https://huggingface.co/papers/2501.03884), before the factor ``β``::

        r_α(y) = (1 - P(y)^(-α)) / α = -expm1(-α · log P(y)) / α

    which tends to ``log P(y)`` as ``α → 0``; ``α = 0`` returns ``logps`` unchanged.
    """
    if alpha == 0.0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1-ε) log σ(z) - ε log σ(-z)``: cross-entropy against the soft preference label ``1 - ε``."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def sigmoid_loss(margin: Tensor, beta: float, label_smoothing: float, simpo_gamma: float) -> Tensor:
    """CPO preference term (https://huggingface.co/papers/2401.08417, Eq. 3), label-smoothed:
    ``-(1-ε) log σ(β Δr) - ε log σ(-β Δr)``."""
    return _smoothed_logistic(beta * margin, label_smoothing)


def hinge_loss(margin: Tensor, beta: float, label_smoothing: float, simpo_gamma: float) -> Tensor:
    """SLiC-style hinge (https://huggingface.co/papers/2305.10425): ``max(0, 1 - β Δr)``. Ignores ``ε``."""
    return torch.relu(1.0 - beta * margin)


def ipo_loss(margin: Tensor, beta: float, label_smoothing: float, simpo_gamma: float) -> Tensor:
    """IPO (https://huggingface.co/papers/2310.12036, Eq. 17) without a reference: ``(Δr - 1/(2β))²``. Ignores ``ε``."""
    return (margin - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(margin: Tensor, beta: float, label_smoothing: float, simpo_gamma: float) -> Tensor:
    """SimPO (https://huggingface.co/papers/2405.14734, Eq. 6), label-smoothed: with ``z = β Δr - γ``,
    ``-(1-ε) log σ(z) - ε log σ(-z)``; ``Δr`` is the difference of length-averaged log-probs."""
    return _smoothed_logistic(beta * margin - simpo_gamma, label_smoothing)


CPO_LOSSES: dict[str, Callable[[Tensor, float, float, float], Tensor]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "alphapo": simpo_loss,
}
"""TRL's ``loss_type`` -> preference term ``(Δr [B], β, ε, γ) -> [B]``. ``alphapo`` is SimPO's loss (with the AlphaPO
reward shape chosen by ``alpha``) and, as in TRL's ``CPOConfig``, no NLL term."""

CPO_AVERAGE_LOGPS_LOSS_TYPES = frozenset({"ipo", "simpo", "alphapo"})
"""Loss types that take the *average* per-token log-prob of each completion; the others take the sum (TRL)."""


class CPOLossOutput(NamedTuple):
    """Result of :func:`cpo_loss`.

    - ``losses`` ``[B]``: preference term plus ``cpo_alpha · nll_loss`` per pair, unreduced; the training loss is
      ``losses.mean()``.
    - ``chosen_rewards`` ``[B]`` (detached): ``β · r_α(y_w)`` -> TRL's ``rewards/chosen``.
    - ``rejected_rewards`` ``[B]`` (detached): ``β · r_α(y_l)`` -> ``rewards/rejected``.
    - ``nll_loss`` scalar (detached; 0 when no NLL term) -> TRL's ``nll_loss``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    nll_loss: Tensor




def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    nll_loss: Tensor | float | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    cpo_alpha: float = 1.0,
) -> CPOLossOutput:
    """CPO / SimPO / AlphaPO loss (TRL 1.16 ``CPOTrainer`` semantics)::

        r(y)   = r_α(log P(y))                  (alphapo_rewards; r = log P(y) when α = 0)
        Δr     = r(y_w) - r(y_l)
        losses = CPO_LOSSES[loss_type](Δr) + cpo_alpha · L_NLL

    ``log P(y)`` is the summed completion log-prob, or the per-token average for the types in
    :data:`CPO_AVERAGE_LOGPS_LOSS_TYPES` (the module picks which to pass). ``L_NLL`` is the token-mean cross-entropy of
    the chosen sequences, a batch scalar added to every pair.

    Args:
        chosen_logps: ``[B]`` policy log-prob of each chosen completion (sum, or average per token, see above).
        rejected_logps: ``[B]`` same for the rejected completions.
        nll_loss: scalar ``L_NLL``; required when the NLL term is on (``cpo_alpha != 0`` and ``loss_type`` is not
            ``alphapo``).
        beta: reward temperature ``β``; for ``ipo`` the regulariser ``τ``. Must be > 0.
        loss_type: one of :data:`CPO_LOSSES`.
        label_smoothing: ``ε`` in ``[0, ½]`` for ``sigmoid``/``simpo``/``alphapo``; ignored by ``hinge``/``ipo`` (TRL
            warns and ignores it there too).
        simpo_gamma: SimPO target margin ``γ`` (used by ``simpo``/``alphapo``).
        alpha: AlphaPO reward-shape parameter ``α``; 0 keeps the log-prob reward. Applies to every loss type.
        cpo_alpha: weight of the NLL term; ignored for ``alphapo``, which has none. Must be >= 0.

    Returns:
        :class:`CPOLossOutput`.
    """
    if loss_type not in CPO_LOSSES:
        raise ValueError(f"Unknown `loss_type` {loss_type!r}; valid values are {sorted(CPO_LOSSES)}.")
    if beta <= 0:
        raise ValueError(f"`beta` must be > 0; got {beta}.")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"`label_smoothing` must lie in [0, 0.5]; got {label_smoothing}.")
    if cpo_alpha < 0:
        raise ValueError(f"`cpo_alpha` must be >= 0; got {cpo_alpha}.")
    if chosen_logps.dim() != 1:
        raise ValueError(f"`chosen_logps` must be 1-D [batch]; got shape {tuple(chosen_logps.shape)}.")
    if rejected_logps.shape != chosen_logps.shape:
        raise ValueError(
            f"`rejected_logps` must have the shape of `chosen_logps` {tuple(chosen_logps.shape)}; "
            f"got {tuple(rejected_logps.shape)}."
        )
    nll_weight = 0.0 if loss_type == "alphapo" else cpo_alpha
    if nll_weight != 0.0 and nll_loss is None:
        raise ValueError(f"`nll_loss` is required when `cpo_alpha` is {cpo_alpha} (set `cpo_alpha=0` to drop it).")

    chosen_rewards = alphapo_rewards(_upcast(chosen_logps), alpha)
    rejected_rewards = alphapo_rewards(_upcast(rejected_logps), alpha)
    losses = CPO_LOSSES[loss_type](chosen_rewards - rejected_rewards, beta, label_smoothing, simpo_gamma)
    if nll_loss is None:
        nll_loss = torch.zeros((), dtype=losses.dtype, device=losses.device)
    else:
        nll_loss = _upcast(torch.as_tensor(nll_loss, device=losses.device))
        if nll_loss.numel() != 1:
            raise ValueError(f"`nll_loss` must be a scalar; got shape {tuple(nll_loss.shape)}.")
        nll_loss = nll_loss.reshape(())
    if nll_weight != 0.0:
        losses = losses + nll_weight * nll_loss
    return CPOLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_rewards).detach(),
        rejected_rewards=(beta * rejected_rewards).detach(),
        nll_loss=nll_loss.detach(),
    )
