"""BCO: hand-computed losses with and without UDM weights, the density-ratio weights, gradients and validation.

TRL 1.16 ships no BCO trainer (it left ``trl.experimental`` before that release), so the references are the
formulas of the paper / TRL's last BCO implementation, worked out here in float64."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_llm.losses.bco import bco_loss, bco_rewards, bco_udm_weights

POLICY = [-10.0, -22.5, -8.0, -15.0]
REFERENCE = [-11.0, -21.0, -8.5, -13.0]
LABELS = [True, False, True, False]
BETA = 0.5
DELTA = 0.125


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def run(**kwargs):
    return bco_loss(
        torch.tensor(POLICY, dtype=torch.float64),
        torch.tensor(REFERENCE, dtype=torch.float64),
        torch.tensor(LABELS),
        DELTA,
        beta=BETA,
        **kwargs,
    )


def test_hand_values():
    out = run()
    # rewards β·(π - π_ref) = 0.5, -0.75, 0.25, -1.0
    # desirable: -log σ(r - δ) = softplus(δ - r); undesirable: -log σ(-(r - δ)) = softplus(r - δ)
    expected = [softplus(DELTA - 0.5), softplus(-0.75 - DELTA), softplus(DELTA - 0.25), softplus(-1.0 - DELTA)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.75, -1.0], dtype=torch.float64))
    assert out.delta.item() == DELTA


def test_udm_weights_apply_to_undesirable_only():
    weights = torch.tensor([7.0, 2.0, 9.0, 0.5], dtype=torch.float64)  # entries 0 and 2 (desirable) are not read
    out = run(udm_weights=weights)
    plain = run().losses
    torch.testing.assert_close(out.losses, plain * torch.tensor([1.0, 2.0, 1.0, 0.5], dtype=torch.float64))


def test_udm_density_ratio_weights():
    prob = torch.tensor([0.5, 0.2, 0.95, 0.01, 1.0])
    # p/(1-p): 1, 0.25 -> clipped to 0.5, 19 -> clipped to 10, 0.0101 -> 0.5, 1e8 -> 10
    torch.testing.assert_close(bco_udm_weights(prob), torch.tensor([1.0, 0.5, 10.0, 0.5, 10.0]))
    torch.testing.assert_close(bco_udm_weights(prob, 0.0, 100.0)[:2], torch.tensor([1.0, 0.25]))


def test_gradient_closed_form_and_constant_delta():
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    delta = torch.tensor(DELTA, dtype=torch.float64, requires_grad=True)
    out = bco_loss(policy, torch.tensor(REFERENCE, dtype=torch.float64), torch.tensor(LABELS), delta, beta=BETA)
    out.losses.sum().backward()
    # desirable: d/dπ softplus(δ - r) = -β σ(δ - r); undesirable: d/dπ softplus(r - δ) = β σ(r - δ)
    expected = []
    for p, q, desirable in zip(POLICY, REFERENCE, LABELS, strict=True):
        r = BETA * (p - q)
        expected.append(-BETA / (1 + math.exp(r - DELTA)) if desirable else BETA / (1 + math.exp(DELTA - r)))
    torch.testing.assert_close(policy.grad, torch.tensor(expected, dtype=torch.float64))
    assert delta.grad is None  # δ is a running statistic, not a parameter


def test_rewards_helper():
    rewards = bco_rewards(torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5]), beta=0.2)
    torch.testing.assert_close(rewards, torch.tensor([0.2, -0.1]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "`beta`"),
        ({"delta": torch.zeros(2)}, "scalar"),
        ({"labels": torch.tensor([True])}, "`labels`"),
        ({"udm_weights": torch.ones(3)}, "`udm_weights`"),
        ({"policy_logps": torch.zeros(4, 1)}, "1-D"),
    ],
)
def test_validation_errors(kwargs, message):
    arguments = {
        "policy_logps": torch.zeros(4),
        "ref_logps": torch.zeros(4),
        "labels": torch.tensor(LABELS),
        "delta": 0.0,
    } | kwargs
    with pytest.raises(ValueError, match=message):
        bco_loss(**arguments)


def test_udm_validation_errors():
    with pytest.raises(ValueError, match="`min_density_ratio`"):
        bco_udm_weights(torch.tensor([0.5]), 2.0, 1.0)
    with pytest.raises(ValueError, match="`prob_desirable`"):
        bco_udm_weights(torch.tensor([1.5]))
