"""CPO / SimPO / AlphaPO: every loss type against float64 arithmetic written out here, gradients, validation, and
parity with TRL 1.16's ``CPOTrainer.cpo_loss`` called on a stand-in trainer."""

from __future__ import annotations

import math
import types

import pytest
import torch

from lightning_llm.losses.cpo import CPO_AVERAGE_LOGPS_LOSS_TYPES, CPO_LOSSES, alphapo_rewards, cpo_loss

CHOSEN = [-0.75, -1.5, -0.25]
REJECTED = [-1.25, -1.0, -2.0]
BETA = 2.0
EPS = 0.1
GAMMA = 0.5
NLL = 1.25


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def smoothed(z: float) -> float:
    return -(1 - EPS) * log_sigmoid(z) - EPS * log_sigmoid(-z)


def expected_preference(loss_type: str, margin: float) -> float:
    if loss_type == "sigmoid":
        return smoothed(BETA * margin)
    if loss_type == "hinge":
        return max(0.0, 1 - BETA * margin)
    if loss_type == "ipo":
        return (margin - 1 / (2 * BETA)) ** 2
    return smoothed(BETA * margin - GAMMA)  # simpo, alphapo


def run(loss_type: str, alpha: float = 0.0, cpo_alpha: float = 0.5):
    return cpo_loss(
        torch.tensor(CHOSEN, dtype=torch.float64),
        torch.tensor(REJECTED, dtype=torch.float64),
        torch.tensor(NLL, dtype=torch.float64),
        beta=BETA,
        loss_type=loss_type,
        label_smoothing=EPS,
        simpo_gamma=GAMMA,
        alpha=alpha,
        cpo_alpha=cpo_alpha,
    )


@pytest.mark.parametrize("loss_type", sorted(CPO_LOSSES))
def test_each_loss_type_matches_hand_formula(loss_type):
    out = run(loss_type)
    nll_term = 0.0 if loss_type == "alphapo" else 0.5 * NLL  # AlphaPO has no NLL term, whatever cpo_alpha says
    expected = [expected_preference(loss_type, c - r) + nll_term for c, r in zip(CHOSEN, REJECTED, strict=True)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([BETA * c for c in CHOSEN], dtype=torch.float64))
    assert out.nll_loss.item() == NLL


@pytest.mark.parametrize("loss_type", ["sigmoid", "alphapo"])
def test_alphapo_reward_shape(loss_type):
    alpha = 0.5
    out = run(loss_type, alpha=alpha)
    # r = (1 - p^-α)/α with p = exp(logp)

    def shaped(logp: float) -> float:
        return (1 - math.exp(logp) ** -alpha) / alpha

    expected = [
        expected_preference(loss_type, shaped(c) - shaped(r)) + (0.0 if loss_type == "alphapo" else 0.5 * NLL)
        for c, r in zip(CHOSEN, REJECTED, strict=True)
    ]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(
        out.rejected_rewards, torch.tensor([BETA * shaped(r) for r in REJECTED], dtype=torch.float64)
    )


def test_alphapo_rewards_tend_to_logps():
    logps = torch.tensor([-0.3, -2.0], dtype=torch.float64)
    torch.testing.assert_close(alphapo_rewards(logps, 1e-7), logps, rtol=1e-6, atol=1e-6)
    assert alphapo_rewards(logps, 0.0) is logps


def test_worked_simpo_example():
    # Δr = 0.5, β = 2, γ = 0.5: z = 0.5 and the loss is log(1 + e^-0.5) without smoothing or NLL.
    out = cpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, loss_type="simpo", cpo_alpha=0.0)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)


def test_sigmoid_gradient_closed_form():
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    cpo_loss(chosen, torch.tensor(REJECTED, dtype=torch.float64), beta=BETA, cpo_alpha=0.0).losses.sum().backward()
    # d/dπ_w [-log σ(β Δ)] = -β σ(-β Δ)
    expected = [-BETA / (1 + math.exp(BETA * (c - r))) for c, r in zip(CHOSEN, REJECTED, strict=True)]
    torch.testing.assert_close(chosen.grad, torch.tensor(expected, dtype=torch.float64))


def test_average_logps_types():
    assert {"ipo", "simpo", "alphapo"} == CPO_AVERAGE_LOGPS_LOSS_TYPES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "kto_pair"}, "Unknown `loss_type`.*'simpo'"),
        ({"beta": -1.0}, "`beta`"),
        ({"label_smoothing": 0.6}, "`label_smoothing`"),
        ({"cpo_alpha": -0.5}, "`cpo_alpha`"),
        ({"nll_loss": None}, "`nll_loss` is required"),
        ({"nll_loss": torch.ones(2)}, "scalar"),
        ({"rejected_logps": torch.zeros(4)}, "`rejected_logps`"),
    ],
)
def test_validation_errors(kwargs, message):
    arguments = {"chosen_logps": torch.zeros(3), "rejected_logps": torch.zeros(3), "nll_loss": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        cpo_loss(**arguments)


def test_nll_not_required_without_the_term():
    out = cpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), cpo_alpha=0.0)
    assert out.nll_loss.item() == 0.0
    out = cpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), loss_type="alphapo")
    assert out.nll_loss.item() == 0.0


@pytest.mark.parametrize(
    ("loss_type", "alpha", "label_smoothing"),
    [
        ("sigmoid", 0.0, 0.0),
        ("sigmoid", 0.0, 0.2),
        ("hinge", 0.0, 0.0),
        ("ipo", 0.0, 0.0),
        ("simpo", 0.0, 0.1),
        ("sigmoid", 0.3, 0.0),
        ("alphapo", 0.25, 0.0),
    ],
)
def test_parity_with_trl(loss_type, alpha, label_smoothing):
    cpo_module = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(16) * 4, -torch.rand(16) * 4
    beta, gamma, cpo_alpha, nll = 0.2, 0.7, 1.0, torch.tensor(2.25)
    # TRL's CPOConfig turns "alphapo" into "simpo" with cpo_alpha = 0.
    trl_type, trl_cpo_alpha = ("simpo", 0.0) if loss_type == "alphapo" else (loss_type, cpo_alpha)
    stand_in = types.SimpleNamespace(
        beta=beta,
        loss_type=trl_type,
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
        alpha=alpha,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )
    trl_losses, trl_chosen, trl_rejected = cpo_module.CPOTrainer.cpo_loss(stand_in, chosen, rejected)
    trl_loss = trl_losses.mean() + trl_cpo_alpha * nll

    out = cpo_loss(
        chosen,
        rejected,
        nll,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
        alpha=alpha,
        cpo_alpha=cpo_alpha,
    )
    assert out.losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6, rel=1e-6)
    torch.testing.assert_close(out.losses - trl_cpo_alpha * nll, trl_losses, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected, atol=1e-6, rtol=1e-6)
