"""TRL-style configs: ``SFTConfig``, ``DPOConfig``, ... with TRL 1.16's field names and defaults.

Every field says where it goes (its ``target``): the algorithm's module (``module``), its data module (``data``), the
``lightning.Trainer`` (``trainer``), or the TRL-style trainer itself (``facade``), which turns it into Lightning's
terms (checkpointing, evaluation schedule, precision, loggers, optimizer, ...). A TRL field with no counterpart here
is accepted only at TRL's default value (where it asks for nothing) and refused by name otherwise; an unknown name is
refused with the nearest known names. Older spellings are accepted as aliases (``max_seq_length`` for
``max_length``).

Defaults are TRL's, not the modules' own: ``gradient_checkpointing=True``, ``lr_scheduler_type="linear"``,
``logging_steps=10``, ``num_train_epochs=3``, ``save_steps=500``. Two deliberate differences: ``bf16=None`` means
bf16 mixed precision only where the accelerator has it (a CUDA device with bf16), not on CPU; and the run's metrics are
always written to ``output_dir/metrics.csv`` (``report_to`` adds TensorBoard or W&B).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from lightning_llm.trainers._trl_fields import TRAINING_ARGUMENTS, TRL_CONFIGS

#: field targets
MODULE, DATA, TRAINER, FACADE = "module", "data", "trainer", "facade"
#: older TRL spellings -> the field they set
ALIASES = {"max_seq_length": "max_length", "clip_range": "cliprange"}
#: why some TRL fields have no counterpart, and what to do instead
HINTS = {
    "push_to_hub": "save with trainer.save_model(dir) and upload the directory with huggingface_hub",
    "hub_model_id": "save with trainer.save_model(dir) and upload the directory with huggingface_hub",
    "deepspeed": "choose the strategy with trainer_kwargs={'strategy': 'deepspeed_stage_3'} (or a DeepSpeedStrategy)",
    "fsdp": "choose the strategy with trainer_kwargs={'strategy': 'fsdp'} (or an FSDPStrategy)",
    "use_vllm": "rollouts come from the module's rollout engines ('hf', 'fast'; module_kwargs={'rollout': ...}) or "
                "from rollout_func",
    "use_liger_kernel": "the log-prob and loss kernels of lightning_llm run by default on CUDA",
    "torch_compile": "compile through module_kwargs or the model itself",
    "eos_token": "set it on the tokenizer given as processing_class",
    "pad_token": "set it on the tokenizer given as processing_class",
    "load_best_model_at_end": "checkpoints are in output_dir; load the one you want with load_from_checkpoint",
    "logging_strategy": "metrics are logged every logging_steps steps",
    "formatting_func": "turn the rows into a supported format (text, messages, prompt/completion) first",
    "reward_model_path": "pass the reward model (a hub id or a directory) to the trainer: reward_funcs= (GRPO, RLOO, "
                         "Online DPO) or reward_model= (PPO)",
    "sft_model_path": "pass the policy (a hub id or a directory) as model=",
    "num_sample_generations": "log sample completions with LogCompletionsCallback",
}
EVAL_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch")
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw", "sgd")
REPORTERS = ("none", "all", "tensorboard", "wandb", "csv")


def _field(target: str, default: Any = None, *, name: str | None = None, factory: Any = None) -> Any:
    """A config field going to ``target`` (its parameter there: ``name``, default the field's own name)."""
    metadata = {"target": target, "name": name}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def module(default: Any = None, **kwargs: Any) -> Any:
    return _field(MODULE, default, **kwargs)


def data(default: Any = None, **kwargs: Any) -> Any:
    return _field(DATA, default, **kwargs)


def trainer(default: Any = None, **kwargs: Any) -> Any:
    return _field(TRAINER, default, **kwargs)


def facade(default: Any = None, **kwargs: Any) -> Any:
    return _field(FACADE, default, **kwargs)


def target_of(config_field: dataclasses.Field) -> tuple[str, str]:
    """``(target, parameter name)`` of a config field."""
    return config_field.metadata["target"], config_field.metadata["name"] or config_field.name


def trl_defaults(config_cls: type) -> dict[str, Any]:
    """Every field of the TRL config that ``config_cls`` stands for, with TRL's default."""
    return {**TRAINING_ARGUMENTS, **TRL_CONFIGS.get(config_cls.trl_name, {})}


def trl_config(cls: type) -> type:
    """Make ``cls`` a dataclass whose constructor resolves aliases, accepts TRL-only fields at TRL's default and
    refuses them otherwise, and refuses unknown names with the nearest ones."""
    cls = dataclass(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **_resolve(type(self), kwargs))

    cls.__init__ = __init__
    return cls


def _resolve(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    ours = {f.name for f in dataclasses.fields(cls)}
    theirs = trl_defaults(cls)
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        name = ALIASES.get(key, key) if key not in ours else key
        if name in ours:
            if name != key and name in kwargs:
                raise ValueError(f"{cls.__name__}: {key} is another name of {name}; give only one of them")
            out[name] = value
        elif key in theirs:
            if value != theirs[key]:
                hint = HINTS.get(key, "lightning_llm has no counterpart for it")
                raise ValueError(f"{cls.__name__}({key}={value!r}): TRL's field {key!r} is not supported here "
                                 f"({hint}); leave it at TRL's default {theirs[key]!r}")
        else:
            near = difflib.get_close_matches(key, sorted(ours | set(theirs) | set(ALIASES)), n=3, cutoff=0.6)
            suggestion = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"{cls.__name__} has no field {key!r}{suggestion}")
    return out


@trl_config
class TrainingConfig:
    """The fields every TRL-style config shares (``transformers.TrainingArguments``'s, TRL's defaults).

    ``module_kwargs`` and ``trainer_kwargs`` are this project's additions: further arguments of the algorithm's module
    (e.g. ``{"logprob_impl": "chunked"}``) and of ``lightning.Trainer`` (e.g. ``{"strategy": "fsdp"}``).
    """

    trl_name = "TrainingArguments"

    #: where checkpoints (``checkpoint-<step>.ckpt``, ``last.ckpt``), ``metrics.csv`` and the final model (``final/``,
    #: Hugging Face format) go; default ``trainer_output``
    output_dir: str | None = facade(None)
    #: epochs over the training data (a whole number unless ``max_steps`` bounds the run)
    num_train_epochs: float = facade(3.0)
    #: optimizer steps of the run; -1 = ``num_train_epochs`` decides
    max_steps: int = trainer(-1)
    per_device_train_batch_size: int = data(8, name="batch_size")
    per_device_eval_batch_size: int = data(8, name="val_batch_size")
    gradient_accumulation_steps: int = trainer(1, name="accumulate_grad_batches")
    learning_rate: float = module(5e-5)
    #: a schedule of ``transformers.get_scheduler`` (``linear``, ``cosine``, ``constant``, ...)
    lr_scheduler_type: str = module("linear")
    lr_scheduler_kwargs: dict | None = module(None)
    #: fraction of the optimizer steps spent warming up (transformers < 5's field)
    warmup_ratio: float = module(0.0)
    #: warm-up steps; a float in (0, 1) is a fraction of the run (transformers 5)
    warmup_steps: float = facade(0)
    weight_decay: float = module(0.0)
    #: ``adamw_torch_fused``/``adamw_torch``/``adamw`` (AdamW, fused where the parameters allow) or ``sgd``
    optim: str = facade("adamw_torch_fused")
    adam_beta1: float = facade(0.9)
    adam_beta2: float = facade(0.999)
    adam_epsilon: float = facade(1e-8)
    #: gradient clipping by global norm; 0 = none
    max_grad_norm: float = facade(1.0)
    #: log (and average) metrics every this many optimizer steps
    logging_steps: int = trainer(10, name="log_every_n_steps")
    #: ``no``, ``steps`` (every ``eval_steps``) or ``epoch``
    eval_strategy: str = facade("no")
    #: default ``logging_steps``
    eval_steps: int | None = facade(None)
    #: ``no``, ``steps`` (every ``save_steps``, and ``last.ckpt`` at the end) or ``epoch``
    save_strategy: str = facade("steps")
    save_steps: int = facade(500)
    #: how many ``checkpoint-<step>.ckpt`` to keep (the newest); None = all
    save_total_limit: int | None = facade(None)
    #: bf16 mixed precision; None = where the accelerator has bf16 (CUDA)
    bf16: bool | None = facade(None)
    fp16: bool = facade(False)
    use_cpu: bool = facade(False)
    gradient_checkpointing: bool = module(True)
    seed: int = facade(42)
    #: the data order's seed; default ``seed``
    data_seed: int | None = facade(None)
    #: ``none``, ``tensorboard``, ``wandb``, ``all`` (those installed), or a list
    report_to: str | list = facade("none")
    #: None = a progress bar (the project's metrics table)
    disable_tqdm: bool | None = facade(None)
    dataloader_num_workers: int = data(0, name="num_workers")
    #: ``random`` or ``sequential`` (no shuffling)
    train_sampling_strategy: str = facade("random")
    #: a checkpoint to resume from when ``train()`` names none (True = the last one in ``output_dir``)
    resume_from_checkpoint: str | bool | None = facade(None)
    #: token-mean losses normalised over every micro-batch and process of an optimizer step
    average_tokens_across_devices: bool = module(True, name="average_tokens_across_steps")
    #: ``from_pretrained`` keywords for a model given by name (``dtype``, ``attn_implementation``, ``revision``...)
    model_init_kwargs: dict | None = facade(None)
    trust_remote_code: bool = module(False)
    dataset_num_proc: int | None = data(None, name="num_proc")
    #: the most tokens of an example
    max_length: int | None = data(1024)
    module_kwargs: dict | None = facade(None)
    trainer_kwargs: dict | None = facade(None)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not self.num_train_epochs > 0:
            raise ValueError(f"{name}.num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.max_steps <= 0 and float(self.num_train_epochs) != int(self.num_train_epochs):
            raise ValueError(f"{name}.num_train_epochs={self.num_train_epochs}: a fraction of an epoch is not "
                             "supported; give a whole number, or bound the run with max_steps")
        _check_choice(name, "eval_strategy", self.eval_strategy, EVAL_STRATEGIES)
        _check_choice(name, "save_strategy", self.save_strategy, SAVE_STRATEGIES)
        _check_choice(name, "optim", self.optim, OPTIMIZERS)
        _check_choice(name, "train_sampling_strategy", self.train_sampling_strategy, ("random", "sequential"))
        for reporter in self.reporters():
            _check_choice(name, "report_to", reporter, REPORTERS)
        for field_name in ("logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}.{field_name} must be a whole number of steps >= 1, got {value!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"{name}.save_total_limit must be >= 1 or None, got {self.save_total_limit}")
        warmup = self.warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0 or (
                isinstance(warmup, float) and warmup >= 1 and not warmup.is_integer()):
            raise ValueError(f"{name}.warmup_steps must be a whole number >= 0 or a fraction in (0, 1), got "
                             f"{warmup!r}")
        if warmup and self.warmup_ratio:
            raise ValueError(f"{name}: give warmup_steps or warmup_ratio, not both")
        if self.bf16 and self.fp16:
            raise ValueError(f"{name}: bf16 and fp16 cannot both be True")
        if not math.isfinite(self.max_grad_norm) or self.max_grad_norm < 0:
            raise ValueError(f"{name}.max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        for field_name in ("model_init_kwargs", "module_kwargs", "trainer_kwargs", "lr_scheduler_kwargs"):
            value = getattr(self, field_name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name}.{field_name} must be a dict or None, got {type(value).__name__}")

    def reporters(self) -> list[str]:
        """``report_to`` as a list of names (``none`` dropped)."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        return [n for n in names if n != "none"]

    def to_dict(self) -> dict[str, Any]:
        """The fields and their values (TRL's ``TrainingArguments.to_dict``)."""
        return dataclasses.asdict(self)


def _check_choice(config: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{config}.{name} must be one of {list(choices)}, got {value!r}")


# ------------------------------------------------------------------------------------------------ offline algorithms
@trl_config
class SFTConfig(TrainingConfig):
    """:class:`~lightning_llm.trainers.SFTTrainer`'s config: TRL 1.16's ``SFTConfig``."""

    trl_name = "SFTConfig"
    learning_rate: float = module(2e-5)
    #: a Jinja chat template (or a path to one) replacing the tokenizer's
    chat_template_path: str | None = module(None, name="chat_template")
    dataset_text_field: str = data("text")
    truncation_mode: str = data("keep_start")
    packing: bool = data(False)
    packing_strategy: str = data("bfd")
    padding_free: bool = data(False)
    #: ``auto``/None = no padding to a multiple
    pad_to_multiple_of: int | str | None = facade("auto")
    completion_only_loss: bool | None = data(None)
    assistant_only_loss: bool = data(False)
    #: ``nll`` or ``dft``
    loss_type: str = module("nll")


@trl_config
class RewardConfig(TrainingConfig):
    """:class:`~lightning_llm.trainers.RewardTrainer`'s config: TRL 1.16's ``RewardConfig``, plus ``loss_type`` and
    ``margin``."""

    trl_name = "RewardConfig"
    learning_rate: float = module(1e-4)
    chat_template_path: str | None = module(None, name="chat_template")
    disable_dropout: bool = module(True)
    pad_to_multiple_of: int | str | None = facade("auto")
    center_rewards_coefficient: float | None = module(None)
    #: ``ranking`` (Bradley-Terry)
    loss_type: str = module("ranking")
    #: margin asked of every pair whose row has no ``margin`` column
    margin: float | None = module(None)


@trl_config
class _PreferenceConfig(TrainingConfig):
    """Fields of the algorithms with a reference model (DPO, KTO, BCO)."""

    trl_name = ""
    learning_rate: float = module(1e-6)
    beta: float = module(0.1)
    disable_dropout: bool = module(True)
    precompute_ref_log_probs: bool = module(False)
    precompute_ref_batch_size: int | None = module(None)
    sync_ref_model: bool = module(False)
    ref_model_mixup_alpha: float = module(0.6)
    ref_model_sync_steps: int = module(512)


@trl_config
class DPOConfig(_PreferenceConfig):
    """:class:`~lightning_llm.trainers.DPOTrainer`'s config: TRL 1.16's ``DPOConfig``."""

    trl_name = "DPOConfig"
    #: one loss or a list of them (summed with ``loss_weights``)
    loss_type: str | list = module(factory=lambda: ["sigmoid"])
    loss_weights: list | None = module(None)
    label_smoothing: float = module(0.0)
    f_divergence_type: str = module("reverse_kl")
    f_alpha_divergence_coef: float = module(0.5)
    ld_alpha: float | None = module(None)
    use_weighting: bool = module(False)
    discopop_tau: float = module(0.05)
    truncation_mode: str = data("keep_start")
    padding_free: bool = data(False)
    pad_to_multiple_of: int | str | None = facade("auto")


@trl_config
class KTOConfig(_PreferenceConfig):
    """:class:`~lightning_llm.trainers.KTOTrainer`'s config: TRL 1.16's ``KTOConfig`` (sequential sampling by
    default, as TRL's)."""

    trl_name = "KTOConfig"
    train_sampling_strategy: str = facade("sequential")
    loss_type: str = module("kto")
    desirable_weight: float = module(1.0)
    undesirable_weight: float = module(1.0)
    pad_to_multiple_of: int | str | None = facade("auto")


@trl_config
class BCOConfig(_PreferenceConfig):
    """:class:`~lightning_llm.trainers.BCOTrainer`'s config: TRL 0.19's ``BCOConfig`` (BCO left TRL afterwards)."""

    trl_name = "BCOConfig"
    learning_rate: float = module(5e-7)
    truncation_mode: str = data("keep_end")
    prompt_sample_size: int = module(1024)
    min_density_ratio: float = module(0.5)
    max_density_ratio: float = module(10.0)


@trl_config
class ORPOConfig(TrainingConfig):
    """:class:`~lightning_llm.trainers.ORPOTrainer`'s config: TRL 1.16's experimental ``ORPOConfig``."""

    trl_name = "ORPOConfig"
    learning_rate: float = module(1e-6)
    beta: float = module(0.1)
    disable_dropout: bool = module(True)


@trl_config
class CPOConfig(TrainingConfig):
    """:class:`~lightning_llm.trainers.CPOTrainer`'s config: TRL 1.16's experimental ``CPOConfig`` (SimPO with
    ``loss_type="simpo"``)."""

    trl_name = "CPOConfig"
    learning_rate: float = module(1e-6)
    beta: float = module(0.1)
    label_smoothing: float = module(0.0)
    loss_type: str = module("sigmoid")
    disable_dropout: bool = module(True)
    cpo_alpha: float = module(1.0)
    simpo_gamma: float = module(0.5)
    alpha: float = module(0.0)


@trl_config
class PRMConfig(TrainingConfig):
    """:class:`~lightning_llm.trainers.PRMTrainer`'s config: TRL 0.19's ``PRMConfig`` (PRM left TRL afterwards)."""

    trl_name = "PRMConfig"
    learning_rate: float = module(1e-5)
    max_prompt_length: int | None = data(512)
    max_completion_length: int | None = data(None)
    disable_dropout: bool = module(True)
    step_separator: str = data("\n")
    train_on_last_step_only: bool = data(False)


# ------------------------------------------------------------------------------------------------- online algorithms
@trl_config
class _OnlineConfig(TrainingConfig):
    """Fields of the algorithms that generate while training (GRPO, RLOO)."""

    trl_name = ""
    learning_rate: float = module(1e-6)
    #: the most tokens of a prompt (kept from its end); None = whole prompts (TRL 1.16 has no prompt limit)
    max_length: int | None = data(None)
    disable_dropout: bool = module(False)
    num_generations: int = module(8)
    num_generations_eval: int | None = module(None)
    max_completion_length: int = module(512)
    ds3_gather_for_generation: bool = module(True)
    #: shuffle the prompts (seeded, the same order on every process)
    shuffle_dataset: bool = data(True, name="shuffle")
    #: completions per generation round over all processes; sets ``steps_per_generation``
    generation_batch_size: int | None = facade(None)
    steps_per_generation: int | None = module(None)
    temperature: float = module(1.0)
    top_p: float = module(1.0)
    top_k: int = module(0)
    min_p: float | None = module(None)
    repetition_penalty: float = module(1.0)
    num_iterations: int = module(1)
    epsilon: float = module(0.2)
    epsilon_high: float | None = module(None)
    reward_weights: list | None = module(None)
    mask_truncated_completions: bool = module(False)


@trl_config
class GRPOConfig(_OnlineConfig):
    """:class:`~lightning_llm.trainers.GRPOTrainer`'s config: TRL 1.16's ``GRPOConfig``."""

    trl_name = "GRPOConfig"
    beta: float = module(0.0)
    delta: float | None = module(None)
    sapo_temperature_neg: float = module(1.05)
    sapo_temperature_pos: float = module(1.0)
    vespo_k_pos: float = module(2.0)
    vespo_lambda_pos: float = module(3.0)
    vespo_k_neg: float = module(3.0)
    vespo_lambda_neg: float = module(2.0)
    importance_sampling_level: str = module("token")
    multi_objective_aggregation: str = module("sum_then_normalize")
    scale_rewards: str = module("group")
    loss_type: str = module("dapo")
    top_entropy_quantile: float = module(1.0)
    entropy_coef: float = module(0.0)
    off_policy_mask_threshold: float | None = module(None)
    use_bias_correction_kl: bool = module(True)


@trl_config
class RLOOConfig(_OnlineConfig):
    """:class:`~lightning_llm.trainers.RLOOTrainer`'s config: TRL 1.16's ``RLOOConfig``."""

    trl_name = "RLOOConfig"
    num_generations: int = module(2)
    beta: float = module(0.05)
    normalize_advantages: bool = module(False)
    reward_clip_range: list | None = module(None)


@trl_config
class OnlineDPOConfig(TrainingConfig):
    """:class:`~lightning_llm.trainers.OnlineDPOTrainer`'s config: TRL 1.16's experimental ``OnlineDPOConfig``.

    ``per_device_train_batch_size`` counts prompts, as TRL's does (each is completed twice: the data module's
    ``batch_size`` is twice it). ``beta`` is a number or a list indexed by epoch."""

    trl_name = "OnlineDPOConfig"
    learning_rate: float = module(5e-7)
    beta: list | float = module(factory=lambda: [0.1])
    loss_type: str = module("sigmoid")
    #: the most tokens of prompt + completion in the log-probs (the prompt loses its first tokens)
    max_length: int = module(512)
    max_new_tokens: int = module(64, name="max_completion_length")
    temperature: float = module(0.9)
    top_p: float = module(1.0)
    top_k: int = module(0)
    min_p: float | None = module(None)
    repetition_penalty: float = module(1.0)
    missing_eos_penalty: float | None = module(None)
    reward_weights: list | None = module(None)
    disable_dropout: bool = module(True)
    ds3_gather_for_generation: bool = module(True)


@trl_config
class XPOConfig(OnlineDPOConfig):
    """:class:`~lightning_llm.trainers.XPOTrainer`'s config: TRL 1.13's experimental ``XPOConfig`` (XPO left TRL
    afterwards): Online DPO's fields and ``alpha``, a number or a list indexed by epoch."""

    trl_name = "XPOConfig"
    alpha: list | float = module(factory=lambda: [1e-5])


@trl_config
class NashMDConfig(OnlineDPOConfig):
    """:class:`~lightning_llm.trainers.NashMDTrainer`'s config: TRL 1.13's experimental ``NashMDConfig`` (Nash-MD left
    TRL afterwards): Online DPO's fields and ``mixture_coef``, a number or a list indexed by epoch. Nash-MD has one
    loss, so ``loss_type`` keeps Online DPO's ``sigmoid``."""

    trl_name = "NashMDConfig"
    mixture_coef: list | float = module(factory=lambda: [0.5])


@trl_config
class PPOConfig(TrainingConfig):
    """:class:`~lightning_llm.trainers.PPOTrainer`'s config: TRL 1.12's experimental ``PPOConfig`` (PPO left TRL
    afterwards); see :class:`~lightning_llm.PPOModule` for the algorithm.

    Batches as TRL's: a rollout is ``per_device_train_batch_size · gradient_accumulation_steps`` prompts per process
    (the data module's ``batch_size``), cut into ``num_mini_batches`` mini-batches of micro-batches of
    ``per_device_train_batch_size`` (the module's ``gradient_accumulation_steps`` is micro-batches per mini-batch,
    ``gradient_accumulation_steps / num_mini_batches`` here), one optimizer step per mini-batch. With
    ``num_mini_batches > 1`` that is where we differ from TRL 1.12 on purpose: its loop leaves the stepping to
    accelerate's accumulation counter, which steps only every ``gradient_accumulation_steps`` micro-batches, across
    mini-batch boundaries (the batching is the same when ``num_mini_batches=1``, TRL's default).

    ``total_episodes`` (prompts over all processes) sets the run's length when ``max_steps`` is not given; both
    together are refused. ``max_grad_norm`` and the gradient accumulation are the module's (PPO optimizes by hand),
    never the ``lightning.Trainer``'s; ``max_grad_norm=0`` clips nothing, TRL 1.12's behaviour (its loop never
    clipped). ``max_length`` (the most tokens of a prompt, kept from its end) is our addition; ``clip_range`` is
    accepted for ``cliprange``."""

    trl_name = "PPOConfig"
    learning_rate: float = module(3e-6)
    #: the most tokens of a prompt (kept from its end); None = whole prompts (TRL 1.12's PPO has no prompt limit)
    max_length: int | None = data(None)
    gradient_accumulation_steps: int = module(1)
    max_grad_norm: float = module(1.0)
    num_mini_batches: int = module(1)
    #: prompts of the run over all processes; None = ``num_train_epochs`` passes over the data (or ``max_steps``)
    total_episodes: int | None = module(None)
    local_rollout_forward_batch_size: int = module(64)
    #: the most tokens of a response
    response_length: int = module(53, name="max_completion_length")
    #: ``eos``: cut responses after the first EOS token
    stop_token: str | None = module(None)
    stop_token_id: int | None = module(None)
    temperature: float = module(0.7)
    missing_eos_penalty: float | None = module(None)
    num_ppo_epochs: int = module(4)
    whiten_rewards: bool = module(False)
    kl_coef: float = module(0.05)
    #: ``k1`` or ``k3``
    kl_estimator: str = module("k1")
    cliprange: float = module(0.2)
    vf_coef: float = module(0.1)
    cliprange_value: float = module(0.2)
    gamma: float = module(1.0)
    lam: float = module(0.95)
    ds3_gather_for_generation: bool = module(True)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.total_episodes is not None and self.max_steps > 0:
            raise ValueError(f"{name}: give max_steps or total_episodes, not both")
        if self.gradient_accumulation_steps % self.num_mini_batches:
            raise ValueError(f"{name}.gradient_accumulation_steps={self.gradient_accumulation_steps} must be a "
                             f"multiple of num_mini_batches={self.num_mini_batches}: each mini-batch is a whole number "
                             "of micro-batches of per_device_train_batch_size prompts")
