"""Group Relative Policy Optimization and its variants, as pure functions of per-token log-probabilities.

GRPO (Shao et al., 2024, DeepSeekMath, https://huggingface.co/papers/2402.03300) samples ``G`` completions per prompt,
scores them, and uses each completion's reward standardised within its group as the advantage of every one of its
tokens (no value model). The policy is trained with a PPO-style clipped surrogate on the importance ratio
``r = π_θ / π_old``, optionally with a KL penalty towards a reference model. TRL 1.16 offers eight ``loss_type`` s
that differ in the per-token term and in how the masked per-token losses are reduced to a scalar; each is a small
function here, in :data:`GRPO_LOSSES` (the per-token term) and :data:`GRPO_AGGREGATIONS` (the reduction), and
:func:`grpo_loss` is the entry point.

Conventions: ``N`` completions in a generation batch, made of whole groups of ``G = num_generations`` consecutive
completions of one prompt; ``F`` reward functions; ``B`` completions in a micro-batch; ``T`` completion positions
(right padding); ``mask`` ``[B, T]`` is 1 on the completion tokens that are trained (TRL's ``completion_mask`` times its
``tool_mask``), 0 elsewhere.

Gradient accumulation: every loss here is the loss of one micro-batch *before* any division by the number of
accumulated micro-batches ``g``. TRL 1.16 divides ``grpo``, ``bnpo``, ``dr_grpo``, ``sapo`` and ``luspo`` (and the
entropy bonus) by ``current_gradient_accumulation_steps`` itself; for ``dapo``, ``cispo`` and ``vespo`` it folds ``g``
into the token count it divides by. With the ``normalizer`` documented in :func:`grpo_loss`, TRL's loss is this loss
divided by ``g`` for every loss type (in evaluation ``g = 1``), which is what Lightning's ``accumulate_grad_batches``
does with a returned loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast

__all__ = [
    "GRPO_AGGREGATIONS",
    "GRPO_CLIPPED_LOSS_TYPES",
    "GRPO_LOSSES",
    "GRPO_TOKEN_SUM_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "MULTI_OBJECTIVE_AGGREGATIONS",
    "SCALE_REWARDS",
    "GRPOAdvantages",
    "GRPOLossOutput",
    "GRPOTerms",
    "PolicyGradientMetrics",
    "adaptive_entropy_coef",
    "check_grpo_arguments",
    "grpo_advantages",
    "grpo_loss",
    "grpo_metrics",
    "high_entropy_mask",
    "k3_kl",
    "nanstd",
    "off_policy_mask",
    "vespo_gamma_weights",
    "weighted_rewards",
]

#: TRL's ``scale_rewards`` values (``True`` / ``False`` are accepted as ``"group"`` / ``"none"``, as in ``GRPOConfig``).
SCALE_REWARDS = ("group", "batch", "none")
#: TRL's ``multi_objective_aggregation`` values.
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
#: Added to every standard deviation an advantage is divided by (TRL's constant), so a zero-variance group gives 0.
STD_EPSILON = 1e-4


# --------------------------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------------------------


def nanstd(x: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """Sample standard deviation ignoring NaNs: ``sqrt(Σ (x - x̄)² / (n - 1))`` over the ``n`` non-NaN entries.

    Bessel-corrected like TRL's ``trl.trainer.utils.nanstd``; NaN where fewer than two entries are non-NaN (a single
    value has no sample spread), which later turns into a zero advantage.
    """
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True).to(variance.dtype)
    bessel = torch.where(count > 1, count / (count - 1), torch.full_like(variance, math.nan))
    std = torch.sqrt(variance * bessel)
    if keepdim:
        return std
    if dim is None:
        return std.reshape(())
    dims = (dim,) if isinstance(dim, int) else dim
    return std.squeeze(tuple(d % x.dim() for d in dims))


def weighted_rewards(rewards_per_func: Tensor, reward_weights: Tensor | Sequence[float] | None = None) -> Tensor:
    """Per-completion reward ``r_i = Σ_k w_k R_ik`` over the reward functions that scored it; NaN if none did.

    A reward function returns ``None`` (NaN here) for a completion it does not apply to; that function is then left
    out of the sum (TRL's ``nansum``). A completion no function scored is *unscorable*: summing would give it a
    reward of 0 that biases its group's baseline, so it stays NaN and the advantage functions give it advantage 0.

    Args:
        rewards_per_func: ``[N, F]`` rewards, NaN where a function did not score a completion.
        reward_weights: ``[F]`` weights (default: all 1).

    Returns:
        ``[N]`` weighted rewards, NaN for unscorable completions (TRL logs their ``nanmean`` as ``reward`` and
        their ``nanstd`` as ``reward_std``).
    """
    rewards_per_func, weights = _check_rewards(rewards_per_func, reward_weights)
    rewards = (rewards_per_func * weights).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), math.nan)


class GRPOAdvantages(NamedTuple):
    """Result of :func:`grpo_advantages` (all ``[N]``, in generation-batch order).

    - ``advantages``: the per-completion advantage; 0 for unscorable completions and wherever the standardisation is
      undefined (a group with fewer than two scorable completions).
    - ``rewards``: the weighted reward sum of :func:`weighted_rewards` (NaN for unscorable completions), whatever the
      aggregation mode -> TRL's ``reward`` (``nanmean``) and ``reward_std`` (``nanstd``).
    - ``std``: the standard deviation each advantage was (or, with ``scale_rewards="none"``, would have been) divided
      by: per group for ``"group"``/``"none"``, of the whole batch for ``"batch"`` and ``"normalize_then_sum"``.
    - ``is_std_zero``: ``std`` is (close to) 0 -> TRL's ``frac_reward_zero_std`` is its mean. NaN std counts as not
      zero, as in TRL.
    - ``unscorable``: no reward function scored the completion.
    """

    advantages: Tensor
    rewards: Tensor
    std: Tensor
    is_std_zero: Tensor
    unscorable: Tensor


def grpo_advantages(
    rewards_per_func: Tensor,
    reward_weights: Tensor | Sequence[float] | None,
    num_generations: int,
    *,
    scale_rewards: str | bool = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
) -> GRPOAdvantages:
    """Group-relative advantages (DeepSeekMath, https://huggingface.co/papers/2402.03300, §4.1.2, outcome supervision).

    Completions ``i`` of one prompt form a group ``g(i)`` of ``G`` consecutive rows. With ``r`` the weighted rewards of
    :func:`weighted_rewards`, ``mean``/``std`` NaN-aware over the scorable completions and ``std`` Bessel-corrected
    (:func:`nanstd`), ``ε = 1e-4``:

    ``multi_objective_aggregation="sum_then_normalize"`` (default): sum the weighted rewards, then

    - ``scale_rewards="group"``: ``A_i = (r_i - mean_g(i)(r)) / (std_g(i)(r) + ε)`` (GRPO);
    - ``"batch"``: ``A_i = (r_i - mean_g(i)(r)) / (std_batch(r) + ε)``: group baseline, batch scale (PPO Lite,
      https://huggingface.co/papers/2508.08221);
    - ``"none"``: ``A_i = r_i - mean_g(i)(r)`` (Dr. GRPO, https://huggingface.co/papers/2503.20783: dividing by the
      group std over-weights too easy and too hard prompts).

    ``"normalize_then_sum"`` (GDPO, https://huggingface.co/papers/2601.05242): standardise each reward function within
    its group, ``z_ik = (R_ik - mean_g(i)(R_k)) / (std_g(i)(R_k) + ε)``, sum ``s_i = Σ_k w_k z_ik`` (NaN terms left
    out), then standardise over the batch: ``A_i = (s_i - mean(s)) / (std(s) + ε)``; ``scale_rewards`` is not used.

    Unscorable completions (every reward NaN) are left out of every mean and std and get ``A_i = 0``; so does every
    completion of a group with fewer than two scorable completions under group scaling (its std is NaN).

    Args:
        rewards_per_func: ``[N, F]`` rewards of the whole generation batch (all processes: groups span processes).
        reward_weights: ``[F]`` weights of the reward functions (``None``: all 1).
        num_generations: ``G``, completions per prompt; ``N`` must be a multiple of it. ``G = 1`` (TRL allows it in
            evaluation) gives zero advantages under group scaling.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"`` (``True``/``False`` mean ``"group"``/``"none"``).
        multi_objective_aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.

    Returns:
        :class:`GRPOAdvantages`; the caller keeps its own process's slice of ``advantages``.
    """
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"Unknown `scale_rewards` {scale_rewards!r}; valid values are {list(SCALE_REWARDS)}.")
    if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(
            f"Unknown `multi_objective_aggregation` {multi_objective_aggregation!r}; valid values are "
            f"{list(MULTI_OBJECTIVE_AGGREGATIONS)}."
        )
    rewards_per_func, weights = _check_rewards(rewards_per_func, reward_weights)
    num_completions, num_funcs = rewards_per_func.shape
    _check_groups(num_completions, num_generations, "rewards_per_func")
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights).nansum(dim=1).masked_fill(unscorable, math.nan)

    if multi_objective_aggregation == "sum_then_normalize":
        grouped = rewards.view(-1, num_generations)  # [N/G, G]
        baseline = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
        if scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if num_completions > 1 else torch.zeros_like(rewards)
        elif num_generations > 1:  # "group", and "none" which only reports it
            std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
        else:
            std = torch.zeros_like(rewards)
        advantages = rewards - baseline
        if scale_rewards != "none":
            advantages = advantages / (std + STD_EPSILON)
    else:
        grouped = rewards_per_func.view(-1, num_generations, num_funcs)  # [N/G, G, F]
        func_mean = torch.nanmean(grouped, dim=1, keepdim=True)
        func_std = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(func_mean)
        standardized = ((grouped - func_mean) / (func_std + STD_EPSILON)).view(-1, num_funcs)
        summed = (standardized * weights).nansum(dim=1).masked_fill(unscorable, math.nan)
        std = nanstd(summed).expand_as(summed) if num_completions > 1 else torch.zeros_like(summed)
        advantages = (summed - torch.nanmean(summed)) / (std + STD_EPSILON)

    return GRPOAdvantages(
        advantages=torch.nan_to_num(advantages, nan=0.0),
        rewards=rewards,
        std=std,
        is_std_zero=torch.isclose(std, torch.zeros_like(std)),
        unscorable=unscorable,
    )


def _check_rewards(rewards_per_func: Tensor, reward_weights: Tensor | Sequence[float] | None) -> tuple[Tensor, Tensor]:
    if rewards_per_func.dim() != 2:
        raise ValueError(
            "`rewards_per_func` must be 2-D [completions, reward functions]; got shape "
            f"{tuple(rewards_per_func.shape)}."
        )
    rewards_per_func = _upcast(rewards_per_func)
    num_funcs = rewards_per_func.shape[1]
    if reward_weights is None:
        weights = torch.ones(num_funcs, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    else:
        weights = torch.as_tensor(reward_weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    if weights.shape != (num_funcs,):
        raise ValueError(
            f"`reward_weights` must hold one weight per reward function ({num_funcs}); got shape "
            f"{tuple(weights.shape)}."
        )
    return rewards_per_func, weights


def _check_groups(num_completions: int, num_generations: int, name: str) -> None:
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"`num_generations` must be a positive integer; got {num_generations!r}.")
    if num_completions % num_generations:
        raise ValueError(
            f"`{name}` holds {num_completions} completions, not a whole number of groups of "
            f"`num_generations`={num_generations} consecutive completions."
        )


# --------------------------------------------------------------------------------------------------------------------
# Masks and weights that enter the per-token loss
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def high_entropy_mask(
    entropies: Tensor, mask: Tensor, threshold: float, *, all_entropies: Tensor | None = None
) -> Tensor:
    """Tokens whose entropy reaches the ``threshold`` quantile of the batch's completion-token entropies.

    "Beyond the 80/20 Rule" (Wang et al., 2025, https://huggingface.co/papers/2506.01939) trains only on the
    high-entropy "forking" tokens. TRL's ``top_entropy_quantile = ρ`` calls this with ``threshold = 1 - ρ``:
    ``keep_it = m_it ∧ H_it ≥ quantile({H_js : m_js = 1}, threshold)`` (``torch.quantile``, linear interpolation).

    TRL takes the quantile over the completion tokens of *every* process (each pads its 1-D vector of masked entropies
    with a negative sentinel, gathers, drops the sentinel). This function is local by default; pass the gathered
    vector as ``all_entropies`` to reproduce the multi-process mask. TRL computes the quantile in float32; here it is
    computed in the inputs' dtype upcast to at least float32 (the same for float32 and bf16 inputs). Like TRL's, the
    pool is limited to ``torch.quantile``'s 2^24 values.

    Args:
        entropies: ``[B, T]`` per-token entropies of the policy's next-token distribution.
        mask: ``[B, T]`` 1 on completion tokens.
        threshold: quantile in ``[0, 1]``: 0 keeps every token, 1 only the highest-entropy one(s).
        all_entropies: optional 1-D entropies of the masked tokens of all processes.

    Returns:
        ``[B, T]`` bool, never true on a masked-out position; all false when there is no completion token.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"`threshold` must lie in [0, 1]; got {threshold}.")
    _check_shape("mask", mask, "entropies", entropies)
    mask = mask.bool()
    pool = _upcast(entropies[mask] if all_entropies is None else all_entropies.reshape(-1))
    if pool.numel() == 0:
        return torch.zeros_like(mask)
    cutoff = torch.quantile(pool, threshold)
    return (_upcast(entropies) >= cutoff) & mask


@torch.no_grad()
def off_policy_mask(
    advantages: Tensor, per_token_logps: Tensor, sampling_per_token_logps: Tensor, mask: Tensor, threshold: float
) -> Tensor:
    """Off-policy sequence mask (DeepSeek-V3.2, https://huggingface.co/papers/2512.02556, Eq. 9).

    Drops the negative-advantage sequences that drifted too far from the policy that sampled them:
    ``keep_i = A_i ≥ 0  ∨  (1/|y_i|) Σ_t m_it (log π_sample(y_it) - log π_θ(y_it)) ≤ δ``. Tokens whose sampling
    log-prob is NaN (a generation engine could not score them) count as zero drift.

    Args:
        advantages: ``[B, 1]`` (or ``[B, T]``) advantages.
        per_token_logps: ``[B, T]`` current log-probs (used without gradient).
        sampling_per_token_logps: ``[B, T]`` log-probs of the sampling policy (TRL: the engine's, else ``old``).
        mask: ``[B, T]`` completion mask.
        threshold: ``δ``, the largest mean per-token KL a negative-advantage sequence may have.

    Returns:
        ``[B, 1]`` (or ``[B, T]``) 1.0 to keep, 0.0 to drop, in the dtype of ``per_token_logps`` (upcast).
    """
    if not threshold >= 0:
        raise ValueError(f"`threshold` must be >= 0; got {threshold}.")
    _check_shape("sampling_per_token_logps", sampling_per_token_logps, "per_token_logps", per_token_logps)
    _check_shape("mask", mask, "per_token_logps", per_token_logps)
    mask = mask.to(_upcast(per_token_logps).dtype)
    drift = torch.nan_to_num(_upcast(sampling_per_token_logps) - _upcast(per_token_logps), nan=0.0)
    mean_drift = (drift * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_drift <= threshold)).to(mask.dtype)


@torch.no_grad()
def vespo_gamma_weights(
    advantages: Tensor,
    log_ratio: Tensor,
    mask: Tensor,
    importance_sampling_ratio: Tensor | None = None,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> Tensor:
    """VESPO's per-sequence gamma weight (https://huggingface.co/papers/2602.10693), a constant (no gradient).

    With ``w_i = exp(Σ_t m_it log r_it)`` the sequence importance ratio (a product over tokens, not GSPO's geometric
    mean), ``φ(w) = w^k · e^{λ (1 - w)}``: 1 at ``w = 1``, smoothly vanishing for ``w → 0`` (power ``k``) and for
    ``w → ∞`` (decay ``λ``), in place of hard clipping. ``(k, λ) = (k_pos, λ_pos)`` where ``A ≥ 0``, else
    ``(k_neg, λ_neg)``. Computed in log space: each ``log r`` is clamped to ``[-20, 20]``, ``log w`` to
    ``[log 1e-8, 20]``, ``λ`` to ``≥ 1e-4``; a non-finite ``φ`` becomes 0 (TRL's numerics, kept to match it).

    Args:
        advantages: ``[B, 1]`` (or ``[B, T]``) advantages.
        log_ratio: ``[B, T]`` per-token ``log π_θ - log π_old``.
        mask: ``[B, T]`` completion mask.
        importance_sampling_ratio: optional ``[B, T]`` truncated/masked ratio ``π_old / π_sample`` of a generation
            engine; its logs (clamped to ``[log 1e-8, 20]``) are added to ``log w`` over every position, unmasked, as
            in TRL (padding positions carry ratio 1).

    Returns:
        ``[B, 1]`` (or ``[B, T]``) weights ``φ``.
    """
    lower = math.log(1e-8)
    mask = mask.to(log_ratio.dtype)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_w = log_w + torch.log(importance_sampling_ratio).clamp(lower, 20.0).sum(dim=-1, keepdim=True)
    log_w = log_w.clamp(lower, 20.0)
    nonnegative = advantages >= 0
    k = torch.full_like(advantages, k_neg, dtype=log_w.dtype).masked_fill(nonnegative, k_pos)
    lam = torch.full_like(advantages, lambda_neg, dtype=log_w.dtype).masked_fill(nonnegative, lambda_pos)
    lam = lam.clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def adaptive_entropy_coef(
    entropy_coef: float,
    entropy: float,
    *,
    entropy_target: float = 0.2,
    entropy_coef_delta: float = 0.005,
    entropy_coef_min: float = 0.0,
    entropy_coef_max: float = 1.0,
) -> float:
    """One step of adaptive entropy control (Skywork-OR1, https://huggingface.co/papers/2505.22312).

    At each optimizer step the coefficient moves by ``entropy_coef_delta`` towards more entropy bonus when the
    measured entropy is at or below ``entropy_target`` and towards less otherwise, within
    ``[entropy_coef_min, entropy_coef_max]``. ``entropy`` is TRL's window-global token mean: ``Σ (H · m') / Σ m'``
    summed over every micro-batch of the accumulation window and every process (``m'`` the mask of the entropy bonus,
    see :func:`grpo_loss`). TRL *applies* the coefficient only while the entropy measured at the previous step is at
    or below the target (``+inf`` before the first step): pass ``entropy_coef if last_entropy <= entropy_target else
    0.0`` as :func:`grpo_loss`'s ``entropy_coef``.

    Returns:
        The coefficient for the next optimizer step.
    """
    if not entropy_coef_delta >= 0:
        raise ValueError(f"`entropy_coef_delta` must be >= 0; got {entropy_coef_delta}.")
    if not entropy_coef_min <= entropy_coef_max:
        raise ValueError(
            f"`entropy_coef_min` ({entropy_coef_min}) must not exceed `entropy_coef_max` ({entropy_coef_max})."
        )
    if entropy <= entropy_target:
        return min(entropy_coef + entropy_coef_delta, entropy_coef_max)
    return max(entropy_coef - entropy_coef_delta, entropy_coef_min)


def k3_kl(per_token_logps: Tensor, ref_per_token_logps: Tensor) -> Tensor:
    """Per-token KL estimate ``exp(ρ) - ρ - 1`` with ``ρ = log π_ref - log π_θ`` (DeepSeekMath Eq. 4).

    Schulman's "k3" estimator (http://joschu.net/blog/kl-approx.html) of ``KL(π_θ ‖ π_ref)`` on samples of ``π_θ``:
    unbiased and never negative.
    """
    delta = ref_per_token_logps - per_token_logps
    return torch.exp(delta) - delta - 1


# --------------------------------------------------------------------------------------------------------------------
# The per-token policy terms: each maps the prepared terms to a per-token loss [B, T] (or [B, 1])
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPOTerms:
    """Everything a per-token GRPO variant may read, prepared once by :func:`grpo_loss`.

    ``ratio`` is ``exp(log_importance_weights)``: per token ``[B, T]`` (``importance_sampling_level="token"``) or per
    sequence ``[B, 1]`` (``"sequence"``, GSPO's ``exp(mean_t log r_it)``). ``advantages`` is ``[B, 1]`` (or ``[B, T]``).
    """

    per_token_logps: Tensor
    log_ratio: Tensor
    ratio: Tensor
    advantages: Tensor
    mask: Tensor
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float
    importance_sampling_ratio: Tensor | None

    @cached_property
    def capped_ratio(self) -> Tensor:
        """``min(r, δ)``: the ratio of the unclipped surrogate term under two-sided clipping (``r`` without ``δ``)."""
        return self.ratio if self.delta is None else torch.clamp(self.ratio, max=self.delta)

    @cached_property
    def phi(self) -> Tensor:
        """VESPO's per-sequence weight :func:`vespo_gamma_weights` (no gradient)."""
        return vespo_gamma_weights(
            self.advantages,
            self.log_ratio,
            self.mask,
            self.importance_sampling_ratio,
            k_pos=self.vespo_k_pos,
            lambda_pos=self.vespo_lambda_pos,
            k_neg=self.vespo_k_neg,
            lambda_neg=self.vespo_lambda_neg,
        )


def clipped_surrogate_loss(t: GRPOTerms) -> Tensor:
    """PPO's clipped surrogate with DAPO's decoupled bounds and INTELLECT-2's two-sided cap.

    ``-min(r̃ A, clip(r, 1 - ε_low, 1 + ε_high) A)`` with ``r̃ = min(r, δ)`` when ``delta`` is set, else ``r``.
    GRPO (https://huggingface.co/papers/2402.03300, Eq. 3) with ``ε_low = ε_high``; "clip-higher" ``ε_high > ε_low``
    from DAPO (https://huggingface.co/papers/2503.14476); ``δ`` bounds the ratio of negative-advantage tokens, which the
    one-sided clip leaves unbounded (INTELLECT-2, https://huggingface.co/papers/2505.07291). Shared by ``grpo``,
    ``bnpo``, ``dr_grpo``, ``dapo`` and ``luspo``, which differ only in aggregation; with a sequence-level ratio it is
    GSPO's objective (https://huggingface.co/papers/2507.18071).
    """
    clipped = torch.clamp(t.ratio, 1 - t.epsilon_low, 1 + t.epsilon_high)
    return -torch.min(t.capped_ratio * t.advantages, clipped * t.advantages)


def cispo_loss(t: GRPOTerms) -> Tensor:
    """CISPO (MiniMax-M1, https://huggingface.co/papers/2506.13585): clip the importance weight, not the update.

    ``-sg(min(r, ε_max)) · A · log π_θ``: a REINFORCE term weighted by the truncated ratio with its gradient stopped, so
    every token keeps a gradient (clipped PPO tokens get none). ``ε_max`` is ``epsilon_high`` (ScaleRL,
    https://huggingface.co/papers/2510.13786, recommends 5.0).
    """
    weight = torch.clamp(t.ratio, max=t.epsilon_high).detach()
    return -weight * t.advantages * t.per_token_logps


def sapo_loss(t: GRPOTerms) -> Tensor:
    """SAPO (Soft Adaptive Policy Optimization, https://huggingface.co/papers/2511.20347): a soft gate for the clip.

    ``-(4/τ) σ(τ (r - 1)) · A`` with ``τ = τ_pos`` where ``A > 0``, else ``τ_neg``: the gradient weight
    ``4 σ(x)(1 - σ(x))``, ``x = τ (r - 1)``, is 1 on-policy and decays smoothly as the ratio leaves 1, faster for
    ``τ_neg > τ_pos``.
    """
    # Built in the advantages' dtype: a float32 τ (what `torch.where` on two Python floats gives) would round 1.05.
    temperature = torch.full_like(t.advantages, t.sapo_temperature_neg).masked_fill(
        t.advantages > 0, t.sapo_temperature_pos
    )
    return -torch.sigmoid(temperature * (t.ratio - 1)) * 4 / temperature * t.advantages


def vespo_loss(t: GRPOTerms) -> Tensor:
    """VESPO (https://huggingface.co/papers/2602.10693): ``-φ(w) · A · log π_θ``, ``φ`` of :func:`vespo_gamma_weights`.

    A REINFORCE term weighted by a smooth function of the *sequence* importance ratio (computed from the per-token
    ratios whatever ``importance_sampling_level`` is).
    """
    return -t.phi * t.advantages * t.per_token_logps


GRPO_LOSSES: dict[str, Callable[[GRPOTerms], Tensor]] = {
    "grpo": clipped_surrogate_loss,
    "bnpo": clipped_surrogate_loss,
    "dr_grpo": clipped_surrogate_loss,
    "dapo": clipped_surrogate_loss,
    "luspo": clipped_surrogate_loss,
    "cispo": cispo_loss,
    "sapo": sapo_loss,
    "vespo": vespo_loss,
}
"""TRL's ``loss_type`` -> per-token policy loss ``GRPOTerms -> [B, T]`` (``[B, 1]`` for sequence-level ratios)."""

#: Loss types whose per-token term is the clipped surrogate; TRL logs ``clip_ratio/*`` for these.
GRPO_CLIPPED_LOSS_TYPES = frozenset({"grpo", "bnpo", "dr_grpo", "dapo", "luspo"})
#: Loss types that divide a token sum by the caller's ``normalizer``.
GRPO_TOKEN_SUM_LOSS_TYPES = frozenset({"dapo", "cispo", "vespo"})


# --------------------------------------------------------------------------------------------------------------------
# Aggregations: masked per-token losses [B, T] -> the micro-batch loss
# --------------------------------------------------------------------------------------------------------------------


class _Reduction(NamedTuple):
    masked_loss: Tensor  # [B, T]: the per-token loss times the mask
    mask: Tensor  # [B, T] float
    max_completion_length: int | None
    normalizer: Tensor | float | None


def sequence_mean(x: _Reduction) -> Tensor:
    """``grpo``, ``sapo``: ``(1/B) Σ_i (1/|y_i|) Σ_t m_it ℓ_it``, each sequence's token mean, then the batch mean.

    DeepSeekMath's original aggregation; a token of a long completion weighs less than one of a short completion
    (the length bias Dr. GRPO points out). Empty sequences count as 0 in the mean.
    """
    return (x.masked_loss.sum(dim=-1) / x.mask.sum(dim=-1).clamp(min=1.0)).mean()


def token_mean(x: _Reduction) -> Tensor:
    """``bnpo``: ``Σ_it m_it ℓ_it / Σ_it m_it``, the mean over the micro-batch's completion tokens."""
    return x.masked_loss.sum() / x.mask.sum().clamp(min=1.0)


def constant_length(x: _Reduction) -> Tensor:
    """``dr_grpo`` (https://huggingface.co/papers/2503.20783): ``Σ_it m_it ℓ_it / (B · L_max)``.

    Dividing by the constant ``max_completion_length`` instead of each completion's length removes the length bias.
    """
    return x.masked_loss.sum() / (x.masked_loss.shape[0] * x.max_completion_length)


def token_sum(x: _Reduction) -> Tensor:
    """``dapo``, ``cispo``, ``vespo``: ``Σ_it m_it ℓ_it / normalizer`` (DAPO's token-level loss).

    ``normalizer`` is the number of completion tokens of the whole accumulation window, per micro-batch and process,
    so every token of the optimizer step weighs the same however the tokens are spread over micro-batches.
    """
    return x.masked_loss.sum() / x.normalizer


def length_weighted_sequence_sum(x: _Reduction) -> Tensor:
    """``luspo`` (LUSPO, https://huggingface.co/papers/2602.05261): ``(1/B) Σ_i Σ_t m_it ℓ_it``.

    With a sequence-level ratio (the intended setting) ``ℓ_it = ℓ_i`` and this is ``(1/B) Σ_i |y_i| ℓ_i``: GSPO's
    sequence loss scaled by the sequence length, which undoes GSPO's bias towards short sequences.
    """
    return x.masked_loss.sum(dim=-1).mean()


GRPO_AGGREGATIONS: dict[str, Callable[[_Reduction], Tensor]] = {
    "grpo": sequence_mean,
    "sapo": sequence_mean,
    "bnpo": token_mean,
    "dr_grpo": constant_length,
    "dapo": token_sum,
    "cispo": token_sum,
    "vespo": token_sum,
    "luspo": length_weighted_sequence_sum,
}
"""TRL's ``loss_type`` -> reduction of the masked per-token losses to the micro-batch loss."""


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


class GRPOLossOutput(NamedTuple):
    """Result of :func:`grpo_loss`.

    ``S`` below is ``T`` for token-level importance sampling and 1 for sequence level; bool masks have the broadcast
    shape of the ratio and the advantages.

    - ``loss``: scalar, ``policy_loss - entropy_coef · entropy``; TRL's loss times ``g`` (see the module docstring).
    - ``policy_loss``: scalar, detached: the aggregated policy (+ KL) term. TRL logs it as ``policy_loss`` (only when
      the entropy bonus is on): this value for ``grpo``/``bnpo``/``dr_grpo``/``sapo``/``luspo``, this value ``/ g``
      for ``dapo``/``cispo``/``vespo``; across processes TRL takes the mean.
    - ``per_token_loss``: ``[B, S]`` or ``[B, T]``, before masking and aggregation (policy term after the off-policy,
      entropy and sampling masks, plus ``β · KL``).
    - ``coef_1``: ``[B, S]`` importance ratio ``r`` (before the ``delta`` cap).
    - ``per_token_kl``: ``[B, T]`` KL term (times ``r`` under ``use_bias_correction_kl``), detached; ``None`` if
      ``beta == 0``. TRL's ``kl`` is its masked mean.
    - ``is_low_clipped``, ``is_high_clipped``, ``is_region_clipped``: bool, clipped loss types only, else ``None``:
      ``min(r, δ) < 1 - ε_low ∧ A < 0``, ``min(r, δ) > 1 + ε_high ∧ A > 0``, either (TRL measures the capped ratio).
    - ``is_cispo_clipped``: bool, ``cispo`` only: ``r > ε_high ∧ A > 0``.
    - ``phi``: ``[B, 1]`` VESPO weights, ``vespo`` only.
    - ``off_policy_mask``: ``[B, 1]`` 1/0 keep mask, when ``off_policy_mask_threshold`` is set.
    - ``entropy``: scalar mean entropy over ``mask`` (times ``entropy_mask``), when ``entropy_coef != 0``, else
      ``None``.
    """

    loss: Tensor
    policy_loss: Tensor
    per_token_loss: Tensor
    coef_1: Tensor
    per_token_kl: Tensor | None
    is_low_clipped: Tensor | None
    is_high_clipped: Tensor | None
    is_region_clipped: Tensor | None
    is_cispo_clipped: Tensor | None
    phi: Tensor | None
    off_policy_mask: Tensor | None
    entropy: Tensor | None


IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def check_grpo_arguments(
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    max_completion_length: int | None = None,
    off_policy_mask_threshold: float | None = None,
) -> float:
    """Validate the hyperparameters of :func:`grpo_loss` (a module calls it at construction, to fail before
    training); return the effective ``epsilon_high`` (``epsilon_low`` when ``None``)."""
    if loss_type not in GRPO_LOSSES:
        raise ValueError(f"Unknown `loss_type` {loss_type!r}; valid values are {sorted(GRPO_LOSSES)}.")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"Unknown `importance_sampling_level` {importance_sampling_level!r}; valid values are "
            f"{list(IMPORTANCE_SAMPLING_LEVELS)}."
        )
    if not epsilon_low >= 0:
        raise ValueError(f"`epsilon_low` must be >= 0; got {epsilon_low}.")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if not epsilon_high >= 0:
        raise ValueError(f"`epsilon_high` must be >= 0; got {epsilon_high}.")
    if loss_type == "cispo" and not epsilon_high > 0:
        raise ValueError(f"`epsilon_high` is the ratio cap ε_max of 'cispo' and must be > 0; got {epsilon_high}.")
    if delta is not None and not delta > 0:
        raise ValueError(f"`delta` must be > 0 (INTELLECT-2 recommends > 1 + epsilon_high) or None; got {delta}.")
    if not beta >= 0:
        raise ValueError(f"`beta` must be >= 0; got {beta}.")
    for name, value in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg)):
        if loss_type == "sapo" and not value > 0:
            raise ValueError(f"`{name}` must be > 0; got {value}.")
    for name, value in (
        ("vespo_k_pos", vespo_k_pos),
        ("vespo_lambda_pos", vespo_lambda_pos),
        ("vespo_k_neg", vespo_k_neg),
        ("vespo_lambda_neg", vespo_lambda_neg),
    ):
        if loss_type == "vespo" and not value >= 0:
            raise ValueError(f"`{name}` must be >= 0; got {value}.")
    if loss_type == "dr_grpo" and not (isinstance(max_completion_length, int) and max_completion_length > 0):
        raise ValueError(
            f"`max_completion_length` (the constant 'dr_grpo' divides by) must be a positive integer; got "
            f"{max_completion_length!r}."
        )
    if off_policy_mask_threshold is not None and not off_policy_mask_threshold >= 0:
        raise ValueError(f"`off_policy_mask_threshold` must be >= 0 or None; got {off_policy_mask_threshold}.")
    return epsilon_high


def grpo_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    ref_per_token_logps: Tensor | None = None,
    use_bias_correction_kl: bool = True,
    entropies: Tensor | None = None,
    entropy_mask: Tensor | None = None,
    entropy_coef: float = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    max_completion_length: int | None = None,
    normalizer: Tensor | float | None = None,
    off_policy_mask_threshold: float | None = None,
    sampling_per_token_logps: Tensor | None = None,
    importance_sampling_ratio: Tensor | None = None,
) -> GRPOLossOutput:
    """The GRPO family of policy losses for one micro-batch (TRL 1.16 ``GRPOTrainer._compute_loss`` semantics).

    With per-token log-ratios ``log r_it = log π_θ(y_it) - log π_old(y_it)``, the importance ratio is ``r_it`` for
    ``importance_sampling_level="token"`` or ``r_i = exp(Σ_t m_it log r_it / |y_i|)`` for ``"sequence"`` (GSPO). Then::

        ℓ_it = GRPO_LOSSES[loss_type](terms)                       # e.g. -min(r A, clip(r, 1-ε_low, 1+ε_high) A)
               · keep_i (off-policy mask) · e_it (entropy mask) · ρ_it (sampling IS ratio, not for vespo)
               + β · KL_it,  KL_it = k3_kl · (r if use_bias_correction_kl)
        policy_loss = GRPO_AGGREGATIONS[loss_type](m · ℓ)
        loss = policy_loss - entropy_coef · Σ_it m'_it H_it / Σ_it m'_it,   m' = m · e

    Args:
        per_token_logps: ``[B, T]`` log-probs of the completion tokens under the policy (with gradient).
        old_per_token_logps: ``[B, T]`` log-probs under the policy that generated the batch; ``None`` when training is
            on-policy (TRL skips them when ``num_iterations == 1`` and generation aligns with optimizer steps): then
            ``per_token_logps.detach()``, so ``r = 1`` with the on-policy gradient.
        advantages: ``[B]`` per-completion advantages (:func:`grpo_advantages`), or ``[B, T]`` per-token.
        mask: ``[B, T]`` 1 on the trained completion tokens (``completion_mask · tool_mask``).
        loss_type: a key of :data:`GRPO_LOSSES` (TRL's default ``"dapo"``).
        importance_sampling_level: ``"token"`` (default) or ``"sequence"``. TRL recommends ``"sequence"`` for
            ``luspo`` and ``"token"`` for ``vespo`` (which computes its own sequence ratio), and warns that the
            token-sum losses with ``"sequence"`` weight sequences by length.
        epsilon_low: ``ε_low``, lower clip range (TRL's ``epsilon``, default 0.2).
        epsilon_high: ``ε_high``, upper clip range (default ``epsilon_low``; DAPO uses 0.28). For ``cispo`` the cap
            ``ε_max`` of the ratio itself.
        delta: two-sided clipping cap of the unclipped term (``None``: off).
        beta: KL coefficient (TRL default 0.0); when non-zero ``ref_per_token_logps`` is required.
        ref_per_token_logps: ``[B, T]`` reference-model log-probs.
        use_bias_correction_kl: multiply the KL term by ``r`` (DeepSeek-V3.2, https://huggingface.co/papers/2512.02556):
            the gradient becomes that of the reverse KL even off-policy; TRL's default True.
        entropies: ``[B, T]`` per-token entropies; required when ``entropy_coef != 0``.
        entropy_mask: ``[B, T]`` bool from :func:`high_entropy_mask` (TRL: when ``top_entropy_quantile < 1``), or
            ``None``. It restricts both the policy term and the entropy bonus.
        entropy_coef: coefficient of the entropy bonus (TRL's static ``entropy_coef``; under adaptive control the
            coefficient TRL applies this step, see :func:`adaptive_entropy_coef`).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's ``τ_pos`` (1.0) and ``τ_neg`` (1.05).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's ``k``/``λ`` (2, 3, 3, 2).
        max_completion_length: ``L_max`` of ``dr_grpo`` (required there).
        normalizer: what ``dapo``/``cispo``/``vespo`` divide the masked token sum by. TRL divides by
            ``max(n, 1) / P · g / S`` in training and ``max(n, 1) / P`` in evaluation, with ``n`` =
            ``num_items_in_batch`` = the completion tokens (``mask.sum()``) of the whole generation batch summed over
            all ``P`` processes, ``g`` = ``current_gradient_accumulation_steps`` and ``S`` = ``steps_per_generation``.
            Pass ``max(n, 1) / (P · S)`` in training and ``max(n, 1) / P`` in evaluation; then TRL's loss is ``loss /
            g`` as for the other types. ``None``: ``max(mask.sum(), 1)``, i.e. one process, one micro-batch per
            generation batch.
        off_policy_mask_threshold: ``δ`` of :func:`off_policy_mask`; ``None`` disables it.
        sampling_per_token_logps: ``[B, T]`` log-probs of the engine that sampled (vLLM); the off-policy mask uses them,
            else ``old_per_token_logps``.
        importance_sampling_ratio: ``[B, T]`` or ``[B, 1]`` truncated/masked ``π_old / π_sample`` ratio of a generation
            engine (TRL's vLLM correction); multiplies the policy term, or enters ``φ`` for ``vespo``.

    Returns:
        :class:`GRPOLossOutput`.

    Raises:
        ValueError: on an unknown ``loss_type`` / ``importance_sampling_level``, an out-of-range hyperparameter, a
            missing input a setting needs, or inputs whose shapes do not match.
    """
    epsilon_high = check_grpo_arguments(
        loss_type, importance_sampling_level, epsilon_low, epsilon_high, delta, beta, sapo_temperature_pos,
        sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, max_completion_length,
        off_policy_mask_threshold,
    )  # fmt: skip
    if per_token_logps.dim() != 2:
        raise ValueError(f"`per_token_logps` must be 2-D [batch, tokens]; got shape {tuple(per_token_logps.shape)}.")
    for name, tensor in (
        ("old_per_token_logps", old_per_token_logps),
        ("mask", mask),
        ("ref_per_token_logps", ref_per_token_logps),
        ("entropies", entropies),
        ("entropy_mask", entropy_mask),
        ("sampling_per_token_logps", sampling_per_token_logps),
    ):
        if tensor is not None:
            _check_shape(name, tensor, "per_token_logps", per_token_logps)
    batch_size = per_token_logps.shape[0]
    if advantages.shape not in ((batch_size,), tuple(per_token_logps.shape)):
        raise ValueError(
            f"`advantages` must be [batch] ({batch_size},) or [batch, tokens] {tuple(per_token_logps.shape)}; got "
            f"{tuple(advantages.shape)}."
        )
    if importance_sampling_ratio is not None and importance_sampling_ratio.shape not in (
        (batch_size, 1),
        tuple(per_token_logps.shape),
    ):
        raise ValueError(
            f"`importance_sampling_ratio` must be [batch, 1] or [batch, tokens] {tuple(per_token_logps.shape)}; got "
            f"{tuple(importance_sampling_ratio.shape)}."
        )
    if beta != 0 and ref_per_token_logps is None:
        raise ValueError(f"`ref_per_token_logps` is required when `beta` != 0 (got beta={beta}).")
    if entropy_coef != 0 and entropies is None:
        raise ValueError(f"`entropies` are required when `entropy_coef` != 0 (got entropy_coef={entropy_coef}).")
    if loss_type in GRPO_TOKEN_SUM_LOSS_TYPES and isinstance(normalizer, (int, float)) and not normalizer > 0:
        raise ValueError(f"`normalizer` must be > 0; got {normalizer}.")
    if isinstance(normalizer, Tensor) and normalizer.numel() != 1:
        raise ValueError(f"`normalizer` must be a scalar; got shape {tuple(normalizer.shape)}.")

    per_token_logps = _upcast(per_token_logps)
    dtype = per_token_logps.dtype
    mask = mask.to(dtype)
    old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else _upcast(old_per_token_logps)
    advantages = _upcast(advantages)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [B, 1]: one advantage for every token of a completion

    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:  # GSPO: the length-normalised sequence log-ratio, [B, 1]
        log_importance_weights = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_importance_weights)
    if importance_sampling_ratio is not None:
        importance_sampling_ratio = _upcast(importance_sampling_ratio)

    terms = GRPOTerms(
        per_token_logps=per_token_logps,
        log_ratio=log_ratio,
        ratio=ratio,
        advantages=advantages,
        mask=mask,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
        importance_sampling_ratio=importance_sampling_ratio,
    )
    per_token_loss = GRPO_LOSSES[loss_type](terms)

    keep = None
    if off_policy_mask_threshold is not None:
        sampling = old_per_token_logps if sampling_per_token_logps is None else sampling_per_token_logps
        keep = off_policy_mask(advantages, per_token_logps, sampling, mask, off_policy_mask_threshold)
        per_token_loss = per_token_loss * keep
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None and loss_type != "vespo":  # vespo folds it into φ
        per_token_loss = per_token_loss * importance_sampling_ratio

    per_token_kl = None
    if beta != 0:
        per_token_kl = k3_kl(per_token_logps, _upcast(ref_per_token_logps))
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl

    if normalizer is None:
        normalizer = mask.sum().clamp(min=1.0)
    reduction = _Reduction(per_token_loss * mask, mask, max_completion_length, normalizer)
    policy_loss = GRPO_AGGREGATIONS[loss_type](reduction)

    loss, entropy = policy_loss, None
    if entropy_coef != 0:
        # The bonus is a plain mean entropy over the tokens the policy term trains on, whatever the loss type.
        bonus_mask = mask if entropy_mask is None else mask * entropy_mask
        entropy = (_upcast(entropies) * bonus_mask).sum() / bonus_mask.sum().clamp(min=1.0)
        loss = policy_loss - entropy_coef * entropy

    low = high = region = cispo_clipped = phi = None
    with torch.no_grad():
        if loss_type in GRPO_CLIPPED_LOSS_TYPES:
            low = (terms.capped_ratio < 1 - epsilon_low) & (advantages < 0)
            high = (terms.capped_ratio > 1 + epsilon_high) & (advantages > 0)
            region = low | high
        elif loss_type == "cispo":
            cispo_clipped = (ratio > epsilon_high) & (advantages > 0)
        elif loss_type == "vespo":
            phi = terms.phi
    return GRPOLossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        per_token_loss=per_token_loss,
        coef_1=ratio,
        per_token_kl=None if per_token_kl is None else per_token_kl.detach(),
        is_low_clipped=low,
        is_high_clipped=high,
        is_region_clipped=region,
        is_cispo_clipped=cispo_clipped,
        phi=phi,
        off_policy_mask=keep,
        entropy=None if entropy is None else entropy.detach(),
    )


