"""XPO's pure pieces (``lightning_llm.losses.xpo``) against hand-worked values: TRL 1.13's pair rule between the policy
and the reference sample (ties to the policy), the sigmoid and IPO DPO terms on token-summed log-ratios, the
``α log π(y')`` exploration term and its gradient, every metric ``XPOTrainer._log_statistics`` logs, argument
validation; and a plain-Python float64 reference of TRL 1.13's loss and metrics on random pairs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_llm.losses.xpo import XPO_ALPHA, check_xpo_arguments, xpo_loss, xpo_metrics, xpo_policy_chosen

F64 = torch.float64


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_trl_1_13_default_alpha():
    assert XPO_ALPHA == 1e-5


def test_a_tie_goes_to_the_policy_sample():
    chosen = xpo_policy_chosen(t64([1.0, 0.5, 2.0]), t64([1.0, 0.7, -1.0]))
    assert chosen.tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"\[B\]"):
        xpo_policy_chosen(t64([1.0, 2.0]), t64([1.0]))


# Two prompts. Prompt 0: the policy sample wins; prompt 1: the reference sample wins.
LOGPS = t64([-2.0, -3.0])  # log π(y)
REF_LOGPS = t64([-2.5, -2.0])  # log π_ref(y)
REF_SAMPLE_LOGPS = t64([-4.0, -1.0])  # log π(y')
REF_SAMPLE_REF_LOGPS = t64([-3.0, -1.5])  # log π_ref(y')
CHOSEN = torch.tensor([True, False])
# log-ratios: y: 0.5, -1.0; y': -1.0, 0.5.
# prompt 0: chosen y (0.5), rejected y' (-1.0): Δ = 1.5. prompt 1: chosen y' (0.5), rejected y (-1.0): Δ = 1.5.


def test_sigmoid_loss_and_its_parts_by_hand():
    beta, alpha = 0.5, 0.1
    out = xpo_loss(LOGPS, REF_LOGPS, REF_SAMPLE_LOGPS, REF_SAMPLE_REF_LOGPS, CHOSEN, beta=beta, alpha=alpha)
    dpo = -log_sigmoid(beta * 1.5)
    torch.testing.assert_close(out.dpo_losses, t64([dpo, dpo]))
    torch.testing.assert_close(out.xpo_losses, t64([0.1 * -4.0, 0.1 * -1.0]))
    assert out.loss.item() == pytest.approx(((dpo - 0.4) + (dpo - 0.1)) / 2, abs=1e-14)
    torch.testing.assert_close(out.chosen_rewards, t64([0.25, 0.25]))
    torch.testing.assert_close(out.rejected_rewards, t64([-0.5, -0.5]))
    assert out.chosen_logps.tolist() == [-2.0, -1.0] and out.rejected_logps.tolist() == [-4.0, -3.0]
    assert out.chosen_ref_logps.tolist() == [-2.5, -1.5] and out.rejected_ref_logps.tolist() == [-3.0, -2.0]
    assert out.policy_chosen.tolist() == [True, False]


def test_ipo_squares_the_token_summed_log_ratio():
    beta = 0.25
    out = xpo_loss(LOGPS, REF_LOGPS, REF_SAMPLE_LOGPS, REF_SAMPLE_REF_LOGPS, CHOSEN, beta=beta, alpha=0.0,
                   loss_type="ipo")
    torch.testing.assert_close(out.dpo_losses, t64([(1.5 - 2.0) ** 2] * 2))
    assert out.xpo_losses.tolist() == [0.0, 0.0]


def test_the_gradient_reaches_both_policy_log_probs_and_the_exploration_term():
    beta, alpha = 0.5, 0.1
    logps, ref_sample_logps = LOGPS.clone().requires_grad_(), REF_SAMPLE_LOGPS.clone().requires_grad_()
    ref_logps = REF_LOGPS.clone().requires_grad_()
    out = xpo_loss(logps, ref_logps, ref_sample_logps, REF_SAMPLE_REF_LOGPS, CHOSEN, beta=beta, alpha=alpha)
    out.loss.backward()
    assert ref_logps.grad is None
    # d(-log σ(βΔ))/dΔ = -β σ(-βΔ); chosen +1, rejected -1; all over B = 2; plus α / 2 on log π(y').
    s = beta / (1 + math.exp(beta * 1.5))
    torch.testing.assert_close(logps.grad, t64([-s / 2, s / 2]))  # y chosen in 0, rejected in 1
    torch.testing.assert_close(ref_sample_logps.grad, t64([s / 2 + alpha / 2, -s / 2 + alpha / 2]))


def test_metrics_by_hand():
    beta, alpha = 0.5, 0.1
    out = xpo_loss(LOGPS, REF_LOGPS, REF_SAMPLE_LOGPS, REF_SAMPLE_REF_LOGPS, CHOSEN, beta=beta, alpha=alpha)
    scores, ref_scores = t64([1.0, 0.0]), t64([0.5, 2.0])
    m = xpo_metrics(out, scores, ref_scores, contains_eos=torch.tensor([True, False]),
                    ref_contains_eos=torch.tensor([True, True]))
    dpo = -log_sigmoid(beta * 1.5)
    expected = {
        "loss/dpo": dpo, "loss/xpo": (-0.4 - 0.1) / 2,
        "objective/model_scores": 0.5, "objective/ref_scores": 1.25, "objective/scores_margin": -0.75,
        # TRL adds the policy's and the reference's means.
        "logps/chosen": (-2.0 - 1.0) / 2 + (-2.5 - 1.5) / 2, "logps/rejected": (-4.0 - 3.0) / 2 + (-3.0 - 2.0) / 2,
        "rewards/chosen": 0.25, "rewards/rejected": -0.5, "rewards/margins": 0.75, "rewards/accuracies": 1.0,
        "objective/kl": ((0.5 - 1.0) + (-1.0 + 0.5)) / 2 / 2,
        "objective/entropy": ((2.0 + 3.0) / 2 + (4.0 + 1.0) / 2) / 2,
        "val/model_contain_eos_token": 0.5, "val/ref_contain_eos_token": 1.0, "alpha": 0.1, "beta": 0.5,
    }  # fmt: skip
    assert set(m) == set(expected)
    for name, value in expected.items():
        assert float(m[name]) == pytest.approx(value, abs=1e-14), name
    assert "val/model_contain_eos_token" not in xpo_metrics(out, scores, ref_scores)
    with pytest.raises(ValueError, match="ref_scores"):
        xpo_metrics(out, scores, ref_scores[:1])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss_type": "hinge"}, "loss_type"),
    ({"betas": [0.0]}, "> 0"),
    ({"alphas": []}, "non-empty"),
    ({"alphas": [1e-5, -1.0]}, "alpha"),
    ({"alphas": [float("inf")]}, "finite"),
    ({"missing_eos_penalty": -1.0}, "missing_eos_penalty"),
])  # fmt: skip
def test_arguments_are_checked_by_name(kwargs, message):
    arguments = {"loss_type": "sigmoid", "betas": [0.1], "alphas": [1e-5], "missing_eos_penalty": None} | kwargs
    with pytest.raises(ValueError, match=message):
        check_xpo_arguments(**arguments)


def test_loss_refuses_bad_inputs():
    with pytest.raises(ValueError, match="ref_sample_logps"):
        xpo_loss(LOGPS, REF_LOGPS, REF_SAMPLE_LOGPS[:1], REF_SAMPLE_REF_LOGPS, CHOSEN, beta=0.1)
    with pytest.raises(ValueError, match=r"\[B\]"):
        xpo_loss(LOGPS[None], REF_LOGPS[None], REF_SAMPLE_LOGPS[None], REF_SAMPLE_REF_LOGPS[None], CHOSEN, beta=0.1)
    with pytest.raises(ValueError, match="alpha"):
        xpo_loss(LOGPS, REF_LOGPS, REF_SAMPLE_LOGPS, REF_SAMPLE_REF_LOGPS, CHOSEN, beta=0.1, alpha=-1.0)
    with pytest.raises(ValueError, match="loss_type"):
        xpo_loss(LOGPS, REF_LOGPS, REF_SAMPLE_LOGPS, REF_SAMPLE_REF_LOGPS, CHOSEN, beta=0.1, loss_type="robust")


def reference_xpo(logps, ref_logps, ref_sample_logps, ref_sample_ref_logps, scores, ref_scores, beta, alpha,
                  loss_type):
    """TRL 1.13 XPO loss and metrics, one prompt at a time in plain floats."""
    n = len(logps)
    mean = lambda xs: sum(xs) / len(xs)
    dpo, xpo, cw, cr, rw, rr = [], [], [], [], [], []
    for i in range(n):
        policy_wins = scores[i] >= ref_scores[i]
        w = (logps[i], ref_logps[i]) if policy_wins else (ref_sample_logps[i], ref_sample_ref_logps[i])
        lose = (ref_sample_logps[i], ref_sample_ref_logps[i]) if policy_wins else (logps[i], ref_logps[i])
        delta = (w[0] - w[1]) - (lose[0] - lose[1])
        dpo.append(-log_sigmoid(beta * delta) if loss_type == "sigmoid" else (delta - 1 / (2 * beta)) ** 2)
        xpo.append(alpha * ref_sample_logps[i])
        for column, value in zip((cw, cr, rw, rr), (*w, *lose)):
            column.append(value)
    chosen_rewards = [beta * (a - b) for a, b in zip(cw, cr)]
    rejected_rewards = [beta * (a - b) for a, b in zip(rw, rr)]
    margins = [a - b for a, b in zip(chosen_rewards, rejected_rewards)]
    kl = [(logps[i] - ref_logps[i]) + (ref_sample_logps[i] - ref_sample_ref_logps[i]) for i in range(n)]
    return {
        "loss": mean([a + b for a, b in zip(dpo, xpo)]), "loss/dpo": mean(dpo), "loss/xpo": mean(xpo),
        "objective/model_scores": mean(scores), "objective/ref_scores": mean(ref_scores),
        "objective/scores_margin": mean([a - b for a, b in zip(scores, ref_scores)]),
        "logps/chosen": mean(cw) + mean(cr), "logps/rejected": mean(rw) + mean(rr),
        "rewards/chosen": mean(chosen_rewards), "rewards/rejected": mean(rejected_rewards),
        "rewards/margins": mean(margins), "rewards/accuracies": mean([float(m > 0) for m in margins]),
        "objective/kl": mean(kl) / 2,
        "objective/entropy": (mean([-x for x in logps]) + mean([-x for x in ref_sample_logps])) / 2,
    }


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_plain_python_reference(seed, loss_type):
    rng = random.Random(seed)
    n = 7
    draw = lambda: [rng.uniform(-6, 0) for _ in range(n)]
    logps, ref_logps, ref_sample_logps, ref_sample_ref_logps = draw(), draw(), draw(), draw()
    scores = [float(rng.randint(0, 2)) for _ in range(n)]  # small integers: ties happen
    ref_scores = [float(rng.randint(0, 2)) for _ in range(n)]
    beta, alpha = 0.2, 0.05
    expected = reference_xpo(logps, ref_logps, ref_sample_logps, ref_sample_ref_logps, scores, ref_scores, beta,
                             alpha, loss_type)
    out = xpo_loss(t64(logps), t64(ref_logps), t64(ref_sample_logps), t64(ref_sample_ref_logps),
                   xpo_policy_chosen(t64(scores), t64(ref_scores)), beta=beta, alpha=alpha, loss_type=loss_type)
    assert out.loss.item() == pytest.approx(expected.pop("loss"), rel=1e-12, abs=1e-12)
    metrics = xpo_metrics(out, t64(scores), t64(ref_scores))
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-12, abs=1e-12), name
