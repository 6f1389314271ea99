"""Proximal Policy Optimization for language models, as pure functions of per-token log-probs, values and scores.

PPO (Schulman et al., 2017, https://huggingface.co/papers/1707.06347) as used for RLHF (Ziegler et al., 2019,
https://huggingface.co/papers/1909.08593; Stiennon et al., 2020; the "N+ implementation details" of Huang et al.,
2024, https://huggingface.co/papers/2403.17031): every completion token is an action; the reward of a token is a KL
penalty towards the reference policy, and the reward model's score is added once, at the end of the completion;
advantages come from a learned value function through GAE (https://huggingface.co/papers/1506.02438); the policy is
trained on the clipped surrogate and the value head on a clipped regression, for several epochs per rollout.

The arithmetic is that of TRL 1.12 ``trl.experimental.ppo.PPOTrainer.train``, including its masking rules, which this
module names once:

- the *response mask* ``m`` ``[B, T]`` (TRL's ``~padding_mask``) is 1 on positions ``t <= L_i``, where ``L_i`` is the
  index of the last token before the first pad token of the (stop-token truncated) completion, ``-1`` when the
  completion starts with a pad token (an *empty* response). The policy loss, the rollout log-probs, the KL penalty and
  the advantage whitening live on it. :func:`ppo_response_mask` computes it from token ids.
- the *value mask* ``v`` ``[B, T]`` (TRL's ``~padding_mask_p1``) reaches one position further, ``t <= L_i + 1``:
  values, returns, the value loss and the reward whitening live on it (:func:`ppo_value_mask`).
- the score is added to the reward at position ``L_i + 1`` (the first pad position, which with ``pad == eos`` is the
  EOS token), or at ``L_i = T - 1`` when the completion fills the whole response length (:func:`ppo_score_indices`).

Conventions: ``B`` completions in the (local) rollout batch, ``T`` response positions (right padding), per-token
tensors ``[B, T]``, per-completion tensors ``[B]``. Inputs are upcast to at least float32; values at masked positions
are ignored (they may be anything, NaN included), so callers need not fill them as TRL does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast

__all__ = [
    "CLIPRANGE",
    "CLIPRANGE_VALUE",
    "GAMMA",
    "KL_COEF",
    "KL_ESTIMATOR",
    "LAM",
    "PPO_KL_ESTIMATORS",
    "VF_COEF",
    "WHITEN_EPSILON",
    "WHITEN_REWARDS",
    "GAEOutput",
    "PPOLossOutput",
    "PPORewards",
    "apply_missing_eos_penalty",
    "check_ppo_arguments",
    "entropy_from_logits",
    "first_true_indices",
    "gae_advantages",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_kl",
    "ppo_loss",
    "ppo_policy_loss",
    "ppo_response_mask",
    "ppo_rewards",
    "ppo_score_indices",
    "ppo_value_loss",
    "ppo_value_mask",
    "truncate_response",
]

# TRL 1.12 ``PPOConfig`` defaults (trl/experimental/ppo/ppo_config.py).
#: KL penalty coefficient ``β`` of the per-token reward.
KL_COEF = 0.05
#: ``ε`` of the clipped policy surrogate.
CLIPRANGE = 0.2
#: Weight of the value loss in ``loss = policy_loss + vf_coef · value_loss``.
VF_COEF = 0.1
#: ``ε_v`` of the clipped value loss.
CLIPRANGE_VALUE = 0.2
#: Discount ``γ`` of GAE.
GAMMA = 1.0
#: ``λ`` of GAE.
LAM = 0.95
#: Whether the per-token rewards are whitened (scaled, not shifted) before GAE.
WHITEN_REWARDS = False
#: The per-token KL estimator of the reward.
KL_ESTIMATOR = "k1"
#: Added to the variance before the inverse square root of :func:`masked_whiten` (TRL's constant).
WHITEN_EPSILON = 1e-8


# --------------------------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None, *,
                sum_across: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``Σ m x / Σ m`` over the positions where ``mask`` is set, over everything or along ``dim``.

    As TRL's ``masked_mean``; an empty mask gives NaN (``0 / 0``). Masked-out values never enter, not even as NaN.
    ``sum_across`` (with ``dim=None``) sums a tensor over the processes that share the batch, so that the mean is
    over the whole batch of every process; None: this process's values are the whole batch.
    """
    _check_same_shape("mask", mask, "values", values)
    mask = mask.bool()
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if dim is None:
        if sum_across is not None:
            total, count = sum_across(torch.stack([kept.sum(), mask.sum().to(kept.dtype)])).unbind()
            return total / count
        return kept.sum() / mask.sum()
    if sum_across is not None:
        raise ValueError("masked_mean: sum_across applies to the mean over everything (dim=None)")
    return kept.sum(dim=dim) / mask.sum(dim=dim)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True, *,
               sum_across: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Variance of the masked values about their masked mean, Bessel-corrected (``· n / (n - 1)``) when ``unbiased``.

    As TRL's ``masked_var`` (``masked_mean((x - masked_mean(x))²) · n / (n - 1)``, ``n = Σ m``). TRL raises for
    ``n = 0`` and returns NaN for ``n = 1`` (``0 · 1/0``), which then turns every whitened value into NaN; here both
    raise, since one value has no sample variance (a deliberate deviation on an input TRL cannot train on).
    ``sum_across``: as in :func:`masked_mean` (the mean, the variance and ``n`` are then those of every process).
    """
    mean = masked_mean(values, mask, sum_across=sum_across)
    variance = masked_mean((values - mean) ** 2, mask, sum_across=sum_across)
    if unbiased:
        count = mask.bool().sum()
        if sum_across is not None:
            count = sum_across(count)
        if count < 2:
            raise ValueError(
                f"The unbiased masked variance needs at least two unmasked values; got {int(count)}. In PPO this "
                "happens when a (mini-)batch holds almost no response tokens: use a larger batch."
            )
        count = count.to(variance.dtype)  # TRL divides two integer tensors: float32, the same for float32 inputs
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, *,
                  sum_across: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``(x - μ) / sqrt(σ² + 1e-8)`` with the masked mean ``μ`` and unbiased masked variance ``σ²``.

    With ``shift_mean=False`` the mean is added back: ``(x - μ) / sqrt(σ² + 1e-8) + μ`` (scale only), TRL's choice for
    rewards. Every position is transformed, masked or not (TRL zero-fills afterwards where it needs to).
    ``sum_across``: as in :func:`masked_mean`: ``μ`` and ``σ²`` of the batch of every process (TRL whitens each
    process's batch alone; with one process the two are the same).
    """
    mean = masked_mean(values, mask, sum_across=sum_across)
    variance = masked_var(values, mask, sum_across=sum_across)
    whitened = (values - mean) * torch.rsqrt(variance + WHITEN_EPSILON)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# --------------------------------------------------------------------------------------------------------------------