def _check_shape(name: str, tensor: Tensor, reference_name: str, reference: Tensor) -> None:
    if tensor.shape != reference.shape:
        raise ValueError(
            f"`{name}` must have the shape of `{reference_name}` {tuple(reference.shape)}; got {tuple(tensor.shape)}."
        )


# --------------------------------------------------------------------------------------------------------------------
# Metrics, in a form the caller can reduce across processes the way TRL does
# --------------------------------------------------------------------------------------------------------------------


class PolicyGradientMetrics(NamedTuple):
    """Local pieces of the metrics TRL logs, keyed by TRL's metric names.

    - ``sums``: name -> ``[2]`` tensor ``(sum, count)``. TRL sums both over processes (``accelerator.reduce``), then
      logs ``sum / max(count, 1)``.
    - ``sequence_minima``: name -> ``[B]`` per-sequence values (NaN for a sequence without completion tokens). TRL
      gathers them over processes and logs the NaN-ignoring minimum.
    - ``sequence_maxima``: likewise, the NaN-ignoring maximum.

    :meth:`local` gives the values of a single process.
    """

    sums: dict[str, Tensor]
    sequence_minima: dict[str, Tensor]
    sequence_maxima: dict[str, Tensor]

    def local(self) -> dict[str, float]:
        """The metric values as TRL logs them when there is one process (NaN for an all-NaN min/max)."""
        values = {name: (pair[0] / pair[1].clamp(min=1.0)).item() for name, pair in self.sums.items()}
        for extrema, pick in ((self.sequence_minima, torch.min), (self.sequence_maxima, torch.max)):
            for name, per_sequence in extrema.items():
                finite = per_sequence[~torch.isnan(per_sequence)]
                values[name] = pick(finite).item() if finite.numel() else math.nan
        return values


