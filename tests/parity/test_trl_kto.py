"""KTOModule and UnpairedPreferenceDataModule against TRL 1.16's ``KTOTrainer`` on the same tiny model and data.

* Data: TRL's prepared dataset (prompt extraction, unpairing, EOS, tokenization, KL completions rotated by one within
  blocks of ``per_device_train_batch_size``) equals our prepared examples, on every shipped sample that KTO takes.
* First step: the whole dataset as one batch (TRL's KL term needs sequential sampling and a batch > 1; our batch is
  TRL's batch, KL rotation included, which is checked tensor by tensor), the policy perturbed away from the
  reference; loss, ``kl``, ``rewards/*``, ``logps/*``, ``logits/*`` and ``entropy`` within 1e-4 for ``kto`` (with class
  weights) and ``apo_zero_unpaired``.
* Several sequential batches: TRL's data loader and ours give the same batches and the same per-batch losses.
* Precomputed reference log-probs: the same values as TRL's precomputed columns, and the same first-step loss.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from helpers import StepMetrics, as_dict, perturbed_policy_model, quiet_trainer, sample_rows, sgd, sharp_reference_model

from lightning_llm.data.unpaired import UnpairedPreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.kto import KTOModule

COMPARED = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "logits/chosen", "logits/rejected", "entropy")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


reference_model = sharp_reference_model
policy_model = perturbed_policy_model


def kto_trainer(tmp_path, tok, rows, batch_size, policy=None, ref=None, **config):
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, per_device_train_batch_size=batch_size,
                     bf16=False, use_cpu=True, train_sampling_strategy="sequential", **config)
    logging.getLogger("trl").setLevel(logging.ERROR)
    return KTOTrainer(model=policy or policy_model(), ref_model=ref or reference_model(), args=args,
                      processing_class=tok, train_dataset=Dataset.from_list(rows))


def our_data(tok, rows, batch_size, **kwargs) -> UnpairedPreferenceDataModule:
    dm = UnpairedPreferenceDataModule(rows, tokenizer=tok, batch_size=batch_size, shuffle=False, **kwargs)
    dm.setup("fit")
    return dm


def trl_batch_metrics(trainer, batch):
    trainer.model.train()
    trainer._metrics["train"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def assert_same_batch(ours, theirs: dict) -> None:
    ours = as_dict(ours)
    for key, value in theirs.items():
        assert torch.equal(ours[key.replace("KL_", "kl_")], value), key


@pytest.mark.parametrize("sample", ["unpaired_preference", "preference", "preference_implicit",
                                    "preference_standard"])
def test_prepared_examples_match_trl(tmp_path, tok, sample):
    rows = sample_rows(sample)
    trainer = kto_trainer(tmp_path, tok, rows, batch_size=4, policy=tiny_model("tiny-llama"),
                          ref=tiny_model("tiny-llama"))
    ours = our_data(tok, rows, batch_size=4).train_dataset.to_list()
    theirs = trainer.train_dataset
    assert len(ours) == len(theirs)
    for i, (ex, row) in enumerate(zip(ours, theirs)):
        assert ex["prompt_ids"] == row["prompt_ids"], i
        assert ex["completion_ids"] == row["completion_ids"], i
        assert ex["kl_completion_ids"] == row["KL_completion_ids"], i
        assert ex["label"] == row["label"], i


CASES = {
    "kto-weighted": {"loss_type": "kto", "beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.7},
    "kto": {"loss_type": "kto", "beta": 0.1},
    "apo_zero_unpaired": {"loss_type": "apo_zero_unpaired", "beta": 0.2, "undesirable_weight": 1.3},
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_matches_trl(tmp_path, tok, case):
    config = CASES[case]
    rows = sample_rows("unpaired_preference", 12)
    trainer = kto_trainer(tmp_path, tok, rows, batch_size=len(rows), **config)
    dataset = trainer.train_dataset
    trl_batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    trl_loss, trl_metrics = trl_batch_metrics(trainer, trl_batch)

    dm = our_data(tok, rows, batch_size=len(rows), kl_pairs=config["loss_type"] == "kto")
    assert_same_batch(dm.collate(dm.train_dataset.to_list()), {
        k: v for k, v in trl_batch.items() if config["loss_type"] == "kto" or not k.startswith("KL_")})
    module = KTOModule(policy_model(), tokenizer=tok, ref_model=reference_model(), optimizer=sgd(1e-3), **config)
    steps = StepMetrics()
    quiet_trainer(max_steps=1, callbacks=[steps]).fit(module, dm)
    ours = steps.steps[0]

    assert ours["loss"] == pytest.approx(trl_loss, abs=1e-4)
    for name in COMPARED:
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-4), name
    if config["loss_type"] == "kto":
        assert trl_metrics["kl"] > 1e-2  # the policy really differs from the reference
    else:
        assert trl_metrics["kl"] == 0.0
    assert abs(trl_metrics["rewards/chosen"]) > 1e-3 and abs(trl_metrics["rewards/rejected"]) > 1e-3


def test_sequential_batches_match_trl(tmp_path, tok):
    """Three batches of 4: TRL's sequential loader and ours give the same tensors (each batch's KL completions are
    its own completions rotated by one) and the same losses."""
    rows = sample_rows("unpaired_preference", 12)
    config = {"loss_type": "kto", "beta": 0.5, "undesirable_weight": 2.0}
    trainer = kto_trainer(tmp_path, tok, rows, batch_size=4, **config)
    dm = our_data(tok, rows, batch_size=4)
    module = KTOModule(policy_model(), tokenizer=tok, ref_model=reference_model(), **config)
    module.configure_model()
    theirs = list(trainer.get_train_dataloader())
    ours = list(dm.train_dataloader())
    assert len(theirs) == len(ours) == 3
    for trl_batch, batch in zip(theirs, ours):
        assert_same_batch(batch, trl_batch)
        trl_loss, trl_metrics = trl_batch_metrics(trainer, trl_batch)
        with torch.no_grad():
            loss = module.compute_loss(batch)
        metrics = module.flush_metrics("train")
        assert loss.item() == pytest.approx(trl_loss, abs=1e-4)
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"], abs=1e-4)


def test_precomputed_reference_matches_trl(tmp_path, tok):
    rows = sample_rows("unpaired_preference", 12)
    config = {"loss_type": "kto", "beta": 0.3, "precompute_ref_log_probs": True}
    trainer = kto_trainer(tmp_path, tok, rows, batch_size=6, **config)
    dataset = trainer.train_dataset
    first = trainer.data_collator([dataset[i] for i in range(6)])
    trl_loss, _ = trl_batch_metrics(trainer, first)

    dm = UnpairedPreferenceDataModule(rows, tokenizer=tok, batch_size=6, shuffle=False)
    module = KTOModule(policy_model(), tokenizer=tok, ref_model=reference_model(), optimizer=sgd(1e-3), **config)
    steps = StepMetrics()
    quiet_trainer(max_steps=1, callbacks=[steps]).fit(module, dm)
    assert module.ref_model is None  # released after the precompute
    examples = dm.train_dataset.to_list()
    assert [ex["ref_logps"] for ex in examples] == pytest.approx(dataset["ref_logps"], abs=1e-4)
    assert [ex["ref_kl_logps"] for ex in examples] == pytest.approx(dataset["ref_KL_logps"], abs=1e-4)
    assert steps.steps[0]["loss"] == pytest.approx(trl_loss, abs=1e-4)


def test_truncated_batches_match_trl(tmp_path, tok):
    """max_length below most sequences: TRL drops the examples whose prompt alone fills it and cuts the rest from the
    right in its collator; our keep_start truncation gives the same examples and the same batch tensors."""
    rows = sample_rows("unpaired_preference", 12)
    rows[4] = dict(rows[4], prompt=[{"role": "user", "content": "Tell me, what is " + "one plus one and " * 6 + "?"}])
    max_length = 20
    trainer = kto_trainer(tmp_path, tok, rows, batch_size=4, max_length=max_length, policy=tiny_model("tiny-llama"),
                          ref=tiny_model("tiny-llama"))
    dm = our_data(tok, rows, batch_size=4, max_length=max_length)
    assert len(dm.train_dataset) == len(trainer.train_dataset) == len(rows) - 1
    assert dm.reports["train_data"].dropped == {"prompt alone fills max_length": [4]}
    batches = list(trainer.get_train_dataloader())
    assert any(batch["input_ids"].shape[1] == max_length for batch in batches)
    for trl_batch, batch in zip(batches, dm.train_dataloader()):
        assert_same_batch(batch, trl_batch)