# Response processing: stop-token truncation, the response and value masks, where the score goes
# --------------------------------------------------------------------------------------------------------------------


def first_true_indices(bools: Tensor) -> Tensor:
    """Index of the first ``True`` along the last dimension, or the dimension's length where there is none."""
    length = bools.shape[-1]
    positions = torch.arange(length, device=bools.device)
    return torch.where(bools, positions, length).min(dim=-1).values


def truncate_response(responses: Tensor, stop_token_id: int, pad_token_id: int) -> Tensor:
    """``[B, T]`` token ids with every token after the first ``stop_token_id`` replaced by ``pad_token_id``.

    The stop token itself is kept (TRL's ``truncate_response``); a row without it is unchanged.
    """
    if responses.dim() != 2:
        raise ValueError(f"`responses` must be 2-D [batch, tokens]; got shape {tuple(responses.shape)}.")
    stop = first_true_indices(responses == stop_token_id).unsqueeze(1)
    positions = torch.arange(responses.shape[1], device=responses.device)
    return responses.masked_fill(positions > stop, pad_token_id)


def ppo_response_mask(responses: Tensor, pad_token_id: int) -> Tensor:
    """TRL's response mask from (truncated) response ids: ``[B, T]`` bool, true before the first pad token.

    ``L_i = first_pad_i - 1`` is the last response index (``T - 1`` without padding, ``-1`` for a response that starts
    with a pad token). When ``pad_token_id == eos_token_id`` the EOS token is the first pad and falls *outside* the
    mask (it still receives the score and a value); with a distinct pad token the EOS is inside.
    """
    if responses.dim() != 2:
        raise ValueError(f"`responses` must be 2-D [batch, tokens]; got shape {tuple(responses.shape)}.")
    first_pad = first_true_indices(responses == pad_token_id).unsqueeze(1)
    return torch.arange(responses.shape[1], device=responses.device) < first_pad


