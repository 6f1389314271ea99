"""The TRL-style trainers against TRL 1.16's own trainers, both through ``.train()``, and against the Lightning path.

Same tiny model (objects from fixed seeds, or one saved directory), same tokenizer, same rows and hyperparameters on
both sides; the whole dataset is one batch, so the first step's metrics do not depend on either side's shuffle. The
first logged step's loss and every metric TRL logs (but the bookkeeping ones) agree within 1e-4 relative; and the
facade logs exactly what the module logs when trained the Lightning way.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest

pytest.importorskip("trl")

from datasets import Dataset
from helpers import (
    MAX_FIXED_COMPLETION,
    StepMetrics,
    fixed_completions,
    id_reward,
    perturbed_policy_model,
    quiet_trainer,
    sample_rows,
    sharp_reference_model,
)

import lightning_llm.trainers as ours
from lightning_llm.models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.slow

TOKENIZER = tiny_tokenizer()
#: TRL log keys that are bookkeeping, or measured differently on purpose (``learning_rate``: TRL logs the rate after
#: the step's scheduler step, we log the one the step used; ``grad_norm``: not logged here; ``step_time``: a timing)
NOT_COMPARED = {"step", "epoch", "learning_rate", "grad_norm", "step_time"}
COMMON = dict(max_steps=1, logging_steps=1, use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
              seed=42, gradient_checkpointing=False)


def trl_first_step(trainer_cls, config_cls, tmp_path, **kwargs) -> dict[str, float]:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    config = dict(kwargs.pop("config"))
    args = config_cls(output_dir=str(tmp_path / "trl"), report_to=[], **COMMON, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(args=args, **kwargs)
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        trainer.train()
    return {k: float(v) for k, v in trainer.state.log_history[0].items() if k not in NOT_COMPARED}


def our_first_step(trainer_cls, config_cls, tmp_path, **kwargs) -> tuple[dict[str, float], object]:
    config = dict(kwargs.pop("config"))
    args = config_cls(output_dir=str(tmp_path / "ours"), **COMMON, **config)
    trainer = trainer_cls(args=args, **kwargs)
    output = trainer.train()
    assert output.global_step == 1 and math.isfinite(output.training_loss)
    assert trainer.state.log_history[-1]["train_loss"] == output.training_loss
    return {k: float(v) for k, v in trainer.state.log_history[0].items()}, trainer


def assert_close(mine: dict[str, float], theirs: dict[str, float]) -> None:
    missing = sorted(set(theirs) - set(mine))
    assert not missing, f"metrics TRL logs that we do not: {missing} (ours: {sorted(mine)})"
    bad = {k: (mine[k], theirs[k]) for k in theirs
           if not math.isclose(mine[k], theirs[k], rel_tol=1e-4, abs_tol=1e-6)}
    assert not bad, f"ours vs TRL: {bad}"


def lightning_first_step(module, datamodule) -> dict[str, float]:
    metrics = StepMetrics()
    quiet_trainer(max_steps=1, callbacks=[metrics]).fit(module, datamodule)
    return metrics.logged[0]


def test_sft_trainer_matches_trl_and_the_module(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from lightning_llm import SFTDataModule, SFTModule

    rows = sample_rows("messages", 8)
    config = dict(per_device_train_batch_size=8, max_length=64)
    theirs = trl_first_step(SFTTrainer, SFTConfig, tmp_path, model=tiny_model("tiny-llama"),
                            processing_class=TOKENIZER, train_dataset=Dataset.from_list(rows), config=config)
    mine, trainer = our_first_step(ours.SFTTrainer, ours.SFTConfig, tmp_path, model=tiny_model("tiny-llama"),
                                   processing_class=TOKENIZER, train_dataset=Dataset.from_list(rows), config=config)
    assert {"loss", "mean_token_accuracy", "entropy", "num_tokens"} <= set(theirs)
    assert_close(mine, theirs)
    module = SFTModule(tiny_model("tiny-llama"), tokenizer=TOKENIZER, lr_scheduler_type="linear")
    lightning = lightning_first_step(module, SFTDataModule(rows, batch_size=8, max_length=64, seed=42))
    assert lightning.keys() == {k for k in mine if k not in ("epoch", "step")}
    assert all(math.isclose(lightning[k], mine[k], rel_tol=1e-6) for k in lightning), (lightning, mine)


def test_dpo_trainer_matches_trl_and_the_module(tmp_path):
    from trl import DPOConfig, DPOTrainer

    from lightning_llm import DPOModule, PreferenceDataModule

    rows = sample_rows("preference", 8)
    config = dict(per_device_train_batch_size=8, beta=0.2, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5])
    theirs = trl_first_step(DPOTrainer, DPOConfig, tmp_path, model=perturbed_policy_model(),
                            ref_model=sharp_reference_model(), processing_class=TOKENIZER,
                            train_dataset=Dataset.from_list(rows), config=config)
    mine, trainer = our_first_step(ours.DPOTrainer, ours.DPOConfig, tmp_path, model=perturbed_policy_model(),
                                   ref_model=sharp_reference_model(), processing_class=TOKENIZER,
                                   train_dataset=Dataset.from_list(rows), config=config)
    assert {"loss", "rewards/chosen", "rewards/margins", "logps/rejected"} <= set(theirs)
    assert abs(theirs["rewards/margins"]) > 1e-3  # the policy differs from its reference
    assert_close(mine, theirs)
    module = DPOModule(perturbed_policy_model(), tokenizer=TOKENIZER, ref_model=sharp_reference_model(), beta=0.2,
                       loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], lr_scheduler_type="linear")
    lightning = lightning_first_step(module, PreferenceDataModule(rows, batch_size=8, seed=42))
    assert all(math.isclose(lightning[k], mine[k], rel_tol=1e-6) for k in lightning), (lightning, mine)


def test_reward_trainer_matches_trl(tmp_path):
    from trl import RewardConfig, RewardTrainer

    rows = sample_rows("preference", 8)
    config = dict(per_device_train_batch_size=8, center_rewards_coefficient=0.01)
    model = tiny_model("tiny-llama", task="sequence_classification", num_labels=1)
    theirs = trl_first_step(RewardTrainer, RewardConfig, tmp_path, model=copy.deepcopy(model),
                            processing_class=TOKENIZER, train_dataset=Dataset.from_list(rows), config=config)
    mine, _ = our_first_step(ours.RewardTrainer, ours.RewardConfig, tmp_path, model=copy.deepcopy(model),
                             processing_class=TOKENIZER, train_dataset=Dataset.from_list(rows), config=config)
    assert {"loss", "accuracy", "margin"} <= set(theirs)
    assert_close(mine, theirs)


def test_kto_trainer_matches_trl(tmp_path):
    from trl import KTOConfig, KTOTrainer

    rows = sample_rows("unpaired_preference", 8)
    config = dict(per_device_train_batch_size=8, desirable_weight=1.5)
    theirs = trl_first_step(KTOTrainer, KTOConfig, tmp_path, model=perturbed_policy_model(),
                            ref_model=sharp_reference_model(), processing_class=TOKENIZER,
                            train_dataset=Dataset.from_list(rows), config=config)
    mine, _ = our_first_step(ours.KTOTrainer, ours.KTOConfig, tmp_path, model=perturbed_policy_model(),
                             ref_model=sharp_reference_model(), processing_class=TOKENIZER,
                             train_dataset=Dataset.from_list(rows), config=config)
    assert {"loss", "kl", "rewards/chosen", "logps/rejected"} <= set(theirs)
    assert_close(mine, theirs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("tiny-llama").save_pretrained(directory)
    TOKENIZER.save_pretrained(directory)
    return str(directory)


def rollout_func(prompts, trainer):
    """TRL's contract: this process's prompts in, their token ids and completions out (fixed completions)."""
    tokenizer = trainer.processing_class
    prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                  ["input_ids"] for p in prompts]
    return {"prompt_ids": prompt_ids, "completion_ids": fixed_completions(prompt_ids), "logprobs": None}


def test_grpo_trainer_with_rollout_func_matches_trl(tmp_path, model_dir):
    from trl import GRPOConfig, GRPOTrainer

    rows = sample_rows("prompt_only", 8)
    config = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=MAX_FIXED_COMPLETION,
                  beta=0.04, loss_type="grpo")
    theirs = trl_first_step(GRPOTrainer, GRPOConfig, tmp_path, model=model_dir, reward_funcs=[id_reward],
                            processing_class=TOKENIZER, train_dataset=Dataset.from_list(rows),
                            rollout_func=rollout_func, config=config)
    mine, trainer = our_first_step(ours.GRPOTrainer, ours.GRPOConfig, tmp_path, model=model_dir,
                                   reward_funcs=[id_reward], processing_class=TOKENIZER,
                                   train_dataset=Dataset.from_list(rows), rollout_func=rollout_func, config=config)
    assert {"loss", "reward", "kl", "completions/mean_length"} <= set(theirs)
    assert theirs["reward_std"] > 0
    assert_close(mine, theirs)
