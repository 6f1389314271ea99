"""TRL-style trainers for people migrating: ``XTrainer(model, args=XConfig(...), train_dataset=...).train()``.

One import line serves a TRL script: the trainers and configs, and the project's callbacks and judges::

    from lightning_llm.trainers import DPOConfig, DPOTrainer, BEMACallback, HfPairwiseJudge

Each trainer is a thin layer over the algorithm's Lightning module and data module and a ``lightning.Trainer``
(``trainer.module``, ``trainer.datamodule``, ``trainer.trainer``): the numbers are those of the Lightning path.
Configs carry TRL 1.16's field names and defaults (:mod:`lightning_llm.trainers.config`). Imports are lazy.
"""

from __future__ import annotations

from lightning_llm._lazy import lazy_exports

_ALGORITHMS = ("SFT", "Reward", "DPO", "ORPO", "CPO", "KTO", "BCO", "PRM", "GRPO", "RLOO", "PPO", "OnlineDPO",
               "XPO", "NashMD")

_EXPORTS: dict[str, str] = {
    **{f"{name}Trainer": "lightning_llm.trainers.algorithms" for name in _ALGORITHMS},
    **{f"{name}Config": "lightning_llm.trainers.config" for name in _ALGORITHMS},
    "TrainingConfig": "lightning_llm.trainers.config",
    "BaseTrainer": "lightning_llm.trainers.base",
    "TrainerState": "lightning_llm.trainers.base",
    # callbacks
    "BEMACallback": "lightning_llm.callbacks.bema",
    "SyncRefModelCallback": "lightning_llm.callbacks.sync_ref_model",
    "WinRateCallback": "lightning_llm.callbacks.win_rate",
    "LogCompletionsCallback": "lightning_llm.callbacks.log_completions",
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
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
