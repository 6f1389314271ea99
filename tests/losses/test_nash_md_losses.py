"""The Nash-MD loss pieces (``lightning_llm.losses.nash_md``) against values worked out by hand: the geometric
mixture's log-probs, the Bradley-Terry preference, the REINFORCE loss with its 1/2 control variate and its KL term
(values and gradients, padding ignored), TRL 1.13's metrics, and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_llm.losses.nash_md import (
    check_nash_md_arguments,
    geometric_mixture_logps,
    nash_md_loss,
    nash_md_metrics,
    nash_md_probability,
)


def log_softmax(values: list[float]) -> list[float]:
    normaliser = math.log(sum(math.exp(v) for v in values))
    return [v - normaliser for v in values]


# ------------------------------------------------------------------------------------------------------ the mixture
def test_the_mixture_is_the_log_softmax_of_the_weighted_logits():
    policy = torch.tensor([[0.0, 1.0, 2.0]])
    reference = torch.tensor([[2.0, 0.0, 0.0]])
    # 0.25 · [2, 0, 0] + 0.75 · [0, 1, 2] = [0.5, 0.75, 1.5]
    expected = torch.tensor([log_softmax([0.5, 0.75, 1.5])])
    torch.testing.assert_close(geometric_mixture_logps(policy, reference, 0.25), expected, rtol=0, atol=1e-6)


def test_the_ends_of_the_mixture_are_the_two_models():
    policy, reference = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    torch.testing.assert_close(geometric_mixture_logps(policy, reference, 0.0), torch.log_softmax(policy, -1))
    torch.testing.assert_close(geometric_mixture_logps(policy, reference, 1.0), torch.log_softmax(reference, -1))


def test_the_mixture_of_half_precision_logits_is_float32():
    out = geometric_mixture_logps(torch.zeros(1, 3, dtype=torch.bfloat16), torch.zeros(1, 3, dtype=torch.bfloat16), 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 3), -math.log(3)))


@pytest.mark.parametrize(("coef", "shapes", "message"), [
    (1.5, ((1, 3), (1, 3)), r"\[0, 1\]"),
    (0.5, ((1, 3), (1, 4)), "shape"),
])
def test_the_mixture_refuses_bad_input(coef, shapes, message):
    with pytest.raises(ValueError, match=message):
        geometric_mixture_logps(torch.zeros(shapes[0]), torch.zeros(shapes[1]), coef)


# ------------------------------------------------------------------------------------------------- the preference
def test_the_preference_is_the_sigmoid_of_the_score_difference():
    probability = nash_md_probability(torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.5]))
    expected = torch.tensor([1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(0.3))])
    torch.testing.assert_close(probability, expected)
    assert not probability.requires_grad


def test_the_preference_needs_two_score_vectors_of_one_shape():
    with pytest.raises(ValueError, match=r"\[B\]"):
        nash_md_probability(torch.zeros(2), torch.zeros(3))


# -------------------------------------------------------------------------------------------------------- the loss
def worked_example():
    """Two completions of 2 and 3 tokens (row 0 padded: its third position holds garbage on both sides)."""
    logps = torch.tensor([[-1.0, -2.0, 100.0], [-0.5, -1.5, -1.0]], requires_grad=True)
    ref_logps = torch.tensor([[-1.5, -1.25, -float("inf")], [-0.5, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    probability = torch.tensor([0.8, 0.3])
    return logps, ref_logps, mask, probability


def test_the_loss_by_hand():
    logps, ref_logps, mask, probability = worked_example()
    out = nash_md_loss(logps, ref_logps, mask, probability, beta=0.5)
    # row 0: log π(y) = -3, log π_ref(y) = -2.75, ρ = [0.5, -0.75], KL = -0.25
    #        kl_loss = 0.5·(-1) + (-0.75)·(-2) = 1.0, score = (0.8 - 0.5)·(-3) = -0.9, loss = 0.5·1.0 + 0.9 = 1.4
    # row 1: log π(y) = -3, log π_ref(y) = -3.5, ρ = [0, 0.5, 0], KL = 0.5
    #        kl_loss = 0.5·(-1.5) = -0.75, score = (0.3 - 0.5)·(-3) = 0.6, loss = 0.5·(-0.75) - 0.6 = -0.975
    assert out.loss.item() == pytest.approx((1.4 - 0.975) / 2)
    torch.testing.assert_close(out.score, torch.tensor([-0.9, 0.6]))
    torch.testing.assert_close(out.kl, torch.tensor([-0.25, 0.5]))
    torch.testing.assert_close(out.logps, torch.tensor([-3.0, -3.0]))
    torch.testing.assert_close(out.ref_logps, torch.tensor([-2.75, -3.5]))
    assert out.beta == 0.5


def test_the_gradient_by_hand_is_beta_rho_minus_the_advantage_per_token():
    logps, ref_logps, mask, probability = worked_example()
    nash_md_loss(logps, ref_logps, mask, probability, beta=0.5).loss.backward()
    # ∂loss/∂ℓ_it = (β ρ_it - (P_i - 1/2)) / B on the completion tokens, 0 on padding
    expected = torch.tensor([[(0.25 - 0.3) / 2, (-0.375 - 0.3) / 2, 0.0],
                             [(0.0 + 0.2) / 2, (0.25 + 0.2) / 2, (0.0 + 0.2) / 2]])
    torch.testing.assert_close(logps.grad, expected)


def test_beta_zero_leaves_the_preference_term_alone():
    logps, ref_logps, mask, probability = worked_example()
    out = nash_md_loss(logps, ref_logps, mask, probability, beta=0.0)
    assert out.loss.item() == pytest.approx((0.9 - 0.6) / 2)


def test_the_preference_and_the_reference_carry_no_gradient():
    logps, ref_logps, mask, _ = worked_example()
    ref_logps = ref_logps.clone().requires_grad_(True)
    probability = torch.tensor([0.8, 0.3], requires_grad=True)
    nash_md_loss(logps, ref_logps, mask, probability, beta=0.5).loss.backward()
    assert ref_logps.grad is None and probability.grad is None


@pytest.mark.parametrize(("change", "message"), [
    ({"beta": -0.1}, "beta"),
    ({"mask": torch.ones(2, 2)}, "mask"),
    ({"ref_per_token_logps": torch.zeros(3, 3)}, "ref_per_token_logps"),
    ({"probability": torch.zeros(3)}, "probability"),
    ({"per_token_logps": torch.zeros(2, 3, 1)}, "2-D"),
])
def test_the_loss_refuses_bad_input(change, message):
    logps, ref_logps, mask, probability = worked_example()
    arguments = {"per_token_logps": logps, "ref_per_token_logps": ref_logps, "mask": mask,
                 "probability": probability, "beta": 0.5, **change}
    with pytest.raises(ValueError, match=message):
        nash_md_loss(**arguments)


# ----------------------------------------------------------------------------------------------------- the metrics
def test_trl_1_13_metrics_by_hand():
    logps, ref_logps, mask, probability = worked_example()
    out = nash_md_loss(logps, ref_logps, mask, probability, beta=0.5)
    metrics = nash_md_metrics(out, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]),
                              contains_eos=torch.tensor([True, False]), mixture_contains_eos=torch.tensor([True, True]),
                              mixture_coef=0.25)
    expected = {
        "loss/score": (-0.9 + 0.6) / 2, "loss/kl": (-0.25 + 0.5) / 2,
        "logps/chosen": -3.0, "logps/rejected": (-2.75 - 3.5) / 2,
        "rewards/chosen": 0.5, "rewards/rejected": 0.5, "rewards/probabilities": 0.55,
        "objective/entropy": 3.0, "rewards/margins": (-0.25 + 0.5) / 2, "rewards/accuracies": 0.5,
        "val/model_contain_eos_token": 0.5, "val/ref_contain_eos_token": 1.0, "beta": 0.5, "mixture_coef": 0.25,
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(value), name


def test_the_metrics_leave_out_what_was_not_given():
    out = nash_md_loss(*worked_example(), beta=0.5)
    metrics = nash_md_metrics(out, torch.zeros(2), torch.zeros(2))
    assert not {"val/model_contain_eos_token", "val/ref_contain_eos_token", "mixture_coef"} & set(metrics)
    with pytest.raises(ValueError, match="mixture_scores"):
        nash_md_metrics(out, torch.zeros(2), torch.zeros(3))


# ------------------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(("betas", "coefs", "penalty", "message"), [
    ([], [0.5], None, "beta"),
    ([0.1, -1.0], [0.5], None, "beta"),
    ([0.1], [], None, "mixture_coef"),
    ([0.1], [0.5, 1.2], None, "mixture_coef"),
    ([0.1], [0.5], -1.0, "missing_eos_penalty"),
])
def test_the_argument_checks_name_the_argument(betas, coefs, penalty, message):
    with pytest.raises(ValueError, match=message):
        check_nash_md_arguments(betas, coefs, penalty)


def test_good_arguments_pass():
    check_nash_md_arguments([0.0, 0.1], [0.0, 0.5, 1.0], 1.0)
