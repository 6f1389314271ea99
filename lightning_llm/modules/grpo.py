"""``GRPOModule``: Group Relative Policy Optimization and every TRL 1.16 GRPO loss type."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_llm.data.batches import RolloutBatch
from lightning_llm.losses.grpo import (
    GRPO_TOKEN_SUM_LOSS_TYPES,
    MULTI_OBJECTIVE_AGGREGATIONS,
    SCALE_REWARDS,
    check_grpo_arguments,
    grpo_advantages,
    grpo_loss,
    grpo_metrics,
    high_entropy_mask,
)
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.online import OnlineModule


class GRPOModule(OnlineModule):
    """GRPO (Shao et al., 2024, arXiv:2402.03300) on a :class:`~lightning_llm.PromptDataModule`.

    Each prompt's ``num_generations`` completions are scored; each completion's advantage is its reward standardised
    within its group (``scale_rewards``), and the policy is trained with the loss of ``loss_type`` on the importance
    ratio to the policy of generation time (see :func:`lightning_llm.losses.grpo.grpo_loss` for every variant's
    formula and paper), plus ``beta`` times the k3 KL to the reference model.

    Logs TRL's metrics: ``loss``, ``reward``, ``reward_std``, ``rewards/<name>/mean``, ``rewards/<name>/std``,
    ``frac_reward_zero_std``, ``completions/*``, ``kl`` (``beta != 0``), ``entropy``, ``clip_ratio/low_mean``,
    ``clip_ratio/low_min``, ``clip_ratio/high_mean``, ``clip_ratio/high_max``, ``clip_ratio/region_mean`` (clipped
    loss types; ``cispo_clip_ratio`` for cispo, ``vespo/phi_seq_mean`` for vespo), ``policy_loss`` (with an entropy
    bonus), ``num_tokens``, ``learning_rate`` (and ``val/...``).

    Args:
        model: see :class:`~lightning_llm.modules.online.OnlineModule`.
        tokenizer: see :class:`~lightning_llm.modules.online.OnlineModule`.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo`` (TRL's default), ``cispo``, ``sapo``, ``luspo`` or
            ``vespo``.
        importance_sampling_level: ``token`` (a ratio per token) or ``sequence`` (GSPO, arXiv:2507.18071).
        scale_rewards: ``group`` (divide by the group's reward std), ``batch`` (by the batch's) or ``none``
            (Dr. GRPO).
        multi_objective_aggregation: ``sum_then_normalize`` (sum the weighted rewards, then standardise) or
            ``normalize_then_sum`` (GDPO: standardise each reward within its group first).
        epsilon: lower clip range ``ε_low``.
        epsilon_high: upper clip range (default ``epsilon``; DAPO uses 0.28; for cispo the ratio cap).
        delta: cap of the unclipped ratio term (two-sided clipping, INTELLECT-2); ``None``: off.
        beta: coefficient of the k3 KL to the reference (TRL's default 0: no reference model is loaded).
        use_bias_correction_kl: multiply the KL term by the importance ratio (DeepSeek-V3.2; TRL's default).
        top_entropy_quantile: train only on the tokens whose entropy is in this top fraction (1: all).
        entropy_coef: coefficient of an entropy bonus (0: off).
        off_policy_mask_threshold: drop sequences with a negative advantage whose mean KL to the sampling policy
            exceeds this (DeepSeek-V3.2's off-policy sequence mask); ``None``: off.
        sapo_temperature_pos: SAPO's temperature for positive advantages.
        sapo_temperature_neg: SAPO's temperature for negative advantages.
        vespo_k_pos: VESPO's ``k`` for non-negative advantages.
        vespo_lambda_pos: VESPO's ``λ`` for non-negative advantages.
        vespo_k_neg: VESPO's ``k`` for negative advantages.
        vespo_lambda_neg: VESPO's ``λ`` for negative advantages.
        num_generations: completions per prompt (TRL's default 8).
        learning_rate: TRL's GRPO default, 1e-6.
        **kwargs: the :class:`~lightning_llm.modules.online.OnlineModule` arguments (reward_funcs, rollout,
            num_generations_eval, steps_per_generation, num_iterations, max_completion_length, temperature, top_p,
            top_k, min_p, repetition_penalty, mask_truncated_completions, ref_model, ...) and the
            :class:`~lightning_llm.modules.base.LLMModule` ones.
    """

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        loss_type: str = "dapo",
        importance_sampling_level: str = "token",
        scale_rewards: str | bool = "group",
        multi_objective_aggregation: str = "sum_then_normalize",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        beta: float = 0.0,
        use_bias_correction_kl: bool = True,
        top_entropy_quantile: float = 1.0,
        entropy_coef: float = 0.0,
        off_policy_mask_threshold: float | None = None,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        num_generations: int = 8,
        learning_rate: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, tokenizer, beta=beta, num_generations=num_generations, learning_rate=learning_rate,
                         **kwargs)
        scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, got "
                             f"{multi_objective_aggregation!r}")
        if not 0.0 <= top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
        self.loss_options = dict(
            loss_type=loss_type, importance_sampling_level=importance_sampling_level, epsilon_low=epsilon,
            epsilon_high=epsilon_high, delta=delta, beta=beta, sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
            vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg,
            max_completion_length=self.max_completion_length, off_policy_mask_threshold=off_policy_mask_threshold,
        )
        self.loss_options["epsilon_high"] = check_grpo_arguments(**self.loss_options)
        self.loss_type = loss_type
        self.scale_rewards = scale_rewards
        self.multi_objective_aggregation = multi_objective_aggregation
        self.use_bias_correction_kl = use_bias_correction_kl
        self.top_entropy_quantile = top_entropy_quantile
        self.entropy_coef = entropy_coef

    def compute_advantages(self, rewards_per_func: Tensor, rollout: RolloutBatch, num_generations: int) -> Tensor:
        out = grpo_advantages(rewards_per_func, self.reward_weight_tensor.to(rewards_per_func.device), num_generations,
                              scale_rewards=self.scale_rewards,
                              multi_objective_aggregation=self.multi_objective_aggregation)
        self.record_reward_metrics(rewards_per_func, out.is_std_zero)
        return out.advantages

    def normalizer(self, rollout: RolloutBatch) -> Tensor | None:
        """What the token-sum loss types divide by: the generation batch's completion tokens over all processes, per
        process and (in training) per micro-batch of the generation batch (TRL's ``num_items_in_batch`` rule)."""
        if self.loss_type not in GRPO_TOKEN_SUM_LOSS_TYPES:
            return None
        processes = self.trainer.world_size if self._trainer is not None else 1
        splits = self.schedule().steps_per_generation if self.training else 1
        return rollout.num_items_in_batch.clamp(min=1.0) / (processes * splits)

    def compute_loss(self, rollout: RolloutBatch) -> Tensor:
        logps, entropies = self.completion_token_logps(self.model, rollout, return_entropy=True)
        mask = rollout.completion_mask
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            pool = self._gather_padded_entropies(entropies, mask)
            entropy_mask = high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile, all_entropies=pool)
        out = grpo_loss(
            logps, rollout.old_per_token_logps, rollout.advantages, mask, **self.loss_options,
            ref_per_token_logps=rollout.ref_per_token_logps, use_bias_correction_kl=self.use_bias_correction_kl,
            entropies=entropies, entropy_mask=entropy_mask, entropy_coef=self.entropy_coef,
            normalizer=self.normalizer(rollout), sampling_per_token_logps=None,
        )
        self.record_policy_metrics(grpo_metrics(out, mask, entropies))
        if self.entropy_coef != 0:
            # TRL's policy_loss of the token-sum types is after its division by the accumulated micro-batches
            accumulate = self.trainer.accumulate_grad_batches if self.training and self._trainer is not None else 1
            scale = 1 / accumulate if self.loss_type in GRPO_TOKEN_SUM_LOSS_TYPES else 1.0
            self.record("policy_loss", out.policy_loss * scale)
            if self.training:
                self.record("entropy_coef", self.entropy_coef)
        return out.loss

    def _gather_padded_entropies(self, entropies: Tensor, mask: Tensor) -> Tensor | None:
        """The completion-token entropies of every process (the top-entropy quantile is taken over all of them)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        import torch

        local = entropies[mask.bool()].detach().float()
        size = torch.tensor([local.numel()], device=local.device)
        longest = int(self._gather_rows(size).max().item())
        padded = torch.full((longest,), -1.0, device=local.device)
        padded[: local.numel()] = local
        pool = self._gather_rows(padded)
        return pool[pool >= 0]