def _last_indices(mask: Tensor) -> Tensor:
    """``[B]`` ``L_i``: last set position of a prefix mask, ``-1`` for an empty row. Refuses non-prefix masks."""
    if mask.dim() != 2 or mask.shape[1] < 1:
        raise ValueError(f"`mask` must be 2-D [batch, tokens] with at least one position; got {tuple(mask.shape)}.")
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    prefix = torch.arange(mask.shape[1], device=mask.device) < lengths.unsqueeze(1)
    if not torch.equal(prefix, mask):
        rows = (prefix != mask).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            "PPO's response `mask` must be a prefix mask (1 up to the last response token, 0 after it, as "
            f"`ppo_response_mask` gives); rows {rows} have gaps."
        )
    return lengths - 1


def ppo_value_mask(mask: Tensor) -> Tensor:
    """TRL's value mask: ``[B, T]`` bool, true on ``t <= L_i + 1`` (one position past the response mask ``mask``).

    The extra position is where the score is placed (:func:`ppo_score_indices`), so the value head learns to predict
    it; an empty response keeps position 0.
    """
    last = _last_indices(mask)
    return torch.arange(mask.shape[1], device=mask.device) <= (last + 1).unsqueeze(1)


def ppo_score_indices(mask: Tensor) -> Tensor:
    """``[B]`` position of each completion's score in the per-token reward: ``L_i + 1``, or ``L_i`` when
    ``L_i + 1 = T`` (the completion fills the response length). An empty response (``L_i = -1``) gets it at 0."""
    last = _last_indices(mask)
    return torch.where(last + 1 < mask.shape[1], last + 1, last)


def apply_missing_eos_penalty(scores: Tensor, contains_eos: Tensor, missing_eos_penalty: float | None) -> Tensor:
    """``[B]`` scores minus ``missing_eos_penalty`` where the completion holds no EOS token (``None``: unchanged).

    TRL 1.12's PPO tests the (truncated) *response* for EOS; TRL 1.13's XPO and Nash-MD test the whole
    prompt + completion sequence for the penalty (and the completion alone for their ``val/*_contain_eos_token``
    metrics): the caller decides what ``contains_eos`` looks at.
    """
    if contains_eos.shape != scores.shape or scores.dim() != 1:
        raise ValueError(
            f"`scores` and `contains_eos` must both be [batch]; got {tuple(scores.shape)} and "
            f"{tuple(contains_eos.shape)}."
        )
    scores = _upcast(scores)
    if missing_eos_penalty is None:
        return scores
    if not missing_eos_penalty >= 0:
        raise ValueError(f"`missing_eos_penalty` must be >= 0 (it is subtracted); got {missing_eos_penalty}.")
    return torch.where(contains_eos.bool(), scores, scores - missing_eos_penalty)


# --------------------------------------------------------------------------------------------------------------------
# KL penalty, per-token rewards, GAE
# --------------------------------------------------------------------------------------------------------------------


def _k1(log_ratio: Tensor) -> Tensor:
    """``k1 = -log r = log π - log π_ref``: unbiased, one sample can be negative."""
    return -log_ratio


def _k3(log_ratio: Tensor) -> Tensor:
    """``k3 = (r - 1) - log r``: unbiased, never negative, lower variance.

    Evaluated as ``(exp(log r) - 1) - log r`` as TRL's PPO does: ``exp(x) - 1`` is exact near ``x = 0``, so this keeps
    the small values better than GRPO's ``exp(x) - x - 1`` (:func:`~lightning_llm.losses.grpo.k3_kl`).
    """
    return (torch.exp(log_ratio) - 1) - log_ratio


PPO_KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k3": _k3}
"""``kl_estimator`` -> per-token estimate of ``KL(π ‖ π_ref)`` from ``log r = log π_ref - log π`` on samples of ``π``
(Schulman, http://joschu.net/blog/kl-approx.html). TRL refuses ``k2``, kept for logging elsewhere."""


