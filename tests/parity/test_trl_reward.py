"""RewardModule against TRL 1.16's RewardTrainer on the same tiny sequence classifier and data: the first-step loss,
accuracy, margin and min/mean/max reward within 1e-4, without and with a margin column, with
``center_rewards_coefficient``, and on a preset with dropout (TRL turns dropout off by default; so must we)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")

from _trl_helpers import assert_metrics_close, build_trl_trainer, module_step, trl_batch, trl_step
from helpers import sample_rows
from trl import RewardConfig, RewardTrainer

from lightning_llm import PreferenceDataModule, RewardModule
from lightning_llm.models import tiny_model, tiny_tokenizer

METRICS = ["loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward"]
MARGINS = [0.0, 0.5, 1.0, -0.5, 2.0, 0.25, 0.0, 1.5, -1.0, 0.75, 0.1, 3.0]


def rows(with_margin: bool) -> list[dict]:
    out = sample_rows("preference", len(MARGINS))
    if with_margin:
        for row, margin in zip(out, MARGINS):
            row["margin"] = margin
    return out


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def trainers(tok, tmp_path_factory):
    """One TRL trainer per (preset, margin column); the centring coefficient is swapped on ``args`` per case."""
    built = {}
    for preset in ("tiny-llama", "tiny-gpt2"):
        for with_margin in (False, True):
            model = tiny_model(preset, task="sequence_classification", num_labels=1)
            trainer = build_trl_trainer(RewardTrainer, RewardConfig, model, tok, rows(with_margin),
                                        tmp_path_factory.mktemp("trl_reward"))
            built[preset, with_margin] = trainer
    return built


def our_batch(tok, with_margin: bool) -> dict:
    data = PreferenceDataModule(rows(with_margin), tokenizer=tok, batch_size=len(MARGINS), shuffle=False)
    data.setup("fit")
    return data.collate(data.train_dataset.to_list())


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("with_margin", [False, True], ids=["no_margin", "margin"])
@pytest.mark.parametrize("center", [None, 0.01], ids=["plain", "centered"])
def test_first_step_matches_trl(tok, trainers, preset, with_margin, center):
    trainer = trainers[preset, with_margin]
    trainer.args.center_rewards_coefficient = center
    trl_inputs = trl_batch(trainer)
    batch = our_batch(tok, with_margin)
    for key in ("input_ids", "attention_mask"):  # TRL tokenizes prompt + completion whole; so do we
        assert torch.equal(getattr(batch.sequences, key), trl_inputs[key]), key
    if with_margin:
        assert torch.equal(batch.margin, trl_inputs["margin"])
    theirs = trl_step(trainer, copy.copy(trl_inputs))  # TRL adds use_cache to its inputs
    module = RewardModule(tiny_model(preset, task="sequence_classification", num_labels=1), tokenizer=tok,
                          center_rewards_coefficient=center)
    ours = module_step(module, batch)
    assert_metrics_close(ours, theirs, METRICS, context=f"{preset}, margin={with_margin}, center={center}")
    # not a degenerate comparison: the random score heads spread the rewards and get some pairs wrong
    assert ours["max_reward"] - ours["min_reward"] > 1e-2 and 0.0 < ours["accuracy"] < 1.0
