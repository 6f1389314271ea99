"""Reward sources for the online modules (GRPO, RLOO, ...): reward functions with TRL 1.16's calling convention,
reward models, and binary judges, scored together by :func:`compute_rewards`.

Typical use in an online module::

    sources = [resolve_reward_source(spec, device=self.device) for spec in reward_funcs]   # once
    log = RewardLog()
    rewards = compute_rewards(                                                             # each generation
        sources, prompts=prompts, completions=texts, completion_ids=ids, columns=columns_from_rows(rows),
        trainer_state=RewardState.from_trainer(self.trainer), log_metric=log.log_metric, log_extra=log.log_extra,
    )                                                                                      # [N, len(sources)]
    metrics = reward_metrics(sources, rewards)                                             # rewards/<name>/mean
"""

from lightning_llm.rewards.accuracy import accuracy_reward
from lightning_llm.rewards.compute import (
    columns_from_rows,
    compute_rewards,
    reward_metrics,
    reward_names,
    shape_completions,
)
from lightning_llm.rewards.contains import ContainsReward, make_contains_reward
from lightning_llm.rewards.format import format_reward, think_format_reward
from lightning_llm.rewards.penalties import (
    RepetitionPenalty,
    SoftOverlongPunishment,
    get_repetition_penalty_reward,
    get_soft_overlong_punishment,
)
from lightning_llm.rewards.sources import (
    FunctionReward,
    JudgeReward,
    RewardBatch,
    RewardError,
    RewardModelReward,
    RewardSource,
    resolve_reward_source,
)
from lightning_llm.rewards.state import RewardLog, RewardState

__all__ = [
    "ContainsReward", "FunctionReward", "JudgeReward", "RepetitionPenalty", "RewardBatch", "RewardError", "RewardLog",
    "RewardModelReward", "RewardSource", "RewardState", "SoftOverlongPunishment", "accuracy_reward",
    "columns_from_rows", "compute_rewards", "format_reward", "get_repetition_penalty_reward",
    "get_soft_overlong_punishment", "make_contains_reward", "resolve_reward_source", "reward_metrics", "reward_names",
    "shape_completions", "think_format_reward",
]
