"""The TRL-style trainers, one per algorithm: TRL's constructor shapes over this project's modules and data modules.

==================== =================== =================== ================================
trainer              config              module              data
==================== =================== =================== ================================
``SFTTrainer``       ``SFTConfig``       ``SFTModule``       ``SFTDataModule``
``RewardTrainer``    ``RewardConfig``    ``RewardModule``    ``PreferenceDataModule``
``DPOTrainer``       ``DPOConfig``       ``DPOModule``       ``PreferenceDataModule``
``ORPOTrainer``      ``ORPOConfig``      ``ORPOModule``      ``PreferenceDataModule``
``CPOTrainer``       ``CPOConfig``       ``CPOModule``       ``PreferenceDataModule``
``KTOTrainer``       ``KTOConfig``       ``KTOModule``       ``UnpairedPreferenceDataModule``
``BCOTrainer``       ``BCOConfig``       ``BCOModule``       ``UnpairedPreferenceDataModule``
``PRMTrainer``       ``PRMConfig``       ``PRMModule``       ``StepwiseDataModule``
``GRPOTrainer``      ``GRPOConfig``      ``GRPOModule``      ``PromptDataModule``
``RLOOTrainer``      ``RLOOConfig``      ``RLOOModule``      ``PromptDataModule``
``OnlineDPOTrainer`` ``OnlineDPOConfig`` ``OnlineDPOModule`` ``PromptDataModule``
``XPOTrainer``       ``XPOConfig``       ``XPOModule``       ``PromptDataModule``
``NashMDTrainer``    ``NashMDConfig``    ``NashMDModule``    ``PromptDataModule``
``PPOTrainer``       ``PPOConfig``       ``PPOModule``       ``PromptDataModule``
==================== =================== =================== ================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning_llm.trainers.base import BaseTrainer, process_layout
from lightning_llm.trainers.config import (
    DATA,
    MODULE,
    TRAINER,
    BCOConfig,
    CPOConfig,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    NashMDConfig,
    OnlineDPOConfig,
    ORPOConfig,
    PPOConfig,
    PRMConfig,
    RewardConfig,
    RLOOConfig,
    SFTConfig,
    TrainingConfig,
    XPOConfig,
)


class SFTTrainer(BaseTrainer):
    """Supervised fine-tuning, TRL's ``SFTTrainer(model, args=SFTConfig(...), train_dataset=...)``: rows of text,
    messages or prompt/completion (see :class:`~lightning_llm.SFTDataModule`); the loss of
    :class:`~lightning_llm.SFTModule`."""

    config_class = SFTConfig
    module_path = "lightning_llm.modules.sft.SFTModule"
    datamodule_path = "lightning_llm.data.sft.SFTDataModule"
    algorithm = "SFT"


class RewardTrainer(BaseTrainer):
    """Reward modelling, TRL's ``RewardTrainer``: preference rows (``chosen``/``rejected``, optionally ``prompt`` and
    ``margin``); the model becomes a one-label sequence classifier (:class:`~lightning_llm.RewardModule`)."""

    config_class = RewardConfig
    module_path = "lightning_llm.modules.reward.RewardModule"
    datamodule_path = "lightning_llm.data.preference.PreferenceDataModule"
    algorithm = "Reward"


class ORPOTrainer(BaseTrainer):
    """ORPO, TRL's experimental ``ORPOTrainer`` (no reference model): :class:`~lightning_llm.ORPOModule`."""

    config_class = ORPOConfig
    module_path = "lightning_llm.modules.orpo.ORPOModule"
    datamodule_path = "lightning_llm.data.preference.PreferenceDataModule"
    algorithm = "ORPO"


class CPOTrainer(BaseTrainer):
    """CPO and SimPO, TRL's experimental ``CPOTrainer`` (no reference model): :class:`~lightning_llm.CPOModule`."""

    config_class = CPOConfig
    module_path = "lightning_llm.modules.cpo.CPOModule"
    datamodule_path = "lightning_llm.data.preference.PreferenceDataModule"
    algorithm = "CPO"


