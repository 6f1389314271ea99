"""Reward-model loss: hand-computed Bradley-Terry values, gradients, validation, and parity with TRL 1.16's
``RewardTrainer.compute_loss`` driven by a stand-in model."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from lightning_llm.losses.reward import reward_loss

CHOSEN = [1.5, -0.5, 2.0]
REJECTED = [0.5, 0.25, 2.5]
MARGIN = [0.25, 0.0, 1.0]


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def test_plain_bradley_terry():
    out = reward_loss(torch.tensor(CHOSEN, dtype=torch.float64), torch.tensor(REJECTED, dtype=torch.float64))
    # -log σ(d) = log(1 + e^-d) with d = 1.0, -0.75, -0.5
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.75)), math.log1p(math.exp(0.5))]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(out.margins, torch.tensor([1.0, -0.75, -0.5], dtype=torch.float64))
    torch.testing.assert_close(out.accuracies, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out.rewards, torch.tensor(CHOSEN + REJECTED, dtype=torch.float64))


def test_margin_and_centering():
    coefficient = 0.01
    out = reward_loss(
        torch.tensor(CHOSEN, dtype=torch.float64),
        torch.tensor(REJECTED, dtype=torch.float64),
        margin=torch.tensor(MARGIN, dtype=torch.float64),
        center_rewards_coefficient=coefficient,
    )
    expected = [
        softplus(-(c - r - m)) + coefficient * (c + r) ** 2 for c, r, m in zip(CHOSEN, REJECTED, MARGIN, strict=True)
    ]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    # The margin changes the loss, never the logged reward margin.
    torch.testing.assert_close(out.margins, torch.tensor([1.0, -0.75, -0.5], dtype=torch.float64))


def test_gradient_closed_form():
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    coefficient = 0.1
    reward_loss(chosen, rejected, center_rewards_coefficient=coefficient).losses.sum().backward()
    # d/dr_w [-log σ(r_w - r_l) + c (r_w + r_l)²] = -σ(r_l - r_w) + 2c (r_w + r_l)
    expected_chosen = [
        -1 / (1 + math.exp(c - r)) + 2 * coefficient * (c + r) for c, r in zip(CHOSEN, REJECTED, strict=True)
    ]
    expected_rejected = [
        1 / (1 + math.exp(c - r)) + 2 * coefficient * (c + r) for c, r in zip(CHOSEN, REJECTED, strict=True)
    ]
    torch.testing.assert_close(chosen.grad, torch.tensor(expected_chosen, dtype=torch.float64))
    torch.testing.assert_close(rejected.grad, torch.tensor(expected_rejected, dtype=torch.float64))


def test_bf16_rewards_are_upcast():
    out = reward_loss(torch.tensor(CHOSEN, dtype=torch.bfloat16), torch.tensor(REJECTED, dtype=torch.bfloat16))
    assert out.losses.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rejected_rewards": torch.zeros(2)}, "`rejected_rewards`"),
        ({"margin": torch.zeros(4)}, "`margin`"),
        ({"center_rewards_coefficient": -0.1}, "`center_rewards_coefficient`"),
        ({"chosen_rewards": torch.zeros(3, 1)}, "1-D"),
    ],
)
def test_validation_errors(kwargs, message):
    arguments = {"chosen_rewards": torch.zeros(3), "rejected_rewards": torch.zeros(3)} | kwargs
    with pytest.raises(ValueError, match=message):
        reward_loss(**arguments)


@pytest.mark.parametrize(("with_margin", "coefficient"), [(False, None), (True, 0.05)])
def test_parity_with_trl(with_margin, coefficient):
    trainer_module = pytest.importorskip("trl.trainer.reward_trainer")
    torch.manual_seed(0)
    batch = 5
    logits = torch.randn(2 * batch, 1) * 2  # the sequence classifier's output, chosen rows first
    margin = torch.rand(batch)

    def model(**kwargs):
        return types.SimpleNamespace(logits=logits)

    model.training = True
    identity = lambda x: x  # single process: every gather is the identity
    stand_in = types.SimpleNamespace(
        model=model,
        args=types.SimpleNamespace(center_rewards_coefficient=coefficient),
        accelerator=types.SimpleNamespace(gather=identity, gather_for_metrics=identity),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(2 * batch, 4, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = margin
    trl_loss = trainer_module.RewardTrainer.compute_loss(stand_in, model, inputs)
    metrics = stand_in._metrics["train"]

    chosen, rejected = logits.squeeze(-1).chunk(2)
    out = reward_loss(chosen, rejected, margin if with_margin else None, coefficient)
    assert out.losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert out.accuracies.mean().item() == pytest.approx(metrics["accuracy"][0], abs=1e-6)
    assert out.margins.mean().item() == pytest.approx(metrics["margin"][0], abs=1e-6)
    assert out.rewards.min().item() == pytest.approx(metrics["min_reward"][0], abs=1e-6)
    assert out.rewards.mean().item() == pytest.approx(metrics["mean_reward"][0], abs=1e-6)
    assert out.rewards.max().item() == pytest.approx(metrics["max_reward"][0], abs=1e-6)