def _masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """``(Σ m x, Σ m)``; a ``[B, 1]`` value (one per sequence) counts once per sequence, mask or not (as TRL)."""
    x = x.detach().to(mask.dtype)
    if x.shape[1] == 1:
        return torch.stack([x.sum(), torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)])
    return torch.stack([(x * mask).sum(), mask.sum()])


def _per_sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` masked mean of each row (NaN for an empty row), or the value itself for ``[B, 1]``."""
    x = x.detach().to(mask.dtype)
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * mask).sum(-1) / mask.sum(-1)


@torch.no_grad()
def grpo_metrics(output: GRPOLossOutput, mask: Tensor, entropies: Tensor | None = None) -> PolicyGradientMetrics:
    """TRL's GRPO loss metrics from one micro-batch: ``kl`` (when ``beta != 0``), ``entropy`` (when ``entropies`` are
    given; over ``mask``, not the entropy mask), ``clip_ratio/{low_mean,high_mean,region_mean}`` (token means) and
    ``clip_ratio/low_min``, ``clip_ratio/high_max`` (min/max over sequences of each sequence's clipped fraction) for
    the clipped loss types, ``cispo_clip_ratio`` for ``cispo``, ``vespo/phi_seq_mean`` for ``vespo``.

    Args:
        output: what :func:`grpo_loss` returned.
        mask: ``[B, T]`` the mask given to :func:`grpo_loss`.
        entropies: ``[B, T]`` per-token entropies, or ``None`` to leave ``entropy`` out.
    """
    mask = mask.to(output.coef_1.dtype)
    sums: dict[str, Tensor] = {}
    minima: dict[str, Tensor] = {}
    maxima: dict[str, Tensor] = {}
    if output.per_token_kl is not None:
        sums["kl"] = _masked_sum(output.per_token_kl, mask)
    if entropies is not None:
        sums["entropy"] = _masked_sum(entropies, mask)
    if output.is_low_clipped is not None:
        sums["clip_ratio/low_mean"] = _masked_sum(output.is_low_clipped, mask)
        sums["clip_ratio/high_mean"] = _masked_sum(output.is_high_clipped, mask)
        sums["clip_ratio/region_mean"] = _masked_sum(output.is_region_clipped, mask)
        minima["clip_ratio/low_min"] = _per_sequence_mean(output.is_low_clipped, mask)
        maxima["clip_ratio/high_max"] = _per_sequence_mean(output.is_high_clipped, mask)
    if output.is_cispo_clipped is not None:
        sums["cispo_clip_ratio"] = _masked_sum(output.is_cispo_clipped, mask)
    if output.phi is not None:
        sums["vespo/phi_seq_mean"] = _masked_sum(output.phi, mask)
    return PolicyGradientMetrics(sums, minima, maxima)