def ppo_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_estimator: str = KL_ESTIMATOR) -> Tensor:
    """``[B, T]`` per-token KL estimate of :data:`PPO_KL_ESTIMATORS`, 0 outside the response ``mask``."""
    if kl_estimator not in PPO_KL_ESTIMATORS:
        raise ValueError(f"Unknown `kl_estimator` {kl_estimator!r}; valid values are {list(PPO_KL_ESTIMATORS)}.")
    _check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    _check_same_shape("mask", mask, "logprobs", logprobs)
    logprobs, ref_logprobs = _upcast(logprobs), _upcast(ref_logprobs)
    kl = PPO_KL_ESTIMATORS[kl_estimator](ref_logprobs - logprobs)
    return torch.where(mask.bool(), kl, torch.zeros((), dtype=kl.dtype, device=kl.device))


class PPORewards(NamedTuple):
    """Result of :func:`ppo_rewards`.

    - ``rewards`` ``[B, T]``: ``-β KL`` per token plus the score at :func:`ppo_score_indices` (whitened if asked);
      0 outside the value mask.
    - ``kl`` ``[B, T]``: the per-token KL estimate, 0 outside the response mask.
    - ``non_score_rewards`` ``[B, T]``: ``-β KL``, before any whitening.
    - ``scores`` ``[B]``: the scores after the missing-EOS penalty.
    - ``sequence_entropy`` ``[B]``: ``-Σ_t m_t log π_old(y_t)``, the sampled completion's negative log-likelihood.

    :meth:`metrics` gives TRL's rollout metrics.
    """

    rewards: Tensor
    kl: Tensor
    non_score_rewards: Tensor
    scores: Tensor
    sequence_entropy: Tensor

    def metrics(self) -> dict[str, Tensor]:
        """TRL 1.12's ``objective/*`` metrics of this (local) batch, as 0-d tensors: ``kl`` (``Σ_t KL``, mean over
        completions), ``entropy``, ``non_score_reward`` (``Σ_t -β KL``, mean), ``rlhf_reward`` (that plus the mean
        score) and ``scores`` (mean penalised score). TRL gathers each process's value and logs their mean."""
        non_score_reward = self.non_score_rewards.sum(dim=1).mean()
        return {
            "objective/kl": self.kl.sum(dim=1).mean(),
            "objective/entropy": self.sequence_entropy.mean(),
            "objective/non_score_reward": non_score_reward,
            "objective/rlhf_reward": non_score_reward + self.scores.mean(),
            "objective/scores": self.scores.mean(),
        }


@torch.no_grad()
def ppo_rewards(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    scores: Tensor,
    mask: Tensor,
    *,
    kl_coef: float = KL_COEF,
    kl_estimator: str = KL_ESTIMATOR,
    missing_eos_penalty: float | None = None,
    contains_eos: Tensor | None = None,
    whiten_rewards: bool = WHITEN_REWARDS,
    sum_across: Callable[[Tensor], Tensor] | None = None,
) -> PPORewards:
    """Per-token PPO rewards: a KL penalty on every response token, the reward model's score at the end.

    With ``KL_t`` of :func:`ppo_kl` (0 outside the response mask ``m``), ``s`` the score (minus
    ``missing_eos_penalty`` where ``contains_eos`` is false) and ``e = ppo_score_indices(m)``::

        R_t = -kl_coef · KL_t + [t = e] · s

    With ``whiten_rewards``: ``R ← masked_whiten(R, v, shift_mean=False)`` over the value mask ``v`` of the whole
    batch, then 0 outside ``v``. No gradient flows (rollout-time quantities).

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy at rollout time.
        ref_logprobs: ``[B, T]`` log-probs of the same tokens under the reference policy.
        scores: ``[B]`` reward-model scores of the (truncated) completions.
        mask: ``[B, T]`` response mask (:func:`ppo_response_mask`), a prefix mask.
        kl_coef: ``β`` (TRL default 0.05).
        kl_estimator: ``"k1"`` (default) or ``"k3"``.
        missing_eos_penalty: subtracted from the score of completions without EOS; ``None``: off.
        contains_eos: ``[B]`` bool, required with ``missing_eos_penalty``.
        whiten_rewards: TRL default False.
        sum_across: sums a tensor over the processes sharing the batch, for whitening over all of them (see
            :func:`masked_whiten`); None: this process's batch alone.
    """
    if not kl_coef >= 0:
        raise ValueError(f"`kl_coef` must be >= 0; got {kl_coef}.")
    if scores.shape != (logprobs.shape[0],):
        raise ValueError(f"`scores` must be [batch] = [{logprobs.shape[0]}]; got {tuple(scores.shape)}.")
    kl = ppo_kl(logprobs, ref_logprobs, mask, kl_estimator)
    score_at = ppo_score_indices(mask)
    if missing_eos_penalty is not None:
        if contains_eos is None:
            raise ValueError("`contains_eos` is required when `missing_eos_penalty` is set.")
        scores = apply_missing_eos_penalty(scores, contains_eos, missing_eos_penalty)
    dtype = torch.promote_types(kl.dtype, _upcast(scores).dtype)
    kl, scores = kl.to(dtype), scores.to(dtype)
    non_score_rewards = -kl_coef * kl
    rewards = non_score_rewards.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), score_at] += scores
    if whiten_rewards:
        value_mask = ppo_value_mask(mask)
        rewards = masked_whiten(rewards, value_mask, shift_mean=False, sum_across=sum_across)
        rewards = rewards.masked_fill(~value_mask, 0.0)
    sequence_entropy = -_masked_row_sum(_upcast(logprobs).to(dtype), mask)
    return PPORewards(rewards, kl, non_score_rewards, scores, sequence_entropy)


