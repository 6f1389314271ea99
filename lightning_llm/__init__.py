"""lightning_llm: LLM post-training algorithms as PyTorch Lightning modules.

Everything public is importable from the top level, lazily (PEP 562): ``import lightning_llm`` costs nothing and
does not import torch, transformers or lightning; ``lightning_llm.SFTModule`` imports what it needs on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_llm._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # modules
    "LLMModule": "lightning_llm.modules.base",
    "SFTModule": "lightning_llm.modules.sft",
    "RewardModule": "lightning_llm.modules.reward",
    "PRMModule": "lightning_llm.modules.prm",
    "PreferenceModule": "lightning_llm.modules.preference",
    "DPOModule": "lightning_llm.modules.dpo",
    "ORPOModule": "lightning_llm.modules.orpo",
    "CPOModule": "lightning_llm.modules.cpo",
    "KTOModule": "lightning_llm.modules.kto",
    "BCOModule": "lightning_llm.modules.bco",
    "OnlineModule": "lightning_llm.modules.online",
    "GRPOModule": "lightning_llm.modules.grpo",
    "RLOOModule": "lightning_llm.modules.rloo",
    "OnlineDPOModule": "lightning_llm.modules.online_dpo",
    "XPOModule": "lightning_llm.modules.xpo",
    "PPOModule": "lightning_llm.modules.ppo",
    "NashMDModule": "lightning_llm.modules.nash_md",
    # data
    "SFTDataModule": "lightning_llm.data.sft",
    "PreferenceDataModule": "lightning_llm.data.preference",
    "UnpairedPreferenceDataModule": "lightning_llm.data.unpaired",
    "StepwiseDataModule": "lightning_llm.data.stepwise",
    "PromptDataModule": "lightning_llm.data.prompts",
    "GenerationSchedule": "lightning_llm.data.sampling",
    # models
    "load_model": "lightning_llm.models.loading",
    "load_tokenizer": "lightning_llm.models.loading",
    "tiny_model": "lightning_llm.models.presets",
    # ops
    "linear_logprobs": "lightning_llm.ops",
    "linear_token_loss": "lightning_llm.ops",
    # callbacks
    "BEMACallback": "lightning_llm.callbacks.bema",
    "SyncRefModelCallback": "lightning_llm.callbacks.sync_ref_model",
    "WinRateCallback": "lightning_llm.callbacks.win_rate",
    "LogCompletionsCallback": "lightning_llm.callbacks.log_completions",
    "JsonlPredictionWriter": "lightning_llm.callbacks.predictions",
    "MergeModelCallback": "lightning_llm.callbacks.merge_model",
    "RichProgressCallback": "lightning_llm.callbacks.rich_progress",
    "RunCheckpoint": "lightning_llm.callbacks.checkpoint",
    # judges
    "BaseJudge": "lightning_llm.judges.base",
    "BaseBinaryJudge": "lightning_llm.judges.base",
    "BasePairwiseJudge": "lightning_llm.judges.base",
    "BaseRankJudge": "lightning_llm.judges.base",
    "AllTrueJudge": "lightning_llm.judges.all_true",
    "HfPairwiseJudge": "lightning_llm.judges.hf_pairwise",
    "OpenAIPairwiseJudge": "lightning_llm.judges.openai_pairwise",
    "PairRMJudge": "lightning_llm.judges.pair_rm",
    # TRL-style trainers and configs (lightning_llm.trainers)
    **{f"{name}{kind}": f"lightning_llm.trainers.{module}"
       for name in ("SFT", "Reward", "DPO", "ORPO", "CPO", "KTO", "BCO", "PRM", "GRPO", "RLOO", "PPO", "OnlineDPO",
                    "XPO", "NashMD")
       for kind, module in (("Trainer", "algorithms"), ("Config", "config"))},
    # utils
    "RunningMoments": "lightning_llm.utils.running_moments",
    "compute_accuracy": "lightning_llm.utils.metrics",
    "disable_dropout_in_model": "lightning_llm.utils.model",
    "empty_cache": "lightning_llm.utils.memory",
    "peft_module_casting_to_bf16": "lightning_llm.utils.model",
    "get_model_param_count": "lightning_llm.utils.model",
    "freeze_model_layers": "lightning_llm.utils.model",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # static analysers see the real objects
    from lightning_llm.modules.sft import SFTModule  # noqa: F401
