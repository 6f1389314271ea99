"""Online DPO's pure pieces (``lightning_llm.losses.online``) against hand-worked values: scores with NaN sources and
the missing-EOS penalty, TRL's tie rule, pairing rows by the decision, masked sequence log-probs, the sigmoid and IPO
losses on token-summed log-ratios, and argument validation. (Number-for-number parity with TRL 1.16's trainer is in
``tests/parity/test_trl_online_dpo.py``.)"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_llm.losses.online import (
    check_online_dpo_arguments,
    first_is_chosen,
    online_dpo_loss,
    online_dpo_scores,
    pair_up,
    sequence_logps,
)

F64 = torch.float64
NAN = math.nan


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_scores_weigh_the_sources_that_apply_and_penalise_a_missing_eos():
    rewards = t64([[1.0, 2.0], [NAN, 4.0], [NAN, NAN], [3.0, 0.0]])
    weights = t64([1.0, -0.5])
    eos = torch.tensor([True, False, False, True])
    # 1 - 1 = 0; the NaN source drops out: -2; nothing scored: 0; 3 - 0 = 3. Then -0.7 where there is no EOS.
    assert online_dpo_scores(rewards, weights, eos).tolist() == [0.0, -2.0, 0.0, 3.0]
    penalised = online_dpo_scores(rewards, weights, eos, missing_eos_penalty=0.7)
    assert torch.allclose(penalised, t64([0.0, -2.7, -0.7, 3.0]))


def test_scores_refuse_misshapen_inputs():
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        online_dpo_scores(t64([1.0, 2.0]), t64([1.0]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="contains_eos"):
        online_dpo_scores(t64([[1.0], [2.0]]), t64([1.0]), torch.tensor([True]))


def test_a_tie_goes_to_the_first_completion():
    scores = t64([1.0, 1.0, 0.0, 2.0, 5.0, -1.0])
    assert first_is_chosen(scores).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="whole pairs"):
        first_is_chosen(t64([1.0, 2.0, 3.0]))


def test_pair_up_swaps_the_rows_the_decision_rejects():
    values = torch.arange(8.0).reshape(4, 2)  # rows 0,1 = pair 0; rows 2,3 = pair 1
    chosen, rejected = pair_up(values, torch.tensor([False, True]))
    assert chosen.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert rejected.tolist() == [[0.0, 1.0], [6.0, 7.0]]
    with pytest.raises(ValueError, match=r"first_chosen.*\[B\] = \[2\]"):
        pair_up(values, torch.tensor([True]))


def test_sequence_logps_sum_the_masked_tokens():
    logps = t64([[-1.0, -2.0, -4.0], [-0.5, -0.25, -8.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert sequence_logps(logps, mask).tolist() == [-3.0, -8.75]
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        sequence_logps(logps, mask[:, :2])


# Two pairs. Pair 0: the second completion wins; pair 1: the first.
LOGPS = t64([-3.0, -2.0, -1.5, -4.0])
REF = t64([-2.5, -2.5, -2.0, -3.0])
FIRST = torch.tensor([False, True])


def test_sigmoid_loss_by_hand():
    beta = 0.5
    out = online_dpo_loss(LOGPS, REF, FIRST, beta=beta)
    # pair 0: chosen -2.0 (ref -2.5), rejected -3.0 (ref -2.5): delta = (-2 + 3) - (-2.5 + 2.5) = 1.0
    # pair 1: chosen -1.5 (ref -2.0), rejected -4.0 (ref -3.0): delta = 2.5 - 1.0 = 1.5
    expected = [-math.log(1 / (1 + math.exp(-beta * d))) for d in (1.0, 1.5)]
    assert torch.allclose(out.losses, t64(expected))
    assert math.isclose(float(out.loss), sum(expected) / 2, rel_tol=1e-12)
    assert torch.allclose(out.chosen_rewards, t64([0.5 * 0.5, 0.5 * 0.5]))
    assert torch.allclose(out.rejected_rewards, t64([0.5 * -0.5, 0.5 * -1.0]))
    assert out.chosen_logps.tolist() == [-2.0, -1.5] and out.rejected_logps.tolist() == [-3.0, -4.0]


def test_ipo_squares_the_token_summed_log_ratio():
    beta = 0.25
    out = online_dpo_loss(LOGPS, REF, FIRST, beta=beta, loss_type="ipo")
    expected = [(d - 1 / (2 * beta)) ** 2 for d in (1.0, 1.5)]  # (delta - 2)^2 = 1, 0.25
    assert torch.allclose(out.losses, t64(expected))


def test_only_the_policy_log_probs_carry_the_gradient():
    logps = LOGPS.clone().requires_grad_()
    ref = REF.clone().requires_grad_()
    online_dpo_loss(logps, ref, FIRST, beta=0.5).loss.backward()
    assert ref.grad is None and logps.grad is not None
    # d/d(chosen) of -log sigma(beta * delta) = -beta * sigma(-beta * delta) / B; rejected: the opposite sign.
    s0, s1 = (1 / (1 + math.exp(0.5 * d)) for d in (1.0, 1.5))
    assert torch.allclose(logps.grad, t64([0.25 * s0, -0.25 * s0, -0.25 * s1, 0.25 * s1]))


@pytest.mark.parametrize(("loss_type", "betas", "penalty", "message"), [
    ("hinge", [0.1], None, "loss_type"),
    ("sigmoid", [], None, "non-empty"),
    ("sigmoid", [0.1, 0.0], None, "> 0"),
    ("sigmoid", [0.1], -1.0, "missing_eos_penalty"),
])
def test_arguments_are_checked_by_name(loss_type, betas, penalty, message):
    with pytest.raises(ValueError, match=message):
        check_online_dpo_arguments(loss_type, betas, penalty)


def test_loss_refuses_misshapen_log_probs():
    with pytest.raises(ValueError, match=r"\[N\]"):
        online_dpo_loss(LOGPS, REF[:2], FIRST, beta=0.1)
