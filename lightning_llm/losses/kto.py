"""Kahneman-Tversky Optimization (KTO; Ethayarajh et al., 2024, https://huggingface.co/papers/2402.01306).

KTO learns from unpaired binary feedback: each example is a completion labelled desirable or undesirable. The implied
reward ``r = log π(y|x) - log π_ref(y|x)`` is compared with a reference point ``z₀``, an estimate of
``KL(π || π_ref)`` over the batch, through a sigmoid "value function". Variants live in :data:`KTO_LOSSES`;
:func:`kto_loss` is the entry point; :func:`kto_kl_estimate` gives the reference point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast

__all__ = [
    "KTO_LOSSES",
    "KTOLossOutput",
    "KTOWeightRanges",
    "kto_kl_estimate",
    "kto_loss",
    "kto_weight_ranges",
]



def kto_value_loss(logratios: Tensor, desirable: Tensor, kl: Tensor, beta: float) -> Tensor:
    """KTO (https://huggingface.co/papers/2402.01306, Eq. 7), per example, before the class weights::

    desirable:    1 - σ(β (r - z₀))
    undesirable:  1 - σ(β (z₀ - r))
    """
    return torch.where(
        desirable, 1.0 - torch.sigmoid(beta * (logratios - kl)), 1.0 - torch.sigmoid(beta * (kl - logratios))
    )


def apo_zero_unpaired_loss(logratios: Tensor, desirable: Tensor, kl: Tensor, beta: float) -> Tensor:
    """Unpaired APO-zero (D'Oosterlinck et al., 2024, https://huggingface.co/papers/2408.06266, Eq. 7 per example)::

        desirable:    1 - σ(β r)
        undesirable:  σ(β r)

    No reference point: ``kl`` is not read.
    """
    return torch.where(desirable, 1.0 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios))


KTO_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor, float], Tensor]] = {
    "kto": kto_value_loss,
    "apo_zero_unpaired": apo_zero_unpaired_loss,
}
"""TRL's ``loss_type`` -> per-example loss ``(log-ratios [B], desirable [B] bool, z₀ scalar, β) -> [B]``."""

_USES_KL = frozenset({"kto"})


class KTOLossOutput(NamedTuple):
    """Result of :func:`kto_loss`.

    - ``losses`` ``[B]`` in batch order, class-weighted and unreduced; the training loss is ``losses.mean()``.
    - ``chosen_rewards`` ``[n_desirable]`` (detached): ``β r`` of the desirable examples -> TRL's ``rewards/chosen``
      (sum over the gathered batch / gathered count).
    - ``rejected_rewards`` ``[n_undesirable]`` (detached): same for undesirable ones -> ``rewards/rejected``.
    - ``kl`` scalar (detached): the reference point ``z₀`` actually used (0 for ``apo_zero_unpaired``) -> TRL's ``kl``.

    TRL's ``rewards/margins`` is ``rewards/chosen - rewards/rejected`` of those batch means.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    kl: Tensor


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl: Tensor | float | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO loss over an unpaired batch (TRL 1.16 ``KTOTrainer`` semantics)::

        r_i    = log π(y_i|x_i) - log π_ref(y_i|x_i)
        z₀     = max(kl, 0)
        losses = λ_{label_i} · KTO_LOSSES[loss_type](r_i, label_i, z₀)

    with ``λ_D = desirable_weight``, ``λ_U = undesirable_weight`` (Eq. 8 of the paper recommends
    ``λ_D n_D / (λ_U n_U)`` in ``[1, 4/3]``; see :func:`kto_weight_ranges`). ``z₀`` enters as a constant (detached), as
    in the paper, where it only sets the saturation point.

    Args:
        policy_logps: ``[B]`` policy log-prob of each completion (summed over its tokens).
        ref_logps: ``[B]`` reference log-prob of each completion.
        labels: ``[B]`` bool (or 0/1), True for desirable completions.
        kl: scalar ``KL(π || π_ref)`` estimate, **already averaged across processes** (see :func:`kto_kl_estimate`);
            required for ``"kto"``, ignored by ``"apo_zero_unpaired"``. Clamped at 0 here.
        beta: temperature ``β``; must be > 0.
        loss_type: one of :data:`KTO_LOSSES`.
        desirable_weight: ``λ_D`` >= 0.
        undesirable_weight: ``λ_U`` >= 0.

    Returns:
        :class:`KTOLossOutput`.
    """
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"Unknown `loss_type` {loss_type!r}; valid values are {sorted(KTO_LOSSES)}.")
    if beta <= 0:
        raise ValueError(f"`beta` must be > 0; got {beta}.")
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if weight < 0:
            raise ValueError(f"`{name}` must be >= 0; got {weight}.")
    if policy_logps.dim() != 1:
        raise ValueError(f"`policy_logps` must be 1-D [batch]; got shape {tuple(policy_logps.shape)}.")
    for name, tensor in (("ref_logps", ref_logps), ("labels", labels)):
        if tensor.shape != policy_logps.shape:
            raise ValueError(
                f"`{name}` must have the shape of `policy_logps` {tuple(policy_logps.shape)}; "
                f"got {tuple(tensor.shape)}."
            )
    if loss_type in _USES_KL and kl is None:
        raise ValueError(f"`kl` (the batch KL estimate, see `kto_kl_estimate`) is required by loss_type {loss_type!r}.")

    logratios = _upcast(policy_logps) - _upcast(ref_logps)
    if loss_type in _USES_KL:
        kl = _upcast(torch.as_tensor(kl, device=logratios.device)).detach()
        if kl.numel() != 1:
            raise ValueError(f"`kl` must be a scalar; got shape {tuple(kl.shape)}.")
        kl = kl.reshape(()).clamp(min=0)
    else:
        kl = torch.zeros((), dtype=logratios.dtype, device=logratios.device)
    desirable = labels.to(device=logratios.device).bool()
    class_weights = torch.where(desirable, desirable_weight, undesirable_weight).to(logratios.dtype)
    losses = class_weights * KTO_LOSSES[loss_type](logratios, desirable, kl, beta)
    rewards = (beta * logratios).detach()
    return KTOLossOutput(
        losses=losses,
        chosen_rewards=rewards[desirable],
        rejected_rewards=rewards[~desirable],
        kl=kl,
    )


@torch.no_grad()
def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """This process's share of the KTO reference point (https://huggingface.co/papers/2402.01306).

    ``z₀ = KL(π || π_ref)`` is estimated on *mismatched* pairs ``(x_i, y_j)`` (TRL: each prompt with the completion
    of its neighbour in the batch), where neither model was trained to answer, as the mean log-ratio::

        ẑ = (1/B) Σ_i [log π(y_j|x_i) - log π_ref(y_j|x_i)]

    The module must then **all-gather this scalar across processes and take the mean** (every process contributes one
    value, as TRL's ``gather_for_metrics(kl).mean()``) and pass the result to :func:`kto_loss`, which clamps it at 0.
    Computed without gradient: the reference point is a constant of the loss.

    Args:
        policy_kl_logps: ``[B]`` policy log-probs of the mismatched completions (summed over tokens).
        ref_kl_logps: ``[B]`` reference log-probs of the same.

    Returns:
        Scalar local estimate (not clamped).
    """
    if policy_kl_logps.dim() != 1 or policy_kl_logps.shape != ref_kl_logps.shape:
        raise ValueError(
            "`policy_kl_logps` and `ref_kl_logps` must both be 1-D [batch] of the same size; got "
            f"{tuple(policy_kl_logps.shape)} and {tuple(ref_kl_logps.shape)}."
        )
    if policy_kl_logps.numel() == 0:
        raise ValueError("`policy_kl_logps` is empty; the KL estimate needs at least one mismatched pair.")
    return (_upcast(policy_kl_logps) - _upcast(ref_kl_logps)).mean()


class KTOWeightRanges(NamedTuple):
    """Recommended ranges for the KTO class weights given the dataset's class counts (each ``(low, high)``).

    Adjust *one* of the two weights into its range, not both.
    """

    desirable: tuple[float, float]
    undesirable: tuple[float, float]

    def contains(self, desirable_weight: float, undesirable_weight: float) -> bool:
        """True when either weight already lies in its recommended range."""
        low, high = self.desirable
        if low <= desirable_weight <= high:
            return True
        low, high = self.undesirable
        return low <= undesirable_weight <= high


def kto_weight_ranges(
    num_desirable: int, num_undesirable: int, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> KTOWeightRanges:
    """Class-weight ranges from Eq. 8 of https://huggingface.co/papers/2402.01306::

        1 <= (λ_D n_D) / (λ_U n_U) <= 4/3

    solved for ``λ_D`` with ``λ_U`` fixed, and for ``λ_U`` with ``λ_D`` fixed. Bounds are rounded to two decimals and
    4/3 is taken as 1.33, as in TRL's imbalance warning, so :meth:`KTOWeightRanges.contains` agrees with when TRL
    warns. Counts below 1 are raised to 1.
    """
    if num_desirable < 0 or num_undesirable < 0:
        raise ValueError(
            f"`num_desirable` and `num_undesirable` must be >= 0; got {num_desirable} and {num_undesirable}."
        )
    num_desirable, num_undesirable = max(num_desirable, 1), max(num_undesirable, 1)
    desirable_base = num_undesirable * undesirable_weight / num_desirable
    undesirable_base = num_desirable * desirable_weight / num_undesirable
    return KTOWeightRanges(
        desirable=(round(desirable_base, 2), round(desirable_base * 1.33, 2)),
        undesirable=(round(undesirable_base / 1.33, 2), round(undesirable_base, 2)),
    )
