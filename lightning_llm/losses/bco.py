"""Binary Classifier Optimization (BCO; Jung et al., 2024, https://huggingface.co/papers/2404.04656).

BCO learns from unpaired thumbs-up / thumbs-down feedback by training the implicit reward
``r = β (log π(y|x) - log π_ref(y|x))`` as the logit of a binary classifier, shifted by ``δ``, the running mean of the
rewards seen so far (kept by the module in a ``RunningMoments``). With underlying distribution matching (UDM), the
undesirable examples are reweighted by a prompt density ratio so that both classes look as if they came from the same
prompt distribution.

Order of operations in the module, per training step: ``rewards = bco_rewards(...)``; update the running moments with
``rewards.detach()`` (all processes); ``delta = running.mean``; ``bco_loss(..., delta=delta)``. In evaluation the
moments are not updated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast

__all__ = ["BCOLossOutput", "bco_loss", "bco_rewards", "bco_udm_weights"]



def bco_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float = 0.1) -> Tensor:
    """Implicit rewards ``r = β (log π(y|x) - log π_ref(y|x))``, ``[B]``, with gradient (detach before feeding the
    running moments)."""
    if beta <= 0:
        raise ValueError(f"`beta` must be > 0; got {beta}.")
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(
            f"`ref_logps` must have the shape of `policy_logps` {tuple(policy_logps.shape)}; "
            f"got {tuple(ref_logps.shape)}."
        )
    return beta * (_upcast(policy_logps) - _upcast(ref_logps))


@torch.no_grad()
def bco_udm_weights(prob_desirable: Tensor, min_density_ratio: float = 0.5, max_density_ratio: float = 10.0) -> Tensor:
    """UDM density-ratio weights (https://huggingface.co/papers/2404.04656)::

        w(x) = clip( p(x) / (1 - p(x) + 1e-8), min_density_ratio, max_density_ratio )

    where ``p(x)`` is a prompt classifier's probability that prompt ``x`` comes from the desirable set; ``p/(1-p)``
    estimates ``p_D(x) / p_U(x)`` and the clipping bounds the variance. The ``1e-8`` keeps ``p = 1`` finite (as TRL).

    Args:
        prob_desirable: ``[N]`` classifier probabilities in ``[0, 1]``.
        min_density_ratio: lower clip, must be <= ``max_density_ratio``.
        max_density_ratio: upper clip.

    Returns:
        ``[N]`` weights, constants of the loss (no gradient).
    """
    if min_density_ratio > max_density_ratio:
        raise ValueError(
            f"`min_density_ratio` ({min_density_ratio}) must be <= `max_density_ratio` ({max_density_ratio})."
        )
    if prob_desirable.numel() and not bool(((prob_desirable >= 0) & (prob_desirable <= 1)).all()):
        raise ValueError("`prob_desirable` must hold probabilities in [0, 1].")
    prob = _upcast(prob_desirable)
    return (prob / (1.0 - prob + 1e-8)).clamp(min=min_density_ratio, max=max_density_ratio)


class BCOLossOutput(NamedTuple):
    """Result of :func:`bco_loss`.

    - ``losses`` ``[B]`` in batch order, unreduced; the training loss is ``losses.mean()``.
    - ``chosen_rewards`` ``[n_desirable]`` (detached) -> TRL's ``rewards/chosen`` (gathered sum / gathered count).
    - ``rejected_rewards`` ``[n_undesirable]`` (detached) -> ``rewards/rejected``.
    - ``delta`` scalar: the reward shift used -> TRL's ``delta``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    delta: Tensor


def bco_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    delta: Tensor | float,
    *,
    beta: float = 0.1,
    udm_weights: Tensor | None = None,
) -> BCOLossOutput:
    """BCO loss over an unpaired batch (https://huggingface.co/papers/2404.04656), with the reward shift::

        r_i = β (log π(y_i|x_i) - log π_ref(y_i|x_i))
        desirable:    -log σ(r_i - δ)
        undesirable:  -w_i · log σ(-(r_i - δ))          (w_i = 1 without UDM)

    Args:
        policy_logps: ``[B]`` policy log-prob of each completion (summed over its tokens).
        ref_logps: ``[B]`` reference log-prob of each completion.
        labels: ``[B]`` bool (or 0/1), True for desirable completions.
        delta: scalar reward shift ``δ``, the running mean of past rewards (treated as a constant).
        beta: temperature ``β``; must be > 0.
        udm_weights: optional ``[B]`` density-ratio weights (:func:`bco_udm_weights`), applied to the undesirable
            examples only; the entries at desirable positions are not read.

    Returns:
        :class:`BCOLossOutput`.
    """
    if policy_logps.dim() != 1:
        raise ValueError(f"`policy_logps` must be 1-D [batch]; got shape {tuple(policy_logps.shape)}.")
    for name, tensor in (("ref_logps", ref_logps), ("labels", labels), ("udm_weights", udm_weights)):
        if tensor is not None and tensor.shape != policy_logps.shape:
            raise ValueError(
                f"`{name}` must have the shape of `policy_logps` {tuple(policy_logps.shape)}; "
                f"got {tuple(tensor.shape)}."
            )
    rewards = bco_rewards(policy_logps, ref_logps, beta)
    delta = _upcast(torch.as_tensor(delta, device=rewards.device)).detach()
    if delta.numel() != 1:
        raise ValueError(f"`delta` must be a scalar; got shape {tuple(delta.shape)}.")
    delta = delta.reshape(())
    desirable = labels.to(device=rewards.device).bool()
    shifted = rewards - delta
    losses = torch.where(desirable, -F.logsigmoid(shifted), -F.logsigmoid(-shifted))
    if udm_weights is not None:
        losses = losses * torch.where(desirable, 1.0, _upcast(udm_weights).detach())
    detached = rewards.detach()
    return BCOLossOutput(
        losses=losses,
        chosen_rewards=detached[desirable],
        rejected_rewards=detached[~desirable],
        delta=delta,
    )
