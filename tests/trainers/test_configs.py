"""Every field of every TRL-style config reaches its target (module, data module, ``lightning.Trainer``) or raises;
TRL's own fields keep TRL's names and defaults; TRL fields without a counterpart, unknown names and unmapped trainer
arguments are refused by name."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_llm.trainers as trainers
from lightning_llm.trainers._trl_fields import TRL_CONFIGS
from lightning_llm.trainers.base import _import
from lightning_llm.trainers.config import DATA, FACADE, MODULE, TRAINER, target_of, trl_defaults

ALGORITHMS = ("SFT", "Reward", "DPO", "ORPO", "CPO", "KTO", "BCO", "PRM", "GRPO", "RLOO", "PPO", "OnlineDPO", "XPO",
              "NashMD")
DATA_OF = {"SFT": "sample:messages", "Reward": "sample:preference", "DPO": "sample:preference",
           "ORPO": "sample:preference", "CPO": "sample:preference", "KTO": "sample:unpaired_preference",
           "BCO": "sample:unpaired_preference", "PRM": "sample:stepwise", "GRPO": "sample:prompt_only",
           "RLOO": "sample:prompt_only", "OnlineDPO": "sample:prompt_only",
           "XPO": "sample:prompt_only", "NashMD": "sample:prompt_only", "PPO": "sample:prompt_only"}
#: fields of ours that TRL 1.16's config of the same name lacks (this project's additions, or older TRL spellings)
OUR_ADDITIONS = {"warmup_ratio", "module_kwargs", "trainer_kwargs"}
ADDITIONS_OF = {"Reward": {"loss_type", "margin"}, "GRPO": {"max_length", "dataset_num_proc"},
               "RLOO": {"max_length", "dataset_num_proc"},
               "OnlineDPO": {"dataset_num_proc"}, "XPO": {"dataset_num_proc"}, "NashMD": {"dataset_num_proc"},
               # TRL 1.12's PPOConfig is TrainingArguments' fields and PPO's own (no prompt limit, no loading fields)
               "PPO": {"max_length", "model_init_kwargs", "trust_remote_code"},
               "PRM": {"model_init_kwargs", "trust_remote_code"},
               # TRL 0.19's BCOConfig predates these (DPO's and KTO's later fields)
               "BCO": {"trust_remote_code", "precompute_ref_batch_size", "sync_ref_model", "ref_model_mixup_alpha",
                       "ref_model_sync_steps"}}
#: where our default differs from TRL's on purpose (see lightning_llm.trainers.config)
OUR_DEFAULTS = {"output_dir", "report_to"}

#: a valid non-default value of each field (per algorithm where it differs)
VALUES = {
    "num_train_epochs": 2.0, "max_steps": 7, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 3,
    "gradient_accumulation_steps": 2, "learning_rate": 3e-4, "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1}, "warmup_ratio": 0.1, "weight_decay": 0.01,
    "logging_steps": 3, "gradient_checkpointing": False, "dataloader_num_workers": 1,
    "average_tokens_across_devices": False, "trust_remote_code": True, "dataset_num_proc": 2, "max_length": 77,
    "chat_template_path": "{% for m in messages %}{{ m['content'] }}{% endfor %}", "dataset_text_field": "body",
    "truncation_mode": "keep_end",
    "packing": True, "packing_strategy": "bfd", "padding_free": True, "completion_only_loss": False,
    "assistant_only_loss": True, "disable_dropout": False, "center_rewards_coefficient": 0.01, "margin": 0.5,
    "beta": 0.3, "precompute_ref_log_probs": True, "precompute_ref_batch_size": 4, "sync_ref_model": True,
    "ref_model_mixup_alpha": 0.5, "ref_model_sync_steps": 8, "loss_weights": [1.0], "label_smoothing": 0.1,
    "f_divergence_type": "js_divergence", "f_alpha_divergence_coef": 0.3, "ld_alpha": 0.5, "use_weighting": True,
    "discopop_tau": 0.1, "desirable_weight": 1.5, "undesirable_weight": 0.5, "prompt_sample_size": 16,
    "min_density_ratio": 0.3, "max_density_ratio": 5.0, "cpo_alpha": 0.5, "simpo_gamma": 0.7, "alpha": 0.2,
    "max_prompt_length": 40, "max_completion_length": 24, "step_separator": " | ", "train_on_last_step_only": True,
    "num_generations": 4, "num_generations_eval": 2, "ds3_gather_for_generation": False, "shuffle_dataset": False,
    "steps_per_generation": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05,
    "repetition_penalty": 1.1, "num_iterations": 2, "epsilon": 0.3, "epsilon_high": 0.4, "reward_weights": [2.0],
    "mask_truncated_completions": True, "delta": 1.5, "sapo_temperature_neg": 1.2, "sapo_temperature_pos": 0.9,
    "vespo_k_pos": 1.0, "vespo_lambda_pos": 2.0, "vespo_k_neg": 2.0, "vespo_lambda_neg": 1.0,
    "importance_sampling_level": "sequence", "multi_objective_aggregation": "normalize_then_sum",
    "scale_rewards": "batch", "top_entropy_quantile": 0.5, "entropy_coef": 0.01, "off_policy_mask_threshold": 0.5,
    "use_bias_correction_kl": False, "normalize_advantages": True, "reward_clip_range": [0.0, 1.0],
    "max_new_tokens": 24, "missing_eos_penalty": 0.5, "mixture_coef": 0.3,
    # PPO's (TRL 1.12)
    "num_mini_batches": 2, "total_episodes": 40, "local_rollout_forward_batch_size": 3, "response_length": 12,
    "stop_token": "eos", "stop_token_id": 2, "num_ppo_epochs": 2, "whiten_rewards": True, "kl_coef": 0.1,
    "kl_estimator": "k3", "cliprange": 0.3, "vf_coef": 0.2, "cliprange_value": 0.4, "gamma": 0.99, "lam": 0.9,
    "max_grad_norm": 0.5,
}
LOSS_TYPES = {"SFT": "dft", "Reward": "ranking", "DPO": ["ipo"], "KTO": "apo_zero_unpaired", "CPO": "simpo",
              "GRPO": "grpo", "OnlineDPO": "ipo", "XPO": "ipo", "NashMD": "sigmoid"}  # Nash-MD has one loss


def reward(completions, **kwargs):
    return [1.0 for _ in completions]


def build(algorithm: str, tmp_path: Path, **fields):
    config_cls = getattr(trainers, f"{algorithm}Config")
    trainer_cls = getattr(trainers, f"{algorithm}Trainer")
    args = config_cls(output_dir=str(tmp_path / algorithm), **fields)
    if algorithm == "PPO":  # TRL 1.12's order: args first, the policy by keyword
        return trainer_cls(args=args, model="tiny-llama", reward_funcs=[reward], train_dataset=DATA_OF[algorithm])
    extra = {"reward_funcs": [reward]} if algorithm in ("GRPO", "RLOO", "OnlineDPO", "XPO", "NashMD") else {}
    return trainer_cls("tiny-llama", args=args, train_dataset=DATA_OF[algorithm], **extra)


def accepted_parameters(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes, its bases' included where ``**kwargs`` passes them on."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def value_of(algorithm: str, name: str):
    if name == "loss_type":
        return LOSS_TYPES[algorithm]
    if name == "reward_weights":
        return [2.0]
    return VALUES[name]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_module_and_data_fields_name_parameters_of_their_targets(algorithm):
    trainer_cls = getattr(trainers, f"{algorithm}Trainer")
    config_cls = trainer_cls.config_class
    targets = {MODULE: accepted_parameters(_import(trainer_cls.module_path)),
               DATA: accepted_parameters(_import(trainer_cls.datamodule_path))}
    for config_field in dataclasses.fields(config_cls):
        where, name = target_of(config_field)
        assert where in (MODULE, DATA, TRAINER, FACADE)
        if where in targets:
            assert name in targets[where], f"{config_cls.__name__}.{config_field.name} -> {where} has no {name!r}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fields_carry_trl_names_and_defaults(algorithm):
    config_cls = getattr(trainers, f"{algorithm}Config")
    assert config_cls.trl_name in TRL_CONFIGS
    theirs = trl_defaults(config_cls)
    additions = OUR_ADDITIONS | ADDITIONS_OF.get(algorithm, set())
    for config_field in dataclasses.fields(config_cls):
        name = config_field.name
        if name in additions:
            assert name not in theirs, name
            continue
        assert name in theirs, f"{config_cls.__name__}.{name} is not a field of TRL's {config_cls.trl_name}"
        default = config_cls().__getattribute__(name)
        if name not in OUR_DEFAULTS:
            assert default == theirs[name], f"{config_cls.__name__}.{name}: ours {default!r}, TRL {theirs[name]!r}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_field_reaches_its_target(algorithm, tmp_path):
    config_cls = getattr(trainers, f"{algorithm}Config")
    skip = {"output_dir", "warmup_steps", "bf16", "fp16", "use_cpu", "seed", "data_seed", "report_to", "disable_tqdm",
            "train_sampling_strategy", "resume_from_checkpoint", "model_init_kwargs", "module_kwargs",
            "trainer_kwargs", "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "eval_strategy",
            "eval_steps", "save_strategy", "save_steps", "save_total_limit", "pad_to_multiple_of",
            "generation_batch_size", "num_train_epochs"}  # the facade's own: test_facade_fields below
    # a field that is the facade's elsewhere but goes to the module here (PPO's max_grad_norm) is checked here
    fields = {f.name: value_of(algorithm, f.name) for f in dataclasses.fields(config_cls)
              if f.name not in skip or target_of(f)[0] == MODULE}
    missing = sorted(n for n in fields if n not in VALUES and n != "loss_type")
    assert not missing, f"no test value for {missing}"
    # fields that cannot be set together are checked in a second trainer
    apart = {n: fields.pop(n) for n in SET_APART if n in fields}
    for group in (fields, apart):
        if group:
            check_targets(algorithm, config_cls, build(algorithm, tmp_path, **group), group)


#: fields that conflict with others of the first build (a synced reference cannot be precomputed; PPO's run length
#: is max_steps or total_episodes, its stop token stop_token or stop_token_id)
SET_APART = ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "total_episodes", "stop_token_id")


def check_targets(algorithm, config_cls, trainer, fields) -> None:
    lightning = trainer.lightning_trainer()
    for config_field in dataclasses.fields(config_cls):
        if config_field.name not in fields:
            continue
        where, name = target_of(config_field)
        value = fields[config_field.name]
        if where == MODULE:
            got = trainer.module.hparams.get(name, getattr(trainer.module, name, None))
        elif where == DATA:
            got = getattr(trainer.datamodule, name)
        else:
            got = getattr(lightning, name)
        if name == "chat_template":
            got = trainer.module.tokenizer.chat_template
        if isinstance(value, list) and not isinstance(got, list):
            got = list(got)
        if algorithm in ("OnlineDPO", "XPO", "NashMD") and name in ("batch_size", "val_batch_size"):
            value = 2 * value  # TRL's Online DPO counts prompts, the data module completions
        if algorithm == "PPO" and where == DATA and name == "batch_size":
            value *= fields.get("gradient_accumulation_steps", 1)  # a rollout: TRL 1.12's local_batch_size
        if algorithm == "PPO" and where == MODULE and name == "gradient_accumulation_steps":
            value //= fields.get("num_mini_batches", 1)  # micro-batches per mini-batch
        assert got == value, f"{algorithm}Config.{config_field.name}={value!r} reached {where}.{name} as {got!r}"


def test_facade_fields(tmp_path):
    args = dict(num_train_epochs=2, warmup_steps=0.25, seed=5, data_seed=9, train_sampling_strategy="sequential",
                model_init_kwargs={"torch_dtype": "bfloat16", "attn_implementation": "eager",
                                   "low_cpu_mem_usage": True},
                module_kwargs={"logprob_impl": "chunked"}, trainer_kwargs={"limit_train_batches": 3},
                optim="adamw_torch",
                adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, max_grad_norm=0.5, eval_strategy="steps",
                eval_steps=4, save_strategy="steps", save_steps=6, save_total_limit=2, use_cpu=True,
                disable_tqdm=True, pad_to_multiple_of=8, report_to="tensorboard", bf16=True)
    trainer = build("DPO", tmp_path, **args)
    module, data, lightning = trainer.module, trainer.datamodule, trainer.lightning_trainer()
    assert lightning.max_epochs == 2 and lightning.max_steps == -1
    assert module.warmup_ratio == 0.25 and module.warmup_steps == 0
    assert data.seed == 9 and data.shuffle is False
    assert module.model_load_kwargs["dtype"] == "bfloat16"
    assert module.model_load_kwargs["attn_implementation"] == "eager"
    assert module.model_load_kwargs["model_kwargs"] == {"low_cpu_mem_usage": True}
    assert module.logprob_impl == "chunked" and lightning.limit_train_batches == 3
    optimizer = module.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.8, 0.95) and optimizer.defaults["eps"] == 1e-6
    assert lightning.gradient_clip_val == 0.5
    assert lightning.val_check_interval == 4 and lightning.check_val_every_n_epoch is None
    checkpoint = lightning.checkpoint_callback
    assert checkpoint._every_n_train_steps == 6 and checkpoint.save_top_k == 2 and checkpoint.monitor == "step"
    assert Path(checkpoint.dirpath) == tmp_path / "DPO"
    assert lightning.accelerator.__class__.__name__ == "CPUAccelerator"
    assert lightning.precision == "bf16-mixed" and not lightning.progress_bar_callback
    assert data.pad_to_multiple_of == 8
    assert {type(lg).__name__ for lg in lightning.loggers} == {"RunCSVLogger", "TensorBoardLogger"}
    assert module.export_dir == str((tmp_path / "DPO" / "final").resolve())

    sgd = build("SFT", tmp_path, optim="sgd", learning_rate=0.1, eval_strategy="epoch", save_strategy="no",
                max_grad_norm=0.0, bf16=False, warmup_steps=3, max_steps=5)
    optimizer = sgd.module.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    lightning = sgd.lightning_trainer()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.1
    assert lightning.checkpoint_callback is None and lightning.gradient_clip_val is None
    assert lightning.check_val_every_n_epoch == 1 and lightning.precision == "32-true"
    assert sgd.module.warmup_steps == 3 and lightning.max_epochs == -1 and lightning.max_steps == 5
    assert build("SFT", tmp_path, eval_strategy="no").lightning_trainer().limit_val_batches == 0
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"fp16=True\) needs a CUDA device"):
            build("SFT", tmp_path, fp16=True).lightning_trainer()

    online = build("GRPO", tmp_path, generation_batch_size=16, per_device_train_batch_size=8, num_generations=4)
    assert online.module.hparams["steps_per_generation"] == 2
    with pytest.raises(ValueError, match="generation_batch_size=12 must be a multiple of"):
        build("GRPO", tmp_path, generation_batch_size=12, per_device_train_batch_size=8)


def test_default_output_dir_is_trls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = trainers.SFTTrainer("tiny-llama", train_dataset="sample:messages")
    assert trainer.output_dir == Path("tiny-llama-SFT")
    assert trainer.args.learning_rate == 2e-5 and trainer.args.gradient_checkpointing is True


def changed(value):
    """A value different from TRL's default ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, "other"]
    return "other"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_trl_fields_without_counterpart_are_accepted_at_default_and_refused_otherwise(algorithm):
    config_cls = getattr(trainers, f"{algorithm}Config")
    ours = {f.name for f in dataclasses.fields(config_cls)}
    theirs = trl_defaults(config_cls)
    unmapped = sorted(set(theirs) - ours)
    assert "push_to_hub" in unmapped and len(unmapped) > 20
    config_cls(**{name: theirs[name] for name in unmapped})  # all of them at TRL's defaults: accepted
    for name in unmapped:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            config_cls(**{name: changed(theirs[name])})


