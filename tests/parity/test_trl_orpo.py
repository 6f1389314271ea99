"""ORPOModule against TRL 1.16's ``trl.experimental.orpo.ORPOTrainer`` on the same tiny model and data.

The old ORPO trainer tokenizes rows itself (``tokenize_row``: prompt and prompt+answer tokenized without special
tokens, BOS prepended when the tokenizer has one, EOS id appended when the answer does not end with it). On standard
data with the shipped tokenizer (no BOS) that gives exactly our sequences, which is checked first; the two places
where it does not are pinned down by their own tests (a tokenizer with a BOS token; conversational data).

Metric definitions that differ (not compared): TRL's ``logits/chosen``/``logits/rejected`` are the mean over every
vocabulary logit of every position of the chosen/rejected rows, prompt and padding included; ours are the mean over
the completion tokens only (as TRL's DPO/KTO). TRL's ORPO logs no ``entropy`` or ``mean_token_accuracy``.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from helpers import StepMetrics, quiet_trainer, sample_rows, sgd

from lightning_llm.data.preference import PreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.orpo import ORPOModule

COMPARED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def sharp_model(seed: int = 3) -> torch.nn.Module:
    """The tiny llama with a scaled-up LM head, so that log-probs spread (a fresh random model is nearly uniform and
    chosen/rejected would differ only in the noise)."""
    model = tiny_model("tiny-llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def orpo_trainer(tmp_path, tok, rows, model, **config):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, per_device_train_batch_size=len(rows),
                      bf16=False, use_cpu=True, max_length=512, **config)
    logging.getLogger("trl").setLevel(logging.ERROR)
    return ORPOTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows))


def our_examples(tok, rows, **kwargs):
    dm = PreferenceDataModule(rows, tokenizer=tok, batch_size=len(rows), **kwargs)
    dm.setup("fit")
    return dm.train_dataset.to_list()


def trl_first_step(trainer):
    """Loss and metrics of TRL's training step on the whole dataset as one batch (before any update)."""
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    trainer.model.train()
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="train")
    return loss.item(), metrics


def our_first_step(module, tok, rows, **data_kwargs):
    """Loss and metrics logged at the first optimizer step of a Lightning fit on the whole dataset as one batch."""
    dm = PreferenceDataModule(rows, tokenizer=tok, batch_size=len(rows), **data_kwargs)
    steps = StepMetrics()
    quiet_trainer(max_steps=1, callbacks=[steps]).fit(module, dm)
    assert len(steps.steps) == 1
    return steps.steps[0]


def test_standard_rows_tokenize_as_trl(tmp_path, tok):
    """Every row of the standard sample: TRL's chosen/rejected sequences, prompt lengths and labels are ours."""
    rows = sample_rows("preference_standard")
    trainer = orpo_trainer(tmp_path, tok, rows, tiny_model("tiny-llama"))
    ours = our_examples(tok, rows)
    assert len(ours) == len(trainer.train_dataset) == len(rows)
    for i, (ex, theirs) in enumerate(zip(ours, trainer.train_dataset)):
        prompt_len = len(ex["prompt_ids"])
        for side in ("chosen", "rejected"):
            assert ex["prompt_ids"] + ex[f"{side}_ids"] == theirs[f"{side}_input_ids"], (i, side)
            assert theirs[f"{side}_labels"][:prompt_len] == [-100] * prompt_len, (i, side)
            assert theirs[f"{side}_labels"][prompt_len:] == ex[f"{side}_ids"], (i, side)
        assert ex["prompt_ids"] == theirs["prompt_input_ids"], i
        assert ex["chosen_ids"][-1] == tok.eos_token_id


def test_trl_prepends_bos_that_we_do_not_add(tmp_path, tok):
    """Where the old tokenization differs, 1: a tokenizer with a BOS token its encoding does not add. TRL's
    ``tokenize_row`` prepends it anyway; we tokenize as the tokenizer does (TRL's DPO/KTO convention)."""
    bos_tok = copy.deepcopy(tok)
    bos_tok.bos_token = "<|im_start|>"
    rows = sample_rows("preference_standard", 4)
    trainer = orpo_trainer(tmp_path, bos_tok, rows, tiny_model("tiny-llama"))
    for ex, theirs in zip(our_examples(bos_tok, rows), trainer.train_dataset):
        assert ex["prompt_ids"][0] != bos_tok.bos_token_id
        assert theirs["chosen_input_ids"] == [bos_tok.bos_token_id] + ex["prompt_ids"] + ex["chosen_ids"]


def test_trl_appends_a_second_eos_on_conversations(tmp_path, tok):
    """Where the old tokenization differs, 2: conversational rows. TRL renders them to text with the chat template
    (the answer then ends with ``<|im_end|>\\n``) and appends the EOS id because the last token is not EOS; we keep the
    template's rendering, which already closes the turn."""
    rows = sample_rows("preference", 4)
    trainer = orpo_trainer(tmp_path, tok, rows, tiny_model("tiny-llama"))
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for ex, theirs in zip(our_examples(tok, rows), trainer.train_dataset):
        assert ex["chosen_ids"][-1 - len(newline):] == [tok.eos_token_id] + newline
        assert theirs["chosen_input_ids"] == ex["prompt_ids"] + ex["chosen_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_first_step_matches_trl(tmp_path, tok, beta):
    rows = sample_rows("preference_standard", 10)
    trainer = orpo_trainer(tmp_path, tok, rows, sharp_model(), beta=beta)
    trl_loss, trl_metrics = trl_first_step(trainer)
    module = ORPOModule(sharp_model(), tokenizer=tok, beta=beta, optimizer=sgd(1e-3))
    ours = our_first_step(module, tok, rows)
    assert module.ref_model is None
    assert ours["loss"] == pytest.approx(trl_loss, abs=1e-4)
    for name in COMPARED:
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-4), name
    # the data is discriminative enough for the comparison to mean something
    assert abs(trl_metrics["rewards/margins"]) > 1e-2
    assert 0.0 < trl_metrics["rewards/accuracies"] < 1.0


def test_padding_free_first_step_matches_trl(tmp_path, tok):
    """The padding-free batch (one packed row, NLL over the chosen sequences picked by ``seq_index``) gives TRL's
    numbers too."""
    rows = sample_rows("preference_standard", 10)
    trl_loss, trl_metrics = trl_first_step(orpo_trainer(tmp_path, tok, rows, sharp_model(), beta=0.3))
    module = ORPOModule(sharp_model(), tokenizer=tok, beta=0.3, optimizer=sgd(1e-3))
    ours = our_first_step(module, tok, rows, padding_free=True)
    assert ours["loss"] == pytest.approx(trl_loss, abs=1e-4)
    for name in COMPARED:
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-4), name
