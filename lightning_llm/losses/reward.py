"""Pairwise reward-model loss (Bradley-Terry), as in TRL 1.16 ``RewardTrainer``.

A reward model maps ``(x, y)`` to a scalar ``r``. Under the Bradley-Terry model ``P(y_w ≻ y_l) = σ(r_w - r_l)``, so
training maximises ``log σ(r_w - r_l)`` over preference pairs (Ouyang et al., 2022,
https://huggingface.co/papers/2203.02155, Eq. 1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast

__all__ = ["RewardLossOutput", "reward_loss"]



class RewardLossOutput(NamedTuple):
    """Result of :func:`reward_loss`.

    - ``losses`` ``[B]``: per-pair loss, unreduced; the training loss is ``losses.mean()``.
    - ``margins`` ``[B]`` (detached): ``r_w - r_l`` -> TRL's ``margin`` (mean).
    - ``accuracies`` ``[B]`` (detached): 1.0 where ``r_w > r_l`` -> TRL's ``accuracy`` (mean).
    - ``rewards`` ``[2B]`` (detached): every reward of the batch, chosen then rejected -> TRL's ``min_reward``,
      ``mean_reward`` and ``max_reward`` (over the gathered batch).
    """

    losses: Tensor
    margins: Tensor
    accuracies: Tensor
    rewards: Tensor


def reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> RewardLossOutput:
    """Bradley-Terry loss with optional margin and reward centring.

    Per pair::

        loss = -log σ(r_w - r_l - m) + c · (r_w + r_l)²

    The margin ``m`` (Llama 2, Touvron et al., 2023, https://huggingface.co/papers/2307.09288, Eq. 2) asks for a larger
    reward gap on pairs rated as clearly different. The centring term (Eisenstein et al., 2023,
    https://huggingface.co/papers/2312.09244) keeps rewards near zero, which the loss alone leaves free (it only sees
    differences). The mean of ``losses`` equals TRL's loss ``mean(-log σ(·)) + c · mean((r_w + r_l)²)``.

    Args:
        chosen_rewards: ``[B]`` reward of each chosen completion (``r_w``).
        rejected_rewards: ``[B]`` reward of each rejected completion (``r_l``).
        margin: optional ``[B]`` required reward gap per pair (the dataset's ``margin`` column).
        center_rewards_coefficient: ``c``; ``None`` or 0 disables centring. Must be >= 0.

    Returns:
        :class:`RewardLossOutput`.
    """
    if chosen_rewards.dim() != 1:
        raise ValueError(f"`chosen_rewards` must be 1-D [batch]; got shape {tuple(chosen_rewards.shape)}.")
    for name, tensor in (("rejected_rewards", rejected_rewards), ("margin", margin)):
        if tensor is not None and tensor.shape != chosen_rewards.shape:
            raise ValueError(
                f"`{name}` must have the shape of `chosen_rewards` {tuple(chosen_rewards.shape)}; "
                f"got {tuple(tensor.shape)}."
            )
    if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
        raise ValueError(f"`center_rewards_coefficient` must be >= 0; got {center_rewards_coefficient}.")

    chosen_rewards, rejected_rewards = _upcast(chosen_rewards), _upcast(rejected_rewards)
    margins = chosen_rewards - rejected_rewards
    logits = margins if margin is None else margins - _upcast(margin)
    losses = -F.logsigmoid(logits)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return RewardLossOutput(
        losses=losses,
        margins=margins.detach(),
        accuracies=(chosen_rewards > rejected_rewards).float().detach(),
        rewards=torch.cat([chosen_rewards, rejected_rewards]).detach(),
    )
