"""ORPO loss: hand-computed odds ratios, log1mexp accuracy against float64, validation, and parity with TRL 1.16's
``ORPOTrainer.odds_ratio_loss`` called on a stand-in trainer."""

from __future__ import annotations

import math
import types

import pytest
import torch

from lightning_llm.losses.orpo import log1mexp, orpo_loss

# Average per-token log-probs (so probabilities are P = exp(logp) in (0, 1)).
CHOSEN = [-0.5, -1.25, -0.05]
REJECTED = [-1.0, -0.75, -2.5]
BETA = 0.25
NLL = 0.875


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def log_odds(logp: float) -> float:
    p = math.exp(logp)
    return math.log(p / (1 - p))


def test_hand_values():
    out = orpo_loss(torch.tensor(CHOSEN, dtype=torch.float64), torch.tensor(REJECTED, dtype=torch.float64), NLL, BETA)
    ratios = [log_odds(c) - log_odds(r) for c, r in zip(CHOSEN, REJECTED, strict=True)]
    torch.testing.assert_close(out.log_odds_chosen, torch.tensor(ratios, dtype=torch.float64))
    torch.testing.assert_close(out.log_odds_ratio, torch.tensor([log_sigmoid(x) for x in ratios], dtype=torch.float64))
    expected = [NLL - BETA * log_sigmoid(x) for x in ratios]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([BETA * c for c in CHOSEN], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([BETA * r for r in REJECTED], dtype=torch.float64))
    torch.testing.assert_close((out.chosen_rewards > out.rejected_rewards).float(), torch.tensor([1.0, 0.0, 1.0]))
    assert out.nll_loss.item() == NLL


def test_worked_example_equal_likelihoods():
    # P(y_w) = P(y_l) makes the odds ratio 1: log OR = 0 and the penalty is -β log σ(0) = β log 2.
    out = orpo_loss(torch.tensor([-0.7]), torch.tensor([-0.7]), 0.0, beta=0.5)
    assert out.log_odds_chosen.item() == pytest.approx(0.0, abs=1e-7)
    assert out.losses.item() == pytest.approx(0.5 * math.log(2), rel=1e-6)


def test_gradient_closed_form():
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    orpo_loss(chosen, torch.tensor(REJECTED, dtype=torch.float64), NLL, BETA).losses.sum().backward()
    # d log odds / d logp = 1 + p/(1-p) = 1/(1-p); d[-β log σ(z)]/dz = -β σ(-z).
    expected = []
    for c, r in zip(CHOSEN, REJECTED, strict=True):
        z = log_odds(c) - log_odds(r)
        expected.append(-BETA / (1 + math.exp(z)) / (1 - math.exp(c)))
    torch.testing.assert_close(chosen.grad, torch.tensor(expected, dtype=torch.float64))


def test_log1mexp_is_accurate_across_the_branch_point():
    x = torch.tensor([-1e-9, -1e-4, -0.5, -math.log(2), -0.7, -5.0, -40.0], dtype=torch.float32)
    mpmath = pytest.importorskip("mpmath")  # 50-digit arithmetic, where log(1 - e^x) needs no care
    with mpmath.workdps(50):
        exact = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.double().tolist()]
    reference = torch.tensor(exact, dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x).double(), reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "`beta`"),
        ({"rejected_logps": torch.full((2,), -1.0)}, "`rejected_logps`"),
        ({"nll_loss": torch.ones(3)}, "scalar"),
        ({"chosen_logps": torch.full((3, 1), -1.0)}, "1-D"),
    ],
)
def test_validation_errors(kwargs, message):
    arguments = {
        "chosen_logps": torch.full((3,), -1.0),
        "rejected_logps": torch.full((3,), -2.0),
        "nll_loss": 1.0,
    } | kwargs
    with pytest.raises(ValueError, match=message):
        orpo_loss(**arguments)


def test_parity_with_trl():
    orpo_module = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    torch.manual_seed(0)
    chosen = -torch.rand(16) * 3 - 1e-3
    rejected = -torch.rand(16) * 3 - 1e-3
    beta = 0.1
    stand_in = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = orpo_module.ORPOTrainer.odds_ratio_loss(
        stand_in, chosen, rejected
    )
    nll = torch.tensor(1.7)
    out = orpo_loss(chosen, rejected, nll, beta)
    # TRL returns +β log σ(·) and forms the loss as nll - mean(·).
    torch.testing.assert_close(out.losses, nll - trl_losses, atol=1e-6, rtol=1e-6)
    assert out.losses.mean().item() == pytest.approx((nll - trl_losses.mean()).item(), abs=1e-6)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected, atol=1e-6, rtol=1e-6)
    assert out.log_odds_ratio.mean().item() == pytest.approx(trl_ratio.item(), abs=1e-6)
    assert out.log_odds_chosen.mean().item() == pytest.approx(trl_log_odds.item(), abs=1e-6)
