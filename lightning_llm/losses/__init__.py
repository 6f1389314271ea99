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
from .kto import KTO_LOSSES, KTOLossOutput, KTOWeightRanges, kto_kl_estimate, kto_loss, kto_weight_ranges
from .orpo import ORPOLossOutput, log1mexp, orpo_loss
from .prm import PRMLossOutput, prm_loss
from .reward import RewardLossOutput, reward_loss
from .sft import SFT_LOSSES, SFTLoss, sft_loss

__all__ = [
    "CPO_AVERAGE_LOGPS_LOSS_TYPES",
    "CPO_LOSSES",
    "DPO_LOSSES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_SCORES",
    "KTO_LOSSES",
    "BCOLossOutput",
    "CPOLossOutput",
    "DPOLossOutput",
    "DPOTerms",
    "KTOLossOutput",
    "KTOWeightRanges",
    "ORPOLossOutput",
    "PRMLossOutput",
    "RewardLossOutput",
    "SFTLoss",
    "SFT_LOSSES",
    "alphapo_rewards",
    "bco_loss",
    "bco_rewards",
    "bco_udm_weights",
    "cpo_loss",
    "dpo_loss",
    "dpo_sft_loss",
    "kto_kl_estimate",
    "kto_loss",
    "kto_weight_ranges",
    "ld_dpo_logps",
    "log1mexp",
    "orpo_loss",
    "prm_loss",
    "reward_loss",
    "sft_loss",
    "wpo_weights",
]