class PRMTrainer(BaseTrainer):
    """Process reward modelling, TRL 0.19's ``PRMTrainer``: stepwise rows (``prompt``, ``completions``, ``labels``);
    :class:`~lightning_llm.PRMModule`."""

    config_class = PRMConfig
    module_path = "lightning_llm.modules.prm.PRMModule"
    datamodule_path = "lightning_llm.data.stepwise.StepwiseDataModule"
    algorithm = "PRM"


class _ReferenceTrainer(BaseTrainer):
    """The trainers whose second positional argument is the reference model (default: a frozen copy of the
    policy)."""

    def __init__(self, model: Any, ref_model: Any = None, args: TrainingConfig | None = None, *,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 callbacks: Any = None, peft_config: Any = None, **unsupported: Any) -> None:
        self._ref_model = ref_model
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, peft_config=peft_config,
                         **unsupported)

    def module_arguments(self) -> dict[str, Any]:
        return {"ref_model": self._ref_model}

    @property
    def ref_model(self) -> Any:
        """The reference model (None until built, or when a PEFT policy's base serves as the reference)."""
        return getattr(self.module, "ref_model", None)


class DPOTrainer(_ReferenceTrainer):
    """DPO and its fifteen losses, TRL's ``DPOTrainer(model, ref_model=None, args=DPOConfig(...), ...)``:
    preference rows; :class:`~lightning_llm.DPOModule`."""

    config_class = DPOConfig
    module_path = "lightning_llm.modules.dpo.DPOModule"
    datamodule_path = "lightning_llm.data.preference.PreferenceDataModule"
    algorithm = "DPO"


class KTOTrainer(_ReferenceTrainer):
    """KTO, TRL's ``KTOTrainer``: unpaired rows (``prompt``, ``completion``, ``label``);
    :class:`~lightning_llm.KTOModule`."""

    config_class = KTOConfig
    module_path = "lightning_llm.modules.kto.KTOModule"
    datamodule_path = "lightning_llm.data.unpaired.UnpairedPreferenceDataModule"
    algorithm = "KTO"


class BCOTrainer(_ReferenceTrainer):
    """BCO, TRL 0.19's ``BCOTrainer``: unpaired rows; :class:`~lightning_llm.BCOModule`.

    ``embedding_func`` with ``embedding_tokenizer`` is TRL's pair (``embedding_func(input_ids, attention_mask) ->
    [N, D]`` on prompts tokenized by ``embedding_tokenizer``); without a tokenizer ``embedding_func`` takes the
    prompts' texts, as :class:`~lightning_llm.BCOModule`'s does.
    """

    config_class = BCOConfig
    module_path = "lightning_llm.modules.bco.BCOModule"
    datamodule_path = "lightning_llm.data.unpaired.UnpairedPreferenceDataModule"
    algorithm = "BCO"

    def __init__(self, model: Any, ref_model: Any = None, args: BCOConfig | None = None, *,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 callbacks: Any = None, peft_config: Any = None, embedding_func: Callable | None = None,
                 embedding_tokenizer: Any = None, **unsupported: Any) -> None:
        if embedding_tokenizer is not None and embedding_func is None:
            raise ValueError("BCOTrainer: embedding_tokenizer was given without embedding_func")
        if embedding_tokenizer is not None:
            embedding_func = _texts_to_ids(embedding_func, embedding_tokenizer)
        self._embedding_func = embedding_func
        super().__init__(model, ref_model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, peft_config=peft_config,
                         **unsupported)

    def module_arguments(self) -> dict[str, Any]:
        return {**super().module_arguments(), "embedding_func": self._embedding_func}


def _texts_to_ids(embedding_func: Callable, tokenizer: Any) -> Callable:
    """TRL's ``embedding_func(input_ids, attention_mask)`` as a function of prompt texts."""
    import torch

    def embed(prompts: Sequence[str]) -> torch.Tensor:
        encoded = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        return embedding_func(encoded["input_ids"], encoded["attention_mask"])

    return embed


