"""RewardModule: loss and metrics against a float64 hand computation from each sequence scored alone, learning on the
sample pairs, validation accuracy, dropout off by default, ``score`` consistent with training, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import StepMetrics, flushed, quiet_trainer, sample_rows

from lightning_llm import PreferenceDataModule, RewardModule
from lightning_llm.models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def classifier(preset: str = "tiny-llama"):
    return tiny_model(preset, task="sequence_classification", num_labels=1)


def batch_of(rows, tok, **kwargs) -> dict:
    data = PreferenceDataModule(rows, tokenizer=tok, shuffle=False, **kwargs)
    data.setup("fit")
    return data.collate(data.train_dataset.to_list())


@torch.no_grad()
def rewards_alone(model, batch) -> torch.Tensor:
    """Each sequence of a padded batch run alone (no padding, so the classifier pools its last token), float64."""
    model = model.double()
    out = []
    for ids, mask in zip(batch.sequences.input_ids, batch.sequences.attention_mask.bool()):
        out.append(model(input_ids=ids[mask][None], use_cache=False).logits[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("margin,center,global_margin", [(False, None, None), (True, 0.05, None), (False, None, 0.7),
                                                         (True, None, 0.7)],
                         ids=["plain", "margin_centered", "global_margin", "row_margins_win"])
def test_loss_and_metrics_by_hand(tok, margin, center, global_margin):
    rows = sample_rows("preference_standard", 6)
    if margin:
        for row, m in zip(rows, [0.5, -1.0, 0.0, 2.0, 0.25, 1.0]):
            row["margin"] = m
    batch = batch_of(rows, tok)
    module = RewardModule(classifier(), tokenizer=tok, center_rewards_coefficient=center, margin=global_margin,
                          loss_type="ranking")
    module.configure_model()
    module.train()
    loss = module.training_step(batch, 0)
    logged = flushed(module)

    r = rewards_alone(classifier(), batch)
    chosen, rejected = r.chunk(2)
    # a row's own margin wins over the global one, which applies where the data has none
    m = batch.margin.double() if margin else (global_margin or 0.0)
    expected = -F.logsigmoid(chosen - rejected - m).mean()
    if center:
        expected = expected + center * ((chosen + rejected) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert logged["loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert logged["accuracy"] == pytest.approx((chosen > rejected).double().mean().item())
    # the data margin is not in it
    assert logged["margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert logged["min_reward"] == pytest.approx(r.min().item(), abs=1e-5)
    assert logged["max_reward"] == pytest.approx(r.max().item(), abs=1e-5)
    assert logged["mean_reward"] == pytest.approx(r.mean().item(), abs=1e-5)
    assert logged["num_tokens"] == batch.sequences.attention_mask.sum().item()


def test_learns_and_validates(tok):
    """~20 AdamW steps on 8 pairs: the loss falls, the training accuracy rises; validation accuracy is logged as
    val/accuracy and equals the fraction of validation pairs the trained model ranks right."""
    torch.manual_seed(0)
    train, val = sample_rows("preference", 8), sample_rows("preference", 16)[8:]
    module = RewardModule("tiny-llama", tokenizer=tok, learning_rate=3e-3)
    steps = StepMetrics()
    trainer = quiet_trainer(max_steps=20, callbacks=[steps], check_val_every_n_epoch=20)
    trainer.fit(module, PreferenceDataModule(train, val_data=val, batch_size=8))
    loss, accuracy = steps.series("loss"), steps.series("accuracy")
    assert sum(loss[-3:]) / 3 < 0.5 * sum(loss[:3]) / 3
    assert accuracy[-1] == 1.0 and accuracy[0] < 1.0

    module.eval()
    with torch.no_grad():
        batch = batch_of(val, tok)
        chosen, rejected = module.rewards(batch.sequences).chunk(2)
    assert trainer.callback_metrics["val/accuracy"].item() == pytest.approx((chosen > rejected).float().mean().item())
    assert "val/loss" in trainer.callback_metrics and "val/margin" in trainer.callback_metrics


def test_dropout_is_off_by_default(tok):
    """TRL's RewardConfig(disable_dropout=True): in training mode the same pair gets the same rewards twice."""
    batch = batch_of(sample_rows("preference_standard", 3), tok)
    for disable, same in ((True, True), (False, False)):
        module = RewardModule(classifier("tiny-gpt2"), tokenizer=tok, disable_dropout=disable)  # GPT-2 has dropout
        module.configure_model()
        module.train()
        torch.manual_seed(0)
        first, second = module.rewards(batch.sequences), module.rewards(batch.sequences)
        assert torch.equal(first, second) is same


@pytest.mark.parametrize("kind", ["preference_standard", "preference"])
def test_score_matches_the_training_sequences(tok, kind):
    """``score(prompt, completion)`` reads the same sequence the model was trained on (EOS / end-of-turn included)."""
    rows = sample_rows(kind, 4)
    module = RewardModule(classifier(), tokenizer=tok)
    module.configure_model()
    module.eval()
    with torch.no_grad():
        trained_on = module.rewards(batch_of(rows, tok).sequences)
    scored = module.score([r["prompt"] for r in rows] * 2,
                          [r["chosen"] for r in rows] + [r["rejected"] for r in rows], batch_size=3)
    assert scored == pytest.approx(trained_on.tolist(), abs=1e-5)


def test_refusals(tok):
    with pytest.raises(ValueError, match="sequence classifier"):
        RewardModule(tiny_model("tiny-llama"), tokenizer=tok)
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        RewardModule(classifier(), tokenizer=tok, center_rewards_coefficient=-1.0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        RewardModule(classifier(), tokenizer=tok, loss_type="pairwise")
    for bad in (float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="margin must be a finite number"):
            RewardModule(classifier(), tokenizer=tok, margin=bad)
    module = RewardModule(classifier(), tokenizer=tok)
    module.configure_model()
    flat = batch_of(sample_rows("preference_standard", 2), tok, padding_free=True)
    with pytest.raises(ValueError, match="padded batches"):
        module.training_step(flat, 0)
