"""``RLOOModule``: REINFORCE Leave-One-Out (TRL 1.16's ``RLOOTrainer``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lightning_llm.data.batches import RolloutBatch
from lightning_llm.losses.rloo import rloo_advantages, rloo_loss, rloo_metrics, rloo_sequence_kl, rloo_sequence_logps
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.online import OnlineModule


class RLOOModule(OnlineModule):
    """RLOO (Ahmadian et al., 2024, arXiv:2402.14740) on a :class:`~lightning_llm.PromptDataModule`.

    Each completion is one action. Its reward (clipped to ``reward_clip_range``) minus ``beta`` times the summed
    log-ratio to the reference model (k1, with the log-probs of generation time) is baselined by the mean reward of its
    scorable siblings; the policy is trained with a PPO-clipped surrogate on the sequence probability ratio, averaged
    over sequences (see :mod:`lightning_llm.losses.rloo`).

    Logs TRL's metrics: ``loss``, ``reward``, ``reward_std``, ``rewards/<name>/mean``, ``rewards/<name>/std``,
    ``frac_reward_zero_std``, ``completions/*``, ``kl`` (``beta != 0``), ``entropy``, ``clip_ratio/low_mean``,
    ``clip_ratio/low_min``, ``clip_ratio/high_mean``, ``clip_ratio/high_max``, ``clip_ratio/region_mean``,
    ``num_tokens``, ``learning_rate`` (and ``val/...``).

    Args:
        model: see :class:`~lightning_llm.modules.online.OnlineModule`.
        tokenizer: see :class:`~lightning_llm.modules.online.OnlineModule`.
        beta: KL coefficient of the reward penalty (TRL's RLOO default 0.05; 0 loads no reference model).
        epsilon: lower clip range of the sequence ratio.
        epsilon_high: upper clip range (default ``epsilon``).
        normalize_advantages: standardise the advantages over the generation batch.
        reward_clip_range: ``[min, max]`` the summed reward is clamped to before the KL penalty; ``None``: off.
        num_generations: completions per prompt (TRL's RLOO default 2).
        learning_rate: TRL's RLOO default, 1e-6.
        **kwargs: the :class:`~lightning_llm.modules.online.OnlineModule` arguments (reward_funcs, rollout,
            steps_per_generation, num_iterations, max_completion_length, sampling settings, ref_model, ...) and the
            :class:`~lightning_llm.modules.base.LLMModule` ones.
    """

    #: the loss's sequence ratio is always to the policy of generation time, and the KL penalty reads it too
    always_needs_old_logps = True

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        beta: float = 0.05,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        normalize_advantages: bool = False,
        reward_clip_range: Sequence[float] | None = None,
        num_generations: int = 2,
        learning_rate: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, tokenizer, beta=beta, num_generations=num_generations, learning_rate=learning_rate,
                         **kwargs)
        if epsilon < 0 or (epsilon_high is not None and epsilon_high < 0):
            raise ValueError(f"epsilon and epsilon_high must be >= 0, got {epsilon} and {epsilon_high}")
        if reward_clip_range is not None:
            if len(reward_clip_range) != 2 or not reward_clip_range[0] <= reward_clip_range[1]:
                raise ValueError(f"reward_clip_range must be [min, max] with min <= max, got {reward_clip_range!r}")
            reward_clip_range = [float(reward_clip_range[0]), float(reward_clip_range[1])]
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.normalize_advantages = normalize_advantages
        self.reward_clip_range = reward_clip_range

    def compute_advantages(self, rewards_per_func: Tensor, rollout: RolloutBatch, num_generations: int) -> Tensor:
        sequence_kl = None
        if self.beta != 0:
            mask = rollout.completion_mask
            local_kl = rloo_sequence_kl(rollout.old_per_token_logps, rollout.ref_per_token_logps, mask)
            sequence_kl = self._gather_rows(local_kl)
            # TRL's kl: the token mean of the log-ratio over every process's completions
            tokens = self._sum_over_processes(mask.sum().float())
            self._record_value("kl", self._sum_over_processes(local_kl.sum()) / tokens.clamp(min=1.0))
        out = rloo_advantages(
            self.weighted_rewards(rewards_per_func), num_generations, normalize_advantages=self.normalize_advantages,
            reward_clip_range=self.reward_clip_range, beta=self.beta, sequence_kl=sequence_kl,
        )
        self.record_reward_metrics(rewards_per_func, out.is_std_zero)
        return out.advantages

    def compute_loss(self, rollout: RolloutBatch) -> Tensor:
        per_token_logps, entropies = self.completion_token_logps(self.model, rollout, return_entropy=True)
        mask = rollout.completion_mask
        logps = rloo_sequence_logps(per_token_logps, mask)
        old_logps = rloo_sequence_logps(rollout.old_per_token_logps, mask)
        out = rloo_loss(logps, old_logps, rollout.advantages, epsilon_low=self.epsilon_low,
                        epsilon_high=self.epsilon_high)
        self.record_policy_metrics(rloo_metrics(out, entropies, mask))
        return out.loss