class _OnlineTrainer(BaseTrainer):
    """The trainers that generate while training: TRL's ``(model, reward_funcs, args, train_dataset, eval_dataset,
    processing_class, reward_processing_classes, callbacks, optimizers, peft_config, rollout_func)``."""

    def __init__(self, model: Any, reward_funcs: Any = None, args: TrainingConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 reward_processing_classes: Any = None, callbacks: Any = None, optimizers: Any = (None, None),
                 peft_config: Any = None, *, rollout_func: Callable | None = None, ref_model: Any = None,
                 **unsupported: Any) -> None:
        arguments: dict[str, Any] = {"reward_funcs": reward_funcs, "ref_model": ref_model}
        if reward_processing_classes is not None:
            classes = reward_processing_classes
            arguments["reward_tokenizers"] = list(classes) if isinstance(classes, (list, tuple)) else [classes]
        if rollout_func is not None:
            from lightning_llm.rollout.function import FunctionRollouts

            arguments["rollout"] = FunctionRollouts(rollout_func, owner=self)
        self.rollout_func = rollout_func
        steps = self._steps_per_generation(args)
        if steps is not None:
            arguments["steps_per_generation"] = steps
        self._arguments = arguments
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, peft_config=peft_config,
                         optimizers=optimizers, **unsupported)

    def module_arguments(self) -> dict[str, Any]:
        return dict(self._arguments)

    @staticmethod
    def _steps_per_generation(args: Any) -> int | None:
        """TRL's ``generation_batch_size`` (completions per round over all processes) as ``steps_per_generation``."""
        if args is None or getattr(args, "generation_batch_size", None) is None:
            return None
        from lightning_llm.trainers.base import process_layout

        if args.steps_per_generation is not None:
            raise ValueError(f"{type(args).__name__}: give generation_batch_size or steps_per_generation, not both")
        devices, nodes = process_layout()
        per_step = args.per_device_train_batch_size * devices * nodes
        if args.generation_batch_size % per_step:
            raise ValueError(f"{type(args).__name__}.generation_batch_size={args.generation_batch_size} must be a "
                             f"multiple of per_device_train_batch_size x processes = {per_step}")
        return args.generation_batch_size // per_step

    @property
    def reward_funcs(self) -> list[Any]:
        """The reward sources, resolved (functions, reward models)."""
        self.module._resolve_rewards()
        return list(self.module.reward_sources)


class GRPOTrainer(_OnlineTrainer):
    """GRPO, TRL's ``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=...)``: prompt-only rows
    (their other columns reach the reward functions); :class:`~lightning_llm.GRPOModule`. ``rollout_func`` is TRL's
    hook: ``rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", ...}`` replaces the
    generation (see :class:`~lightning_llm.rollout.FunctionRollouts`)."""

    config_class = GRPOConfig
    module_path = "lightning_llm.modules.grpo.GRPOModule"
    datamodule_path = "lightning_llm.data.prompts.PromptDataModule"
    algorithm = "GRPO"


class RLOOTrainer(_OnlineTrainer):
    """RLOO, TRL's ``RLOOTrainer``: prompt-only rows; :class:`~lightning_llm.RLOOModule`; ``rollout_func`` as for
    :class:`GRPOTrainer`."""

    config_class = RLOOConfig
    module_path = "lightning_llm.modules.rloo.RLOOModule"
    datamodule_path = "lightning_llm.data.prompts.PromptDataModule"
    algorithm = "RLOO"


class OnlineDPOTrainer(_OnlineTrainer):
    """Online DPO, TRL 1.16's experimental ``OnlineDPOTrainer(model, ref_model, reward_funcs, args=OnlineDPOConfig(...),
    train_dataset=...)``: prompt-only rows, each completed twice; the reward sources, or a pairwise ``judge`` (TRL 1.0's
    argument, dropped by TRL 1.16), pick the chosen completion; :class:`~lightning_llm.OnlineDPOModule`.
    ``per_device_train_batch_size`` counts prompts, as TRL's does."""

    config_class = OnlineDPOConfig
    module_path = "lightning_llm.modules.online_dpo.OnlineDPOModule"
    datamodule_path = "lightning_llm.data.prompts.PromptDataModule"
    algorithm = "OnlineDPO"

    def __init__(self, model: Any, ref_model: Any = None, reward_funcs: Any = None, args: TrainingConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 reward_processing_classes: Any = None, peft_config: Any = None, callbacks: Any = None,
                 optimizers: Any = (None, None), *, judge: Any = None, **unsupported: Any) -> None:
        self.judge = judge
        super().__init__(model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                         optimizers=optimizers, peft_config=peft_config, ref_model=ref_model, **unsupported)

    def module_arguments(self) -> dict[str, Any]:
        arguments = super().module_arguments()
        if self.judge is not None:
            arguments["judge"] = self.judge
        return arguments

    def routed(self, target: str) -> dict[str, Any]:
        """As :meth:`BaseTrainer.routed`, with the data module's batch sizes in completions (two per prompt)."""
        out = super().routed(target)
        for name in ("batch_size", "val_batch_size"):
            if name in out and out[name] is not None:
                out[name] = 2 * out[name]
        return out