def _masked_row_sum(values: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` ``Σ_t m_t x_t`` per row, ignoring masked-out values."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=1)


class GAEOutput(NamedTuple):
    """Result of :func:`gae_advantages` (all ``[B, T]``).

    - ``advantages``: GAE advantages whitened over the response mask (if asked), 0 outside it.
    - ``returns``: ``Â_t + V_t`` with the *raw* advantages, the value target; 0 outside the value mask.
    - ``values``: the values as used, 0 outside the value mask (the value loss clips around them).
    """

    advantages: Tensor
    returns: Tensor
    values: Tensor


@torch.no_grad()
def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = GAMMA,
    lam: float = LAM,
    whiten_advantages: bool = True,
    sum_across: Callable[[Tensor], Tensor] | None = None,
) -> GAEOutput:
    """Generalized Advantage Estimation (Schulman et al., 2016, https://huggingface.co/papers/1506.02438, Eq. 16).

    Over the whole response length, backwards from ``T - 1``, with ``V_T = 0`` and rewards/values taken as 0 outside
    the value mask ``v`` (:func:`ppo_value_mask`, as TRL zero-fills them)::

        δ_t = R_t + γ V_{t+1} - V_t,    Â_t = δ_t + γ λ Â_{t+1},    returns_t = Â_t + V_t

    then (TRL always does) ``A = masked_whiten(Â, m)`` over the response mask ``m`` of the whole batch, 0 outside
    ``m``. The value at ``L_i + 1`` carries the score position, so ``returns`` there is the score.

    Args:
        rewards: ``[B, T]`` per-token rewards (:func:`ppo_rewards`).
        values: ``[B, T]`` value-head predictions at rollout time.
        mask: ``[B, T]`` response mask, a prefix mask.
        gamma: discount ``γ`` in ``[0, 1]`` (TRL default 1.0).
        lam: GAE ``λ`` in ``[0, 1]`` (TRL default 0.95).
        whiten_advantages: TRL always whitens; False returns the raw ``Â`` (still 0 outside ``m``).
        sum_across: sums a tensor over the processes sharing the batch, for whitening over all of them (see
            :func:`masked_whiten`); None: this process's batch alone.
    """
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must lie in [0, 1]; got {value}.")
    _check_same_shape("values", values, "rewards", rewards)
    _check_same_shape("mask", mask, "rewards", rewards)
    value_mask = ppo_value_mask(mask)
    dtype = torch.promote_types(_upcast(rewards).dtype, values.dtype)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    rewards = torch.where(value_mask, rewards.to(dtype), zero)
    values = torch.where(value_mask, values.to(dtype), zero)
    length = rewards.shape[1]
    running = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = advantages + values
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask, sum_across=sum_across)
    advantages = advantages.masked_fill(~mask.bool(), 0.0)
    return GAEOutput(advantages, returns, values)


# --------------------------------------------------------------------------------------------------------------------
# The losses of one micro-batch
# --------------------------------------------------------------------------------------------------------------------


class PPOLossOutput(NamedTuple):
    """Result of :func:`ppo_policy_loss`, :func:`ppo_value_loss` and :func:`ppo_loss` (0-d tensors unless noted).

    - ``loss``: what is back-propagated: the policy loss, the value loss, or ``policy_loss + vf_coef · value_loss``.
    - ``policy_loss`` -> TRL's ``loss/policy_avg``; ``policy_clipfrac`` -> ``policy/clipfrac_avg``;
      ``approxkl`` -> ``policy/approxkl_avg``; ``ratio_mean`` -> ``val/ratio`` (and, over micro-batches,
      ``val/ratio_var``); ``ratio`` ``[B, T]`` the per-token ratio (1 outside the mask).
    - ``value_loss`` -> ``loss/value_avg``; ``value_clipfrac`` -> ``val/clipfrac_avg``.

    TRL averages each over the micro-batches of all PPO epochs and mini-batches of a rollout (and over processes).
    Fields a function does not compute are ``None``; all but ``loss`` are detached.
    """

    loss: Tensor
    policy_loss: Tensor | None = None
    policy_clipfrac: Tensor | None = None
    approxkl: Tensor | None = None
    ratio_mean: Tensor | None = None
    ratio: Tensor | None = None
    value_loss: Tensor | None = None
    value_clipfrac: Tensor | None = None


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, cliprange: float = CLIPRANGE
) -> PPOLossOutput:
    """PPO's clipped surrogate (https://huggingface.co/papers/1707.06347, Eq. 7) per token, masked mean.

    With ``r_t = exp(log π(y_t) - log π_old(y_t))`` on the response mask ``m`` (``r_t = 1`` outside it)::

        loss = masked_mean(max(-A_t r_t, -A_t clip(r_t, 1 - ε, 1 + ε)), m)
        clipfrac = masked_mean([-A_t clip(r_t) > -A_t r_t], m)
        approxkl = ½ mean_{all b, t}((log π - log π_old)²),   ratio_mean = mean_{all b, t}(r_t)

    ``approxkl`` and ``ratio_mean`` average over *every* position, padding included (as 0 and 1), as TRL does.

    Args:
        logprobs: ``[B, T]`` log-probs under the current policy (with gradient).
        old_logprobs: ``[B, T]`` log-probs at rollout time.
        advantages: ``[B, T]`` advantages (:func:`gae_advantages`).
        mask: ``[B, T]`` response mask.
        cliprange: ``ε >= 0`` (TRL default 0.2).
    """
    if not cliprange >= 0:
        raise ValueError(f"`cliprange` must be >= 0; got {cliprange}.")
    if logprobs.dim() != 2:
        raise ValueError(f"`logprobs` must be 2-D [batch, tokens]; got shape {tuple(logprobs.shape)}.")
    for name, tensor in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        _check_same_shape(name, tensor, "logprobs", logprobs)
    logprobs = _upcast(logprobs)
    mask = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs - _upcast(old_logprobs).detach(), zero)
    advantages = torch.where(mask, _upcast(advantages).detach(), zero)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approxkl = 0.5 * (log_ratio**2).mean()
        ratio_mean = ratio.mean()
    return PPOLossOutput(
        loss=loss, policy_loss=loss.detach(), policy_clipfrac=clipfrac, approxkl=approxkl, ratio_mean=ratio_mean,
        ratio=ratio.detach(),
    )  # fmt: skip


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    cliprange_value: float = CLIPRANGE_VALUE,
) -> PPOLossOutput:
    """PPO's clipped value loss, halved, masked mean over the value mask.

    With ``V`` the current predictions, ``V_old`` the rollout values, ``G`` the returns and ``v = ppo_value_mask(m)``::

        V_clip = clip(V, V_old - ε_v, V_old + ε_v)
        loss = ½ masked_mean(max((V - G)², (V_clip - G)²), v)
        clipfrac = masked_mean([(V_clip - G)² > (V - G)²], v)

    Args:
        values: ``[B, T]`` current value predictions (with gradient).
        old_values: ``[B, T]`` rollout values (:attr:`GAEOutput.values`).
        returns: ``[B, T]`` value targets (:attr:`GAEOutput.returns`).
        mask: ``[B, T]`` the *response* mask; the value mask is derived from it.
        cliprange_value: ``ε_v >= 0`` (TRL default 0.2).
    """
    if not cliprange_value >= 0:
        raise ValueError(f"`cliprange_value` must be >= 0; got {cliprange_value}.")
    if values.dim() != 2:
        raise ValueError(f"`values` must be 2-D [batch, tokens]; got shape {tuple(values.shape)}.")
    for name, tensor in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        _check_same_shape(name, tensor, "values", values)
    value_mask = ppo_value_mask(mask)
    values = _upcast(values)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(value_mask, values, zero)
    old_values = torch.where(value_mask, _upcast(old_values).detach(), zero)
    returns = torch.where(value_mask, _upcast(returns).detach(), zero)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), value_mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_loss > unclipped_loss).to(values.dtype), value_mask)
    return PPOLossOutput(loss=loss, value_loss=loss.detach(), value_clipfrac=clipfrac)


def ppo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    cliprange: float = CLIPRANGE,
    cliprange_value: float = CLIPRANGE_VALUE,
    vf_coef: float = VF_COEF,
) -> PPOLossOutput:
    """The PPO loss of one micro-batch: ``policy_loss + vf_coef · value_loss`` (TRL 1.12).

    :func:`ppo_policy_loss` over the response mask plus ``vf_coef`` (TRL default 0.1) times :func:`ppo_value_loss`
    over the value mask. This is one micro-batch's loss before any division by the accumulation count: TRL's
    ``accelerator.backward`` divides it by ``gradient_accumulation_steps`` and the optimizer steps once per
    mini-batch, as Lightning's ``accumulate_grad_batches`` does with a returned loss.
    """
    if not vf_coef >= 0:
        raise ValueError(f"`vf_coef` must be >= 0; got {vf_coef}.")
    policy = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=cliprange)
    value = ppo_value_loss(values, old_values, returns, mask, cliprange_value=cliprange_value)
    return policy._replace(
        loss=policy.loss + vf_coef * value.loss, value_loss=value.value_loss, value_clipfrac=value.value_clipfrac
    )


def entropy_from_logits(logits: Tensor) -> Tensor:
    """``[..., V]`` logits -> ``[...]`` entropy ``logsumexp(z) - Σ softmax(z) z`` (TRL 1.12 PPO's formula).

    TRL logs ``policy/entropy_avg`` as the mean over *every* position of the micro-batch, padding included, of the
    entropy of the temperature-scaled logits.
    """
    logits = _upcast(logits)
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def check_ppo_arguments(
    *,
    kl_coef: float = KL_COEF,
    kl_estimator: str = KL_ESTIMATOR,
    cliprange: float = CLIPRANGE,
    vf_coef: float = VF_COEF,
    cliprange_value: float = CLIPRANGE_VALUE,
    gamma: float = GAMMA,
    lam: float = LAM,
    missing_eos_penalty: float | None = None,
) -> None:
    """Validate PPO's hyperparameters at once (a module calls it at construction, to fail before training)."""
    if kl_estimator not in PPO_KL_ESTIMATORS:
        raise ValueError(f"Unknown `kl_estimator` {kl_estimator!r}; valid values are {list(PPO_KL_ESTIMATORS)}.")
    for name, value in (("kl_coef", kl_coef), ("cliprange", cliprange), ("vf_coef", vf_coef),
                        ("cliprange_value", cliprange_value)):  # fmt: skip
        if not value >= 0:
            raise ValueError(f"`{name}` must be >= 0; got {value}.")
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must lie in [0, 1]; got {value}.")
    if missing_eos_penalty is not None and not missing_eos_penalty >= 0:
        raise ValueError(f"`missing_eos_penalty` must be >= 0 (it is subtracted); got {missing_eos_penalty}.")


def _check_same_shape(name: str, tensor: Tensor, reference_name: str, reference: Tensor) -> None:
    if tensor.shape != reference.shape:
        raise ValueError(
            f"`{name}` must have the shape of `{reference_name}` {tuple(reference.shape)}; got {tuple(tensor.shape)}."
        )
