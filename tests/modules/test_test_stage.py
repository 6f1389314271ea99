"""``trainer.test`` with the preference data modules, from Python: ``test_data`` read from the split that
``test_split_name`` names, evaluated like validation (the same numbers), metrics logged under ``test/``."""

from __future__ import annotations

import datasets
import pytest
from helpers import perturb_, quiet_trainer, sample_rows

from lightning_llm import DPOModule, KTOModule, PreferenceDataModule, UnpairedPreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer

PAIR_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def policy():
    """``tiny-llama`` moved off the preset, so that the rewards against a ``tiny-llama`` reference are not zero."""
    return perturb_(tiny_model("tiny-llama"), seed=3, scale=0.05)


def splits(rows: list[dict]) -> datasets.DatasetDict:
    """Three splits of different rows: ``train``, ``holdout`` (the one the tests name) and ``test`` (the default)."""
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                                 "holdout": datasets.Dataset.from_list(rows[8:14]),
                                 "test": datasets.Dataset.from_list(rows[14:20])})


def run_test(module, data) -> dict[str, float]:
    (metrics,) = quiet_trainer().test(module, datamodule=data, verbose=False)
    return metrics


def run_validate(module, data) -> dict[str, float]:
    (metrics,) = quiet_trainer().validate(module, datamodule=data, verbose=False)
    return metrics


def test_dpo_tests_on_the_named_split_of_a_saved_dataset(tok, tmp_path):
    rows = sample_rows("preference", 20)
    splits(rows).save_to_disk(str(tmp_path / "pairs"))  # a directory with a dataset_dict.json
    module = DPOModule(policy(), tokenizer=tok, ref_model="tiny-llama")
    data = PreferenceDataModule(test_data=str(tmp_path / "pairs"), test_split_name="holdout", val_batch_size=4,
                                shuffle=False)
    metrics = run_test(module, data)
    assert len(data.test_dataset) == 6 and data.train_dataset is None and data.val_dataset is None
    assert {f"test/{name}" for name in PAIR_METRICS} <= metrics.keys()
    assert all(key.startswith("test/") for key in metrics), sorted(metrics)
    assert abs(metrics["test/rewards/margins"]) > 1e-4  # the policy differs from the reference

    # the numbers of validating on the same rows
    val = run_validate(module, PreferenceDataModule(val_data=rows[8:14], val_batch_size=4, shuffle=False))
    assert {k.removeprefix("val/") for k in val} == {k.removeprefix("test/") for k in metrics}
    for name, value in val.items():
        assert metrics["test/" + name.removeprefix("val/")] == pytest.approx(value, abs=1e-6), name

    # the default split is another one: other rows, another loss
    default = run_test(module, PreferenceDataModule(test_data=str(tmp_path / "pairs"), val_batch_size=4))
    assert default["test/loss"] != pytest.approx(metrics["test/loss"], abs=1e-6)


def test_kto_tests_on_the_named_split(tok):
    rows = sample_rows("unpaired_preference", 20)
    module = KTOModule(policy(), tokenizer=tok, ref_model="tiny-llama")
    data = UnpairedPreferenceDataModule(test_data=splits(rows), test_split_name="holdout", val_batch_size=3,
                                        shuffle=False)
    metrics = run_test(module, data)
    assert len(data.test_dataset) == 6
    assert "test/loss" in metrics and "test/kl" in metrics
    assert all(key.startswith("test/") for key in metrics), sorted(metrics)
    val = run_validate(module, UnpairedPreferenceDataModule(val_data=rows[8:14], val_batch_size=3, shuffle=False))
    assert {k.removeprefix("val/") for k in val} == {k.removeprefix("test/") for k in metrics}
    for name, value in val.items():
        assert metrics["test/" + name.removeprefix("val/")] == pytest.approx(value, abs=1e-6), name
