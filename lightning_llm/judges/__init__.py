"""Judges: pairwise, binary and rank contracts (TRL's signatures), and local-model and API-backed judges."""

from lightning_llm.judges.all_true import AllTrueJudge
from lightning_llm.judges.base import (
    DEFAULT_PAIRWISE_SYSTEM_PROMPT,
    BaseBinaryJudge,
    BaseJudge,
    BasePairwiseJudge,
    BaseRankJudge,
)
from lightning_llm.judges.hf_pairwise import HfPairwiseJudge
from lightning_llm.judges.openai_pairwise import OpenAIPairwiseJudge
from lightning_llm.judges.pair_rm import PairRMJudge

__all__ = [
    "DEFAULT_PAIRWISE_SYSTEM_PROMPT", "AllTrueJudge", "BaseBinaryJudge", "BaseJudge", "BasePairwiseJudge",
    "BaseRankJudge", "HfPairwiseJudge", "OpenAIPairwiseJudge", "PairRMJudge",
]
