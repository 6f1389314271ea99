"""CPOModule (CPO, SimPO, AlphaPO) against TRL 1.16's ``trl.experimental.cpo.CPOTrainer`` on the same tiny model and
data, one loss configuration at a time.

The CPO trainer shares the old ORPO trainer's ``tokenize_row`` (see ``test_trl_orpo.py`` for where it differs from
ours: BOS and conversational rows); on standard data with the shipped tokenizer the sequences are identical, which is
checked first.

Metric definitions that differ (not compared): TRL's ``logits/*`` average every vocabulary logit of every position of
the rows (prompt, padding and the last position included); ours average over the completion tokens. TRL logs
``nll_loss = 0`` whenever ``cpo_alpha == 0`` (including ``alphapo``, which sets it to 0); we log the chosen
completions' NLL whatever its weight (it then does not enter the loss), so ``nll_loss`` is compared only where
``cpo_alpha > 0``.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from helpers import StepMetrics, quiet_trainer, sample_rows, sgd

from lightning_llm.data.preference import PreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.cpo import CPOModule

COMPARED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")

CASES = {
    "sigmoid": {"loss_type": "sigmoid", "beta": 0.2},
    "sigmoid-smoothed": {"loss_type": "sigmoid", "beta": 0.2, "label_smoothing": 0.15, "cpo_alpha": 0.5},
    "sigmoid-alpha": {"loss_type": "sigmoid", "beta": 0.1, "alpha": 0.05},
    "hinge": {"loss_type": "hinge", "beta": 0.05, "cpo_alpha": 2.0},
    "ipo": {"loss_type": "ipo", "beta": 0.3},
    "simpo": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.3, "cpo_alpha": 0.0},
    "simpo-smoothed-nll": {"loss_type": "simpo", "beta": 2.5, "simpo_gamma": 0.8, "label_smoothing": 0.2,
                           "cpo_alpha": 0.4},
    "alphapo": {"loss_type": "alphapo", "beta": 2.0, "simpo_gamma": 0.25, "alpha": 0.3},
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return sample_rows("preference_standard", 10)


def sharp_model(seed: int = 5) -> torch.nn.Module:
    """The tiny llama with a scaled-up LM head, so that chosen and rejected log-probs differ beyond the noise."""
    model = tiny_model("tiny-llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def cpo_trainer(tmp_path, tok, rows, model, **config):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, per_device_train_batch_size=len(rows),
                     bf16=False, use_cpu=True, max_length=512, **config)
    logging.getLogger("trl").setLevel(logging.ERROR)
    return CPOTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows))


def test_standard_rows_tokenize_as_trl(tmp_path, tok):
    rows = sample_rows("preference_standard")
    trainer = cpo_trainer(tmp_path, tok, rows, tiny_model("tiny-llama"))
    dm = PreferenceDataModule(rows, tokenizer=tok)
    dm.setup("fit")
    assert len(dm.train_dataset) == len(trainer.train_dataset) == len(rows)
    for i, (ex, theirs) in enumerate(zip(dm.train_dataset.to_list(), trainer.train_dataset)):
        for side in ("chosen", "rejected"):
            assert ex["prompt_ids"] + ex[f"{side}_ids"] == theirs[f"{side}_input_ids"], (i, side)
            labels = theirs[f"{side}_labels"]
            assert labels == [-100] * len(ex["prompt_ids"]) + ex[f"{side}_ids"], (i, side)


def test_alphapo_is_simpo_without_nll_in_trl_config(tmp_path):
    """What ``loss_type="alphapo"`` means in TRL's config, which ``CPOModule(loss_type="alphapo")`` mirrors."""
    from trl.experimental.cpo import CPOConfig

    args = CPOConfig(output_dir=str(tmp_path), report_to=[], loss_type="alphapo", cpo_alpha=1.0, use_cpu=True,
                     bf16=False)
    assert (args.loss_type, args.cpo_alpha) == ("simpo", 0.0)


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_matches_trl(tmp_path, tok, rows, case):
    config = CASES[case]
    trainer = cpo_trainer(tmp_path, tok, rows, sharp_model(), **config)
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    trainer.model.train()
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="train")

    module = CPOModule(sharp_model(), tokenizer=tok, optimizer=sgd(1e-3), **config)
    steps = StepMetrics()
    quiet_trainer(max_steps=1, callbacks=[steps]).fit(
        module, PreferenceDataModule(rows, tokenizer=tok, batch_size=len(rows)))
    ours = steps.steps[0]

    assert module.ref_model is None
    assert ours["loss"] == pytest.approx(trl_loss.item(), abs=1e-4)
    for name in COMPARED:
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-4), name
    if trainer.cpo_alpha > 0:
        assert ours["nll_loss"] == pytest.approx(trl_metrics["nll_loss"], abs=1e-4)
    else:
        assert trl_metrics["nll_loss"] == 0.0
        assert ours["nll_loss"] > 1.0  # logged, though not part of the loss
    assert abs(trl_metrics["rewards/margins"]) > 1e-3
