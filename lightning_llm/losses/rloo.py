"""REINFORCE Leave-One-Out (RLOO), as pure functions of rewards and sequence log-probabilities.

RLOO (Ahmadian et al., 2024, "Back to Basics", https://huggingface.co/papers/2402.14740; the estimator of Kool et
al., 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!") samples ``G`` completions per prompt and baselines
each completion's reward with the mean reward of its ``G - 1`` siblings, an unbiased baseline with no value model.
The whole completion is one action: the KL penalty is folded into the reward and the policy loss is a PPO-clipped
surrogate on the *sequence* probability ratio, averaged over sequences (TRL 1.16 ``RLOOTrainer``).

Conventions: ``N`` completions in a generation batch, whole groups of ``G = num_generations`` consecutive completions
of one prompt; ``B`` completions in a micro-batch; ``T`` completion positions; ``mask`` ``[B, T]`` is TRL's
``completion_mask``. The loss of :func:`rloo_loss` is a micro-batch mean; TRL (through the HF Trainer) divides it by
the number of accumulated micro-batches, as Lightning's ``accumulate_grad_batches`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast
from lightning_llm.losses.grpo import STD_EPSILON, PolicyGradientMetrics, _check_groups, nanstd

__all__ = [
    "RLOOAdvantages",
    "RLOOLossOutput",
    "rloo_advantages",
    "rloo_loss",
    "rloo_metrics",
    "rloo_sequence_kl",
    "rloo_sequence_logps",
]


def rloo_sequence_logps(per_token_logps: Tensor, mask: Tensor) -> Tensor:
    """``log π(y_i) = Σ_t m_it log π(y_it)``: ``[B, T]`` per-token log-probs -> ``[B]`` completion log-probs.

    Use the same mask for the current (``logps``) and the generation-time (``old_logps``) log-probs of
    :func:`rloo_loss`.
    """
    if per_token_logps.shape != mask.shape or per_token_logps.dim() != 2:
        raise ValueError(
            f"`per_token_logps` and `mask` must both be [batch, tokens]; got {tuple(per_token_logps.shape)} and "
            f"{tuple(mask.shape)}."
        )
    per_token_logps = _upcast(per_token_logps)
    return (per_token_logps * mask.to(per_token_logps.dtype)).sum(dim=1)


@torch.no_grad()
def rloo_sequence_kl(old_per_token_logps: Tensor, ref_per_token_logps: Tensor, mask: Tensor) -> Tensor:
    """Per-completion KL estimate ``KL_i = Σ_t m_it (log π_old(y_it) - log π_ref(y_it))`` (the "k1" estimator).

    RLOO penalises the *reward* (``r_i - β KL_i``, see :func:`rloo_advantages`) with the plain log-ratio summed over
    the completion, as in the RLOO paper; it can be negative per token, unlike GRPO's :func:`~.grpo.k3_kl`. It uses
    the log-probs of the policy at generation time, so it carries no gradient. TRL logs ``kl`` as the token mean:
    ``Σ_i KL_i / Σ_it m_it`` (both summed over processes).

    Args:
        old_per_token_logps: ``[B, T]`` log-probs under the policy that generated the completions.
        ref_per_token_logps: ``[B, T]`` log-probs under the reference model.
        mask: ``[B, T]`` completion mask.

    Returns:
        ``[B]`` summed log-ratios.
    """
    if not old_per_token_logps.shape == ref_per_token_logps.shape == mask.shape or mask.dim() != 2:
        raise ValueError(
            "`old_per_token_logps`, `ref_per_token_logps` and `mask` must all be [batch, tokens]; got "
            f"{tuple(old_per_token_logps.shape)}, {tuple(ref_per_token_logps.shape)}, {tuple(mask.shape)}."
        )
    per_token_kl = _upcast(old_per_token_logps) - _upcast(ref_per_token_logps)
    return (per_token_kl * mask.to(per_token_kl.dtype)).sum(dim=-1)


class RLOOAdvantages(NamedTuple):
    """Result of :func:`rloo_advantages`.

    - ``advantages`` ``[N]``: ``r̃_i - b_i`` (normalised if asked); 0 for unscorable completions and where the
      baseline is undefined (no scorable sibling).
    - ``rewards`` ``[N]``: the shaped rewards ``r̃`` the baseline is built from (clipped, minus ``β KL``); NaN for
      unscorable completions.
    - ``baselines`` ``[N]``: ``b_i``, NaN where undefined.
    - ``std`` ``[N / G]``: NaN-aware std of each group's shaped rewards (Bessel-corrected).
    - ``is_std_zero`` ``[N / G]``: ``std`` is (close to) 0 -> TRL's ``frac_reward_zero_std`` is its mean.
    - ``unscorable`` ``[N]``: the reward was NaN (no reward function scored the completion).

    TRL's logged ``reward`` / ``reward_std`` are the ``nanmean`` / ``nanstd`` of the *unshaped* rewards given as input.
    """

    advantages: Tensor
    rewards: Tensor
    baselines: Tensor
    std: Tensor
    is_std_zero: Tensor
    unscorable: Tensor


def rloo_advantages(
    rewards: Tensor,
    num_generations: int,
    *,
    normalize_advantages: bool = False,
    reward_clip_range: Sequence[float] | None = None,
    beta: float = 0.0,
    sequence_kl: Tensor | None = None,
) -> RLOOAdvantages:
    """Leave-one-out advantages (https://huggingface.co/papers/2402.14740), the baseline over the scorable siblings.

    The reward is shaped first: ``r̃_i = clip(r_i, lo, hi) - β KL_i`` (clipping only with ``reward_clip_range``, the
    KL term only with ``beta != 0``). With ``S(i)`` the scorable completions of ``i``'s group (reward not NaN)::

        b_i = (Σ_{j ∈ S(i)} r̃_j - r̃_i) / (|S(i)| - 1),   A_i = r̃_i - b_i

    i.e. the mean over the *other scorable* siblings; an unscorable sibling neither counts nor adds. A completion with
    no scorable sibling has ``b_i = 0/0`` and gets ``A_i = 0``, as do unscorable completions. With
    ``normalize_advantages``: ``A ← (A - mean(A)) / (std(A) + 1e-4)`` over the batch's defined advantages.

    Args:
        rewards: ``[N]`` per-completion reward of the whole generation batch: the weighted sum over reward functions,
            NaN where no function scored it (:func:`~.grpo.weighted_rewards`).
        num_generations: ``G`` (TRL's default 2); ``N`` must be a multiple of it. ``G = 1`` (evaluation) gives zero
            advantages.
        normalize_advantages: standardise the advantages over the batch (TRL's default False).
        reward_clip_range: ``(lo, hi)`` to clamp the rewards to before the KL term, or ``None``.
        beta: KL coefficient (TRL's default 0.05); with ``beta != 0`` ``sequence_kl`` is required.
        sequence_kl: ``[N]`` :func:`rloo_sequence_kl` of the generation batch (gathered like the rewards).

    Returns:
        :class:`RLOOAdvantages`; the caller keeps its own process's slice of ``advantages``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"`rewards` must be 1-D [completions]; got shape {tuple(rewards.shape)}.")
    _check_groups(rewards.shape[0], num_generations, "rewards")
    if not beta >= 0:
        raise ValueError(f"`beta` must be >= 0; got {beta}.")
    if beta != 0:
        if sequence_kl is None:
            raise ValueError(f"`sequence_kl` is required when `beta` != 0 (got beta={beta}).")
        if sequence_kl.shape != rewards.shape:
            raise ValueError(
                f"`sequence_kl` must have the shape of `rewards` {tuple(rewards.shape)}; got "
                f"{tuple(sequence_kl.shape)}."
            )
    rewards = _upcast(rewards)
    unscorable = torch.isnan(rewards)
    if reward_clip_range is not None:
        if len(reward_clip_range) != 2 or not reward_clip_range[0] <= reward_clip_range[1]:
            raise ValueError(f"`reward_clip_range` must be (min, max) with min <= max; got {reward_clip_range!r}.")
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if beta != 0:
        rewards = rewards - beta * _upcast(sequence_kl)

    grouped = rewards.view(-1, num_generations)  # [N/G, G]
    if num_generations > 1:
        std = nanstd(grouped, dim=1)
        scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        baselines = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)).view(-1)
        advantages = rewards - baselines
    else:
        std = torch.zeros(grouped.shape[0], dtype=rewards.dtype, device=rewards.device)
        baselines = torch.full_like(rewards, math.nan)
        advantages = torch.zeros_like(rewards)
    if normalize_advantages:
        # Undefined advantages are still NaN here, so they stay out of the batch mean and std.
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + STD_EPSILON)
    return RLOOAdvantages(
        advantages=torch.nan_to_num(advantages, nan=0.0),
        rewards=rewards,
        baselines=baselines,
        std=std,
        is_std_zero=torch.isclose(std, torch.zeros_like(std)),
        unscorable=unscorable,
    )


class RLOOLossOutput(NamedTuple):
    """Result of :func:`rloo_loss` (all ``[B]`` except ``loss``).

    - ``loss``: scalar, ``mean_i ℓ_i``.
    - ``per_sequence_loss``: ``ℓ_i``.
    - ``coef_1``: sequence ratio ``r_i = exp(log π_θ(y_i) - log π_old(y_i))``, detached.
    - ``is_low_clipped``: ``r_i < 1 - ε_low ∧ A_i < 0``; ``is_high_clipped``: ``r_i > 1 + ε_high ∧ A_i > 0``;
      ``is_region_clipped``: either. TRL logs their means and ``clip_ratio/low_min`` / ``high_max`` over sequences.
    """

    loss: Tensor
    per_sequence_loss: Tensor
    coef_1: Tensor
    is_low_clipped: Tensor
    is_high_clipped: Tensor
    is_region_clipped: Tensor


def rloo_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, *, epsilon_low: float = 0.2, epsilon_high: float | None = None
) -> RLOOLossOutput:
    """PPO-clipped RLOO policy loss on whole completions.

    ``ℓ_i = -min(r_i A_i, clip(r_i, 1 - ε_low, 1 + ε_high) A_i)`` with the sequence ratio
    ``r_i = π_θ(y_i) / π_old(y_i)`` (log-probs summed over the completion, :func:`rloo_sequence_logps`) and the loss
    the mean over the micro-batch's sequences. On-policy (``r = 1``) it is REINFORCE with the leave-one-out baseline.

    Args:
        logps: ``[B]`` completion log-probs under the policy (with gradient).
        old_logps: ``[B]`` completion log-probs under the policy at generation time.
        advantages: ``[B]`` :func:`rloo_advantages`.
        epsilon_low: lower clip range (TRL's ``epsilon``, default 0.2).
        epsilon_high: upper clip range (default ``epsilon_low``).

    Returns:
        :class:`RLOOLossOutput`.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if not epsilon_low >= 0:
        raise ValueError(f"`epsilon_low` must be >= 0; got {epsilon_low}.")
    if not epsilon_high >= 0:
        raise ValueError(f"`epsilon_high` must be >= 0; got {epsilon_high}.")
    if logps.dim() != 1:
        raise ValueError(f"`logps` must be 1-D [batch]; got shape {tuple(logps.shape)}.")
    for name, tensor in (("old_logps", old_logps), ("advantages", advantages)):
        if tensor.shape != logps.shape:
            raise ValueError(
                f"`{name}` must have the shape of `logps` {tuple(logps.shape)}; got {tuple(tensor.shape)}."
            )
    logps, old_logps, advantages = _upcast(logps), _upcast(old_logps), _upcast(advantages)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_sequence_loss = -torch.min(ratio * advantages, clipped * advantages)
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return RLOOLossOutput(
        loss=per_sequence_loss.mean(),
        per_sequence_loss=per_sequence_loss,
        coef_1=ratio.detach(),
        is_low_clipped=low,
        is_high_clipped=high,
        is_region_clipped=low | high,
    )


@torch.no_grad()
def rloo_metrics(
    output: RLOOLossOutput, entropies: Tensor | None = None, mask: Tensor | None = None
) -> PolicyGradientMetrics:
    """TRL's RLOO loss metrics from one micro-batch, reducible across processes (:class:`~.grpo.PolicyGradientMetrics`).

    ``clip_ratio/{low_mean,high_mean,region_mean}`` are means over sequences, ``clip_ratio/low_min`` /
    ``clip_ratio/high_max`` the min / max over sequences of the 0/1 clip indicators, and ``entropy`` (when
    ``entropies`` and ``mask`` are given) the mean entropy over completion tokens.
    """
    dtype = output.coef_1.dtype
    low, high, region = (x.to(dtype) for x in (output.is_low_clipped, output.is_high_clipped, output.is_region_clipped))
    count = torch.tensor(float(low.numel()), dtype=dtype, device=low.device)
    sums = {
        "clip_ratio/low_mean": torch.stack([low.sum(), count]),
        "clip_ratio/high_mean": torch.stack([high.sum(), count]),
        "clip_ratio/region_mean": torch.stack([region.sum(), count]),
    }
    if entropies is not None:
        if mask is None or mask.shape != entropies.shape:
            raise ValueError("`mask` of the shape of `entropies` is required to average the entropies.")
        mask = mask.to(dtype)
        sums["entropy"] = torch.stack([(entropies.detach().to(dtype) * mask).sum(), mask.sum()])
    return PolicyGradientMetrics(sums, {"clip_ratio/low_min": low}, {"clip_ratio/high_max": high})