class XPOTrainer(OnlineDPOTrainer):
    """XPO, TRL 1.13's experimental ``XPOTrainer(model, ref_model, reward_funcs, args=XPOConfig(...),
    train_dataset=...)``: prompt-only rows, one completion from the policy and one from the reference each;
    :class:`~lightning_llm.XPOModule`. Any reward sources or a pairwise ``judge`` (TRL 1.13 took one reward model)."""

    config_class = XPOConfig
    module_path = "lightning_llm.modules.xpo.XPOModule"
    algorithm = "XPO"


class NashMDTrainer(OnlineDPOTrainer):
    """Nash-MD, TRL 1.13's experimental ``NashMDTrainer(model, ref_model, reward_funcs, args=NashMDConfig(...),
    train_dataset=...)``: prompt-only rows, one completion from the policy and one from the geometric mixture of
    policy and reference each; the reward sources' scores, or a pairwise ``judge``'s probability, give the preference;
    :class:`~lightning_llm.NashMDModule`."""

    config_class = NashMDConfig
    module_path = "lightning_llm.modules.nash_md.NashMDModule"
    algorithm = "NashMD"


class PPOTrainer(BaseTrainer):
    """PPO, TRL 1.12's experimental ``PPOTrainer(args, processing_class, model, ref_model, reward_model,
    train_dataset, value_model=None, ...)`` (the last TRL that had it), keyword arguments as TRL's; prompt-only rows;
    :class:`~lightning_llm.PPOModule`.

    Everything but ``model`` and a reward has a default: the tokenizer is the model's, the reference a frozen copy of
    the policy, the value model a copy of the reward model (a one-label sequence classifier: a hub id, a directory such
    as a ``RewardTrainer``'s ``output_dir/final``, or a model object). ``reward_funcs`` (reward functions on the decoded
    completions) may replace ``reward_model``, and ``value_head=True`` puts the value head on the policy's backbone;
    both are our additions. No ``train_dataset`` is needed for :meth:`step`, one rollout and update on given prompts;
    ``train()`` needs one. At the end of ``train()`` the value model is written beside the policy
    (``output_dir/final/value_model``).
    """

    config_class = PPOConfig
    module_path = "lightning_llm.modules.ppo.PPOModule"
    datamodule_path = "lightning_llm.data.prompts.PromptDataModule"
    algorithm = "PPO"

    def __init__(self, args: PPOConfig | None = None, processing_class: Any = None, model: Any = None,
                 ref_model: Any = None, reward_model: Any = None, train_dataset: Any = None, value_model: Any = None,
                 data_collator: Any = None, eval_dataset: Any = None, optimizers: Any = (None, None),
                 callbacks: Any = None, peft_config: Any = None, *, reward_funcs: Any = None, value_head: bool = False,
                 **unsupported: Any) -> None:
        import os

        if args is not None and not isinstance(args, PPOConfig) and isinstance(args, (str, os.PathLike)):
            raise TypeError("PPOTrainer's first argument is args (TRL 1.12's order: args, processing_class, model, "
                            "ref_model, reward_model, train_dataset, ...): pass the policy as model=")
        if model is None:
            raise TypeError("PPOTrainer needs model=: the policy (a hub id, a local directory, a tiny preset or a "
                            "PreTrainedModel)")
        arguments: dict[str, Any] = {"ref_model": ref_model, "reward_model": reward_model, "value_model": value_model}
        if reward_funcs is not None:
            arguments["reward_funcs"] = reward_funcs
        if value_head:
            arguments["value_head"] = True
        self._arguments = arguments
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, peft_config=peft_config,
                         data_collator=data_collator, optimizers=optimizers, **unsupported)

    def module_arguments(self) -> dict[str, Any]:
        return dict(self._arguments)

    def routed(self, target: str) -> dict[str, Any]:
        """As :meth:`BaseTrainer.routed`, with TRL 1.12's batch arithmetic: a rollout of ``per_device_train_batch_size
        · gradient_accumulation_steps`` prompts, ``gradient_accumulation_steps / num_mini_batches`` micro-batches per
        mini-batch, and ``total_episodes`` as the Trainer's ``max_steps``."""
        out = super().routed(target)
        args = self.args
        if target == DATA:
            out["batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps
        elif target == MODULE:
            out["gradient_accumulation_steps"] = args.gradient_accumulation_steps // args.num_mini_batches
            out["max_grad_norm"] = args.max_grad_norm or None
        elif target == TRAINER and args.total_episodes is not None:
            out["max_steps"] = self.steps_of_episodes(args.total_episodes)
            out["max_epochs"] = -1
        return out

    def steps_of_episodes(self, episodes: int) -> int:
        """Optimizer steps of a run over ``episodes`` prompts (all processes): whole rollouts, as TRL's
        ``num_total_batches``, each ``num_ppo_epochs · num_mini_batches`` steps."""
        import math

        devices, nodes = process_layout()
        args = self.args
        rollout = args.per_device_train_batch_size * args.gradient_accumulation_steps * devices * nodes
        return math.ceil(episodes / rollout) * args.num_ppo_epochs * args.num_mini_batches

    def _gradient_clip_val(self) -> float | None:
        return None  # PPOModule optimizes by hand and clips to max_grad_norm itself

    def train(self, resume_from_checkpoint: str | bool | None = None) -> Any:
        if self.datamodule.train_data is None:
            raise ValueError("PPOTrainer.train() needs a train_dataset (prompt-only rows); without one, run "
                             "trainer.step(queries) on prompts of your own")
        return super().train(resume_from_checkpoint)

    def step(self, queries: Sequence[Any], rows: Sequence[dict] | None = None) -> dict[str, float]:
        """One rollout and PPO update on ``queries`` (prompt strings or conversations), outside ``train()``; returns
        the rollout's stats under TRL 1.12's metric names (``objective/kl``, ``objective/scores``,
        ``policy/approxkl_avg``, ``loss/policy_avg``, ``loss/value_avg``, ...) and ``learning_rate``.

        Successive calls continue one run, the one of the last ``train()`` when there was one: each call is one more
        training step of the same ``lightning.Trainer`` (:meth:`PPOModule.step` with ``trainer=``), so
        ``state.global_step`` goes on, the callbacks (``callbacks=``, e.g. ``BEMACallback``) keep their state and run
        at each call, the loggers and checkpoints of the config take part, and the precision is ``train()``'s. The
        optimizer and learning-rate schedule are built at the first call and kept (the schedule spans
        ``total_episodes`` prompts, else the learning rate stays constant); after ``train()`` that is a new optimizer
        (the training schedule has run its course by then). ``rows``: the prompts' other columns, for reward
        functions that read them.
        """
        trainer = self._run_trainer if self._run_trainer is not None else self.lightning_trainer(fitting=True)
        self._run_trainer = trainer
        stats = self.module.step(queries, rows, trainer=trainer)
        self.state.global_step = trainer.global_step
        return stats

    @property
    def ref_model(self) -> Any:
        """The frozen reference model (None until built)."""
        return getattr(self.module, "ref_model", None)

    @property
    def reward_model(self) -> Any:
        """The frozen reward model (None until built, or with reward functions)."""
        return self.module.reward_model

    @property
    def value_model(self) -> Any:
        """The value model (None until built, or under ``value_head=True``)."""
        return self.module.value_model
