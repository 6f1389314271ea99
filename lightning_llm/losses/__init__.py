"""Pure loss functions, one module per algorithm family.

Each loss is a stateless function of per-sequence (or per-token) tensors and hyperparameters; no model, tokenizer or
Lightning code lives here. Importing this package imports torch.
"""

from __future__ import annotations

from .bco import BCOLossOutput, bco_loss, bco_rewards, bco_udm_weights
from .cpo import CPO_AVERAGE_LOGPS_LOSS_TYPES, CPO_LOSSES, CPOLossOutput, alphapo_rewards, cpo_loss
from .dpo import (
    DPO_LOSSES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_SCORES,
    DPOLossOutput,
    DPOTerms,
    dpo_loss,
    dpo_sft_loss,
    ld_dpo_logps,
    wpo_weights,
)
from .grpo import (
    GRPO_AGGREGATIONS,
    GRPO_CLIPPED_LOSS_TYPES,
    GRPO_LOSSES,
    GRPO_TOKEN_SUM_LOSS_TYPES,
    GRPOAdvantages,
    GRPOLossOutput,
    GRPOTerms,
    PolicyGradientMetrics,
    adaptive_entropy_coef,
    grpo_advantages,
    grpo_loss,
    grpo_metrics,
    high_entropy_mask,
    k3_kl,
    nanstd,
    off_policy_mask,
    vespo_gamma_weights,
    weighted_rewards,
)
from .kto import KTO_LOSSES, KTOLossOutput, KTOWeightRanges, kto_kl_estimate, kto_loss, kto_weight_ranges
from .orpo import ORPOLossOutput, log1mexp, orpo_loss
from .prm import PRMLossOutput, prm_loss
from .reward import RewardLossOutput, reward_loss
from .rloo import (
    RLOOAdvantages,
    RLOOLossOutput,
    rloo_advantages,
    rloo_loss,
    rloo_metrics,
    rloo_sequence_kl,
    rloo_sequence_logps,
)
from .sft import SFT_LOSSES, SFTLoss, sft_loss

__all__ = [
    "CPO_AVERAGE_LOGPS_LOSS_TYPES",
    "CPO_LOSSES",
    "DPO_LOSSES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_SCORES",
    "GRPO_AGGREGATIONS",
    "GRPO_CLIPPED_LOSS_TYPES",
    "GRPO_LOSSES",
    "GRPO_TOKEN_SUM_LOSS_TYPES",
    "KTO_LOSSES",
    "BCOLossOutput",
    "CPOLossOutput",
    "DPOLossOutput",
    "DPOTerms",
    "GRPOAdvantages",
    "GRPOLossOutput",
    "GRPOTerms",
    "KTOLossOutput",
    "KTOWeightRanges",
    "ORPOLossOutput",
    "PRMLossOutput",
    "PolicyGradientMetrics",
    "RLOOAdvantages",
    "RLOOLossOutput",
    "RewardLossOutput",
    "SFTLoss",
    "SFT_LOSSES",
    "adaptive_entropy_coef",
    "alphapo_rewards",
    "bco_loss",
    "bco_rewards",
    "bco_udm_weights",
    "cpo_loss",
    "dpo_loss",
    "dpo_sft_loss",
    "grpo_advantages",
    "grpo_loss",
    "grpo_metrics",
    "high_entropy_mask",
    "k3_kl",
    "kto_kl_estimate",
    "kto_loss",
    "kto_weight_ranges",
    "ld_dpo_logps",
    "log1mexp",
    "nanstd",
    "off_policy_mask",
    "orpo_loss",
    "prm_loss",
    "reward_loss",
    "rloo_advantages",
    "rloo_loss",
    "rloo_metrics",
    "rloo_sequence_kl",
    "rloo_sequence_logps",
    "sft_loss",
    "vespo_gamma_weights",
    "weighted_rewards",
    "wpo_weights",
]