def test_unknown_fields_aliases_and_bad_values():
    with pytest.raises(ValueError, match="has no field 'learnig_rate'; did you mean learning_rate"):
        trainers.DPOConfig(learnig_rate=1e-5)
    assert trainers.SFTConfig(max_seq_length=128).max_length == 128
    with pytest.raises(ValueError, match="max_seq_length is another name of max_length"):
        trainers.SFTConfig(max_seq_length=128, max_length=64)
    with pytest.raises(ValueError, match="push_to_hub.*huggingface_hub"):
        trainers.SFTConfig(push_to_hub=True)
    with pytest.raises(ValueError, match="num_train_epochs=2.5"):
        trainers.SFTConfig(num_train_epochs=2.5)
    assert trainers.SFTConfig(num_train_epochs=2.5, max_steps=10).max_steps == 10
    for bad in ({"eval_strategy": "sometimes"}, {"save_strategy": "best"}, {"optim": "adafactor"},
                {"report_to": "mlflow"}, {"logging_steps": 0.1}, {"warmup_steps": -1}, {"bf16": True, "fp16": True},
                {"warmup_steps": 3, "warmup_ratio": 0.1}, {"module_kwargs": [1]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            trainers.SFTConfig(**bad)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        trainers.SFTTrainer("tiny-llama", args=trainers.SFTConfig(lr_scheduler_type="wiggly"),
                            train_dataset="sample:messages")


def test_unmapped_trainer_arguments_and_transformers_callbacks_are_refused(tmp_path):
    from transformers import TrainerCallback

    args = trainers.SFTConfig(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data_collator=\.\.\.\) is not supported"):
        trainers.SFTTrainer("tiny-llama", args=args, train_dataset="sample:messages", data_collator=lambda x: x)
    with pytest.raises(ValueError, match="optimizers"):
        trainers.DPOTrainer("tiny-llama", args=trainers.DPOConfig(output_dir=str(tmp_path)),
                            train_dataset="sample:preference", optimizers=(object(), None))
    with pytest.raises(ValueError, match="compute_metrics"):
        trainers.SFTTrainer("tiny-llama", args=args, compute_metrics=lambda p: {})
    trainers.SFTTrainer("tiny-llama", args=args, data_collator=None, compute_metrics=None)  # unset: fine
    with pytest.raises(TypeError, match="unexpected keyword argument 'train_data'; did you mean train_dataset"):
        trainers.SFTTrainer("tiny-llama", args=args, train_data="sample:messages")
    with pytest.raises(TypeError, match=r"callbacks\[1\] is a transformers.TrainerCallback \(Mine\)"):
        class Mine(TrainerCallback):
            pass

        trainers.SFTTrainer("tiny-llama", args=args, callbacks=[Callback(), Mine()])
    with pytest.raises(TypeError, match="takes args=SFTConfig"):
        trainers.SFTTrainer("tiny-llama", args=trainers.DPOConfig())
    built = trainers.SFTTrainer("tiny-llama", args=args, callbacks=[trainers.BEMACallback])
    assert isinstance(built.callbacks[0], trainers.BEMACallback)


def test_one_import_line_serves_a_script():
    import lightning_llm
    from lightning_llm.trainers import AllTrueJudge, BEMACallback, DPOConfig, DPOTrainer, HfPairwiseJudge  # noqa: F401

    assert lightning_llm.DPOTrainer is DPOTrainer and lightning_llm.GRPOConfig is trainers.GRPOConfig
    assert lightning_llm.PPOTrainer is trainers.PPOTrainer and lightning_llm.PPOConfig is trainers.PPOConfig
    assert lightning_llm.NashMDTrainer is trainers.NashMDTrainer and lightning_llm.NashMDConfig is trainers.NashMDConfig
    assert lightning_llm.OnlineDPOTrainer is trainers.OnlineDPOTrainer


class FirstWins(trainers.BasePairwiseJudge):
    def judge(self, prompts, completions, shuffle_order=True):
        return [0] * len(prompts)


def test_online_dpo_trainer_takes_a_judge_and_counts_prompts_per_device(tmp_path):
    args = trainers.OnlineDPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                    logging_steps=1, max_new_tokens=8, max_length=64, save_strategy="no",
                                    report_to="none", disable_tqdm=True)
    with pytest.raises(ValueError, match="not both"):
        trainers.OnlineDPOTrainer("tiny-llama", reward_funcs=[reward], judge=FirstWins(), args=args,
                                  train_dataset="sample:prompt_only")
    built = trainers.OnlineDPOTrainer("tiny-llama", judge=FirstWins(), args=args, train_dataset="sample:prompt_only")
    assert built.datamodule.batch_size == 4  # 2 prompts x 2 completions
    out = built.train()
    assert out.global_step == 2
    logged = [entry for entry in built.state.log_history if "rewards/chosen" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert all(entry["beta"] == pytest.approx(0.1) for entry in logged)


def test_ppo_batches_run_length_and_clipping_are_the_modules(tmp_path):
    args = trainers.PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                              num_mini_batches=2, num_ppo_epochs=3, total_episodes=20, max_grad_norm=0.7,
                              clip_range=0.25, kl_coef=0.2)
    built = trainers.PPOTrainer(args=args, model="tiny-llama", reward_funcs=[reward],
                                train_dataset="sample:prompt_only")
    lightning = built.lightning_trainer()
    # PPO optimizes by hand: the Trainer neither clips nor accumulates
    assert lightning.gradient_clip_val is None and lightning.accumulate_grad_batches == 1
    assert built.module.max_grad_norm == 0.7 and built.module.gradient_accumulation_steps == 2
    assert built.datamodule.batch_size == 8  # TRL's local_batch_size: 2 x 4
    assert built.module.cliprange == 0.25 and built.module.kl_coef == 0.2
    # 20 episodes / 8 prompts per rollout -> 3 rollouts of 3 epochs x 2 mini-batches
    assert lightning.max_steps == 18 and lightning.max_epochs == -1 and built.module.total_episodes == 20
    unclipped = trainers.PPOTrainer(args=trainers.PPOConfig(output_dir=str(tmp_path), max_grad_norm=0.0),
                                    model="tiny-llama", reward_funcs=[reward])
    assert unclipped.module.max_grad_norm is None  # TRL 1.12's loop never clipped
    with pytest.raises(ValueError, match="max_steps or total_episodes, not both"):
        trainers.PPOConfig(max_steps=4, total_episodes=8)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 must be a multiple of num_mini_batches=2"):
        trainers.PPOConfig(gradient_accumulation_steps=3, num_mini_batches=2)
    with pytest.raises(TypeError, match="first argument is args"):
        trainers.PPOTrainer("tiny-llama", reward_funcs=[reward])
    with pytest.raises(TypeError, match="needs model="):
        trainers.PPOTrainer(args=args, reward_funcs=[reward])
    with pytest.raises(ValueError, match="data_collator"):
        trainers.PPOTrainer(args=args, model="tiny-llama", reward_funcs=[reward], data_collator=lambda rows: rows)
    with pytest.raises(ValueError, match=r"train\(\) needs a train_dataset"):
        unclipped.train()



def test_ppo_step_runs_in_one_lightning_run_with_trains_precision(tmp_path, monkeypatch):
    """step() hands the module one lightning.Trainer, the same at every call (the last train()'s when there was
    one), built from the config: bf16 gives bf16-mixed, as under train()."""
    built = trainers.PPOTrainer(args=trainers.PPOConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True),
                                model="tiny-llama", reward_funcs=[reward])
    seen = []
    monkeypatch.setattr(built.module, "step", lambda queries, rows=None, **kwargs: seen.append(kwargs) or {})
    built.step(["Say hello."])
    built.step(["Say hello."])
    assert [set(kwargs) for kwargs in seen] == [{"trainer"}, {"trainer"}]
    assert seen[0]["trainer"] is seen[1]["trainer"] and seen[0]["trainer"].precision == "bf16-mixed"
    plain = trainers.PPOTrainer(args=trainers.PPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True),
                                model="tiny-llama", reward_funcs=[reward])
    monkeypatch.setattr(plain.module, "step", lambda queries, rows=None, **kwargs: seen.append(kwargs) or {})
    from types import SimpleNamespace

    plain._run_trainer = sentinel = SimpleNamespace(global_step=7)  # as if train() had run: its trainer goes on
    plain.step(["Say hello."])
    assert seen[-1]["trainer"] is sentinel and plain.state.global_step == 7


class SureJudge(trainers.BasePairwiseJudge):
    """The policy's completion (the first of each pair) is better with probability 0.7."""

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        return [0.7 if return_scores else 0] * len(prompts)


def test_nash_md_trainer_trains_on_a_judges_probabilities(tmp_path):
    args = trainers.NashMDConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                 logging_steps=1, max_new_tokens=6, max_length=64, mixture_coef=0.25,
                                 save_strategy="no", report_to="none", disable_tqdm=True, gradient_checkpointing=False)
    built = trainers.NashMDTrainer("tiny-llama", judge=SureJudge(), args=args, train_dataset="sample:prompt_only")
    assert built.datamodule.batch_size == 4 and built.module.mixture_coef == 0.25
    assert built.train().global_step == 1
    logged = [entry for entry in built.state.log_history if "rewards/probabilities" in entry]
    assert [entry["step"] for entry in logged] == [1]
    assert logged[0]["rewards/probabilities"] == pytest.approx(0.7)
