"""GRPO family: advantages and every loss type against hand-worked values, the entropy and off-policy masks, argument
validation, and parity with TRL 1.16's own arithmetic (``GRPOTrainer._compute_loss`` on a stand-in trainer, and the
advantage block of ``_generate_and_score_completions`` run from TRL's source) in float64."""

from __future__ import annotations

import functools
import inspect
import math
import textwrap
import types
from collections import defaultdict

import pytest
import torch

from lightning_llm.losses.grpo import (
    GRPO_AGGREGATIONS,
    GRPO_LOSSES,
    adaptive_entropy_coef,
    grpo_advantages,
    grpo_loss,
    grpo_metrics,
    high_entropy_mask,
    k3_kl,
    nanstd,
    off_policy_mask,
    vespo_gamma_weights,
    weighted_rewards,
)

NAN = math.nan
F64 = torch.float64


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------------------------------

# Two groups of three: spread 1 (std exactly 1) and a constant group (std 0).
GROUPED = [[1.0], [2.0], [3.0], [0.5], [0.5], [0.5]]


def test_nanstd_is_bessel_corrected_and_nan_below_two_values():
    x = t64([[1.0, 2.0, 3.0], [1.0, NAN, 3.0], [NAN, 4.0, NAN], [NAN, NAN, NAN]])
    std = nanstd(x, dim=1)
    torch.testing.assert_close(std[:2], t64([1.0, math.sqrt(2.0)]))  # (1 + 1) / (3 - 1); (1 + 1) / (2 - 1)
    assert torch.isnan(std[2:]).all()
    assert nanstd(t64([1.0, 2.0, 3.0, 4.0])).item() == pytest.approx(math.sqrt(5.0 / 3.0), abs=1e-15)
    assert nanstd(x, dim=1, keepdim=True).shape == (4, 1)


def test_group_scaling_hand_values():
    out = grpo_advantages(t64(GROUPED), None, 3)
    scale = 1.0 / (1.0 + 1e-4)
    torch.testing.assert_close(out.advantages, t64([-scale, 0.0, scale, 0.0, 0.0, 0.0]), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.std, t64([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    assert out.is_std_zero.tolist() == [False] * 3 + [True] * 3
    torch.testing.assert_close(out.rewards, t64([1.0, 2.0, 3.0, 0.5, 0.5, 0.5]))
    assert not out.unscorable.any()


def test_batch_scaling_keeps_the_group_baseline():
    out = grpo_advantages(t64(GROUPED), None, 3, scale_rewards="batch")
    # Batch mean 1.25; squared deviations sum to 5.375; Bessel: / 5.
    batch_std = math.sqrt(5.375 / 5)
    expected = t64([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (batch_std + 1e-4)
    torch.testing.assert_close(out.advantages, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.std, t64([batch_std] * 6))
    assert not out.is_std_zero.any()


@pytest.mark.parametrize("scale", ["none", False])
def test_no_scaling_reports_the_group_std(scale):
    out = grpo_advantages(t64(GROUPED), None, 3, scale_rewards=scale)
    torch.testing.assert_close(out.advantages, t64([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert out.is_std_zero.tolist() == [False] * 3 + [True] * 3  # frac_reward_zero_std = 0.5


def test_unscorable_rows_and_partly_scored_rows():
    rewards_per_func = t64(
        [
            [1.0, NAN], [NAN, NAN], [3.0, 2.0],  # rewards 1, unscorable, 3 + 0.5·2 = 4
            [NAN, 4.0], [NAN, NAN], [NAN, NAN],  # one scorable completion: std undefined
            [NAN, NAN], [NAN, NAN], [NAN, NAN],  # nothing scorable
        ]
    )  # fmt: skip
    out = grpo_advantages(rewards_per_func, [1.0, 0.5], 3)
    torch.testing.assert_close(out.rewards[[0, 2, 3]], t64([1.0, 4.0, 2.0]))
    assert out.unscorable.tolist() == [False, True, False, False, True, True, True, True, True]
    assert torch.isnan(out.rewards[out.unscorable]).all()
    # Group 0: scorable rewards 1 and 4, mean 2.5, Bessel std sqrt(2·1.5² / 1) = sqrt(4.5).
    a = 1.5 / (math.sqrt(4.5) + 1e-4)
    torch.testing.assert_close(out.advantages, t64([-a, 0.0, a] + [0.0] * 6), rtol=1e-14, atol=1e-14)
    assert out.std[0].item() == pytest.approx(math.sqrt(4.5), abs=1e-14)
    assert torch.isnan(out.std[3:]).all()
    assert not out.is_std_zero.any()  # an undefined std is not a zero std
    torch.testing.assert_close(weighted_rewards(rewards_per_func, [1.0, 0.5]), out.rewards, equal_nan=True)


def test_normalize_then_sum_hand_values():
    rewards_per_func = t64([[1.0, 0.0], [3.0, 4.0], [2.0, 1.0], [2.0, NAN]])
    out = grpo_advantages(rewards_per_func, [1.0, 0.5], 2, multi_objective_aggregation="normalize_then_sum")
    # Group 0: function 1 (1, 3) has std sqrt(2), function 2 (0, 4) std 2·sqrt(2); group 1: function 1 is constant
    # (z = 0) and function 2 has a single value (std NaN, z NaN, left out of the sum).
    z1 = 1.0 / (math.sqrt(2.0) + 1e-4)
    z2 = 2.0 / (2.0 * math.sqrt(2.0) + 1e-4)
    s = z1 + 0.5 * z2
    summed = [-s, s, 0.0, 0.0]  # mean 0
    batch_std = math.sqrt(2 * s * s / 3)
    expected = t64([v / (batch_std + 1e-4) for v in summed])
    torch.testing.assert_close(out.advantages, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.std, t64([batch_std] * 4))
    torch.testing.assert_close(out.rewards, t64([1.0, 5.0, 2.5, 2.0]))  # the raw weighted sums, for logging


def test_single_generation_gives_zero_advantages():
    out = grpo_advantages(t64([[1.0], [5.0]]), None, 1)
    torch.testing.assert_close(out.advantages, t64([0.0, 0.0]))
    assert out.is_std_zero.all()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.zeros(5, 1), None, 2), {}, "5 completions.*`num_generations`=2"),
        ((torch.zeros(4, 1), None, 0), {}, "`num_generations`"),
        ((torch.zeros(4), None, 2), {}, "`rewards_per_func` must be 2-D"),
        ((torch.zeros(4, 2), [1.0], 2), {}, "`reward_weights`"),
        ((torch.zeros(4, 1), None, 2), {"scale_rewards": "groups"}, "`scale_rewards`.*'batch'"),
        ((torch.zeros(4, 1), None, 2), {"multi_objective_aggregation": "sum"}, "`multi_objective_aggregation`"),
    ],
)
def test_advantage_validation(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        grpo_advantages(*args, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Loss types on hand-written tensors
# ------------------------------------------------------------------------------------------------------------------

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ON_POLICY_LOGPS = [[-1.0, -2.0, -0.5], [-0.25, -3.0, 0.0]]


def on_policy(loss_type, advantages=(1.0, -2.0), **kwargs):
    logps = t64(ON_POLICY_LOGPS).requires_grad_()
    out = grpo_loss(logps, None, t64(list(advantages)), MASK, loss_type=loss_type, **kwargs)
    out.loss.backward()
    return out, logps.grad


def test_tables_hold_every_trl_loss_type():
    names = {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"}
    assert set(GRPO_LOSSES) == set(GRPO_AGGREGATIONS) == names


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        # r = 1 everywhere; A = (1, -2); lengths 3 and 2; Σ_t A = (3, -4).
        ("grpo", {}, -(1.0 + -2.0) / 2),  # mean of per-sequence token means of -A
        ("bnpo", {}, -(3.0 - 4.0) / 5),  # token mean
        ("dr_grpo", {"max_completion_length": 4}, -(3.0 - 4.0) / (2 * 4)),  # B · L_max
        ("dapo", {}, -(3.0 - 4.0) / 5),  # default normalizer: this batch's 5 tokens
        ("dapo", {"normalizer": 8.0}, -(3.0 - 4.0) / 8),
        ("luspo", {}, -(3.0 - 4.0) / 2),  # per-sequence sums, then the mean
        # Σ_t A logp = 1·(-3.5) + (-2)·(-3.25) = 3; cispo needs ε_max ≥ 1 for a unit weight.
        ("cispo", {"epsilon_high": 5.0}, -3.0 / 5),
        ("vespo", {}, -3.0 / 5),  # φ(1) = 1
        # Soft gate on-policy: (4/τ) σ(0) = 2/τ; τ = 1 for A > 0, 1.05 otherwise.
        ("sapo", {}, (-2.0 * 1.0 + -(2.0 / 1.05) * -2.0) / 2),
    ],
)
def test_on_policy_values(loss_type, kwargs, expected):
    out, _ = on_policy(loss_type, **kwargs)
    assert out.loss.item() == pytest.approx(expected, abs=1e-14)
    assert out.policy_loss.item() == pytest.approx(expected, abs=1e-14)
    torch.testing.assert_close(out.coef_1, torch.ones(2, 3, dtype=F64))


def test_on_policy_gradients_are_reinforce():
    _, grad = on_policy("grpo")
    # d/dlogp_it of -(r A) is -A_i on-policy; grpo divides by |y_i| and B.
    torch.testing.assert_close(grad, t64([[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]]))
    _, grad = on_policy("dapo", normalizer=10.0)
    torch.testing.assert_close(grad, t64([[-0.1, -0.1, -0.1], [0.2, 0.2, 0.0]]))
    _, grad = on_policy("cispo", epsilon_high=5.0)  # -w A logp with w = 1 held constant: the same REINFORCE gradient
    torch.testing.assert_close(grad, t64([[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]]))


# Off-policy token ratios r (old log-probs 0) and A = (1, -1).
RATIOS = [[1.5, 0.5, 1.0], [0.5, 3.0, 1.0]]


def off_policy(loss_type, ratios=RATIOS, advantages=(1.0, -1.0), **kwargs):
    logps = torch.log(t64(ratios)).requires_grad_()
    out = grpo_loss(logps, torch.zeros(2, 3, dtype=F64), t64(list(advantages)), MASK, loss_type=loss_type, **kwargs)
    out.loss.backward()
    return out, logps.grad


def test_clipped_surrogate_hand_values():
    out, grad = off_policy("bnpo")
    # Row 0 (A = 1): r = 1.5 clipped to 1.2 -> -1.2; r = 0.5 -> -0.5; r = 1 -> -1.
    # Row 1 (A = -1): r = 0.5 -> -min(-0.5, -0.8) = 0.8 (clipped); r = 3 -> -min(-3, -1.2) = 3 (unbounded).
    torch.testing.assert_close(out.per_token_loss[:, :2], t64([[-1.2, -0.5], [0.8, 3.0]]))
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 0.8 + 3.0) / 5, abs=1e-14)
    # Clipped tokens have no gradient; otherwise d(-r A)/dlogp = -r A, over the 5 tokens.
    torch.testing.assert_close(grad, t64([[0.0, -0.5 / 5, -1.0 / 5], [0.0, 3.0 / 5, 0.0]]))
    assert out.is_low_clipped.tolist() == [[False, False, False], [True, False, False]]
    assert out.is_high_clipped.tolist() == [[True, False, False], [False, False, False]]
    assert out.is_region_clipped.tolist() == [[True, False, False], [True, False, False]]
    grpo = off_policy("grpo")[0]
    assert grpo.loss.item() == pytest.approx(((-1.2 - 0.5 - 1.0) / 3 + (0.8 + 3.0) / 2) / 2, abs=1e-14)


def test_clip_higher_and_two_sided_delta():
    out, _ = off_policy("bnpo", epsilon_high=0.6)  # 1.5 < 1.6: the high clip no longer binds
    assert out.per_token_loss[0, 0].item() == pytest.approx(-1.5, abs=1e-14)
    assert not out.is_high_clipped.any()
    out, grad = off_policy("bnpo", delta=2.0)  # r = 3 with A < 0: capped at δ = 2
    assert out.per_token_loss[1, 1].item() == pytest.approx(2.0, abs=1e-14)
    assert out.loss.item() == pytest.approx((-2.7 + 0.8 + 2.0) / 5, abs=1e-14)
    assert grad[1, 1].item() == 0.0
    torch.testing.assert_close(out.coef_1, t64(RATIOS))  # the reported ratio is the uncapped one


def test_clip_metrics_read_the_capped_ratio():
    # TRL tests the clip bounds on min(r, δ): with δ below 1 + ε_high nothing counts as high-clipped, and with δ below
    # 1 - ε_low every capped negative-advantage token counts as low-clipped.
    out, _ = off_policy("bnpo", delta=1.1)
    assert not out.is_high_clipped.any()  # r = 1.5 with A = 1 is capped to 1.1 < 1.2
    assert out.per_token_loss[0, 0].item() == pytest.approx(-1.1, abs=1e-14)
    out, _ = off_policy("bnpo", delta=0.7)
    assert out.is_low_clipped.tolist() == [[False, False, False], [True, True, True]]  # padding: see the metrics
    assert grpo_metrics(out, MASK).local()["clip_ratio/low_mean"] == pytest.approx(2 / 5)


def test_sequence_level_ratio_is_the_geometric_mean():
    out, _ = off_policy("grpo", importance_sampling_level="sequence")
    r0, r1 = 0.75 ** (1 / 3), 1.5 ** (1 / 2)  # exp of the masked mean log-ratio per row
    torch.testing.assert_close(out.coef_1, t64([[r0], [r1]]))
    # Row 0: A = 1, r0 inside [0.8, 1.2]: -r0. Row 1: A = -1, r1 > 1.2: -min(-r1, -1.2) = r1.
    assert out.loss.item() == pytest.approx((-r0 + r1) / 2, abs=1e-14)
    luspo = off_policy("luspo", importance_sampling_level="sequence")[0]
    assert luspo.loss.item() == pytest.approx((3 * -r0 + 2 * r1) / 2, abs=1e-14)  # length-weighted
    metrics = grpo_metrics(out, MASK).local()  # one value per sequence: means over sequences
    assert metrics["clip_ratio/low_mean"] == 0.0 and metrics["clip_ratio/high_mean"] == 0.0


def test_kl_term_k3_and_bias_correction():
    logps = t64([[-1.0, -2.0]])
    ref = logps + math.log(2.0)  # ρ = ref - logp = log 2 -> e^ρ - ρ - 1 = 1 - log 2
    torch.testing.assert_close(k3_kl(logps, ref), t64([[1 - math.log(2.0)] * 2]))
    mask = torch.ones(1, 2)
    kwargs = {"loss_type": "bnpo", "beta": 0.5, "ref_per_token_logps": ref}
    out = grpo_loss(logps, None, t64([0.0]), mask, **kwargs)
    assert out.loss.item() == pytest.approx(0.5 * (1 - math.log(2.0)), abs=1e-14)  # A = 0: only the KL
    old = logps - math.log(1.5)  # r = 1.5 on both tokens
    corrected = grpo_loss(logps, old, t64([0.0]), mask, **kwargs)
    torch.testing.assert_close(corrected.per_token_kl, t64([[1.5 * (1 - math.log(2.0))] * 2]))
    plain = grpo_loss(logps, old, t64([0.0]), mask, use_bias_correction_kl=False, **kwargs)
    torch.testing.assert_close(plain.per_token_kl, t64([[1 - math.log(2.0)] * 2]))
    assert grpo_metrics(plain, mask).local()["kl"] == pytest.approx(1 - math.log(2.0), abs=1e-14)


def test_cispo_truncates_the_weight_and_keeps_the_gradient():
    logps = (torch.log(t64([[6.0, 0.5]])) - 1.0).requires_grad_()  # log π; old log-probs -1: r = 6, 0.5
    out = grpo_loss(logps, torch.full((1, 2), -1.0, dtype=F64), t64([2.0]), torch.ones(1, 2), loss_type="cispo",
                    epsilon_high=5.0, normalizer=4.0)  # fmt: skip
    weights = [5.0, 0.5]  # min(r, ε_max)
    expected = sum(-w * 2.0 * lp for w, lp in zip(weights, logps.tolist()[0])) / 4.0
    assert out.loss.item() == pytest.approx(expected, abs=1e-14)
    out.loss.backward()
    torch.testing.assert_close(logps.grad, t64([[-5.0 * 2.0 / 4.0, -0.5 * 2.0 / 4.0]]))  # the clipped token learns too
    assert out.is_cispo_clipped.tolist() == [[True, False]]
    assert grpo_metrics(out, torch.ones(1, 2)).local() == {"cispo_clip_ratio": 0.5}


def test_sapo_soft_gate():
    out, grad = off_policy("sapo", ratios=[[1.5, 1.0, 1.0], [0.5, 1.0, 1.0]])
    # -(4/τ) σ(τ (r - 1)) A: row 0 τ = 1, row 1 (A < 0) τ = 1.05.
    tok00 = -4.0 * sigmoid(0.5)
    tok10 = (4.0 / 1.05) * sigmoid(1.05 * -0.5)
    assert out.per_token_loss[0, 0].item() == pytest.approx(tok00, abs=1e-14)
    assert out.per_token_loss[1, 0].item() == pytest.approx(tok10, abs=1e-14)
    # Gradient weight 4 σ(x)(1 - σ(x)) · r per token, x = τ (r - 1); grpo-style mean over 3 and 2 tokens, then over 2.
    s = sigmoid(0.5)
    assert grad[0, 0].item() == pytest.approx(-4 * s * (1 - s) * 1.5 / 6, abs=1e-14)


def test_vespo_gamma_weight():
    log_ratio = torch.log(t64([[2.0, 1.0, 1.0], [2.0, 1.0, 1.0]]))  # w = 2 for both rows
    phi = vespo_gamma_weights(t64([[1.0], [-1.0]]), log_ratio, MASK)
    # φ(w) = w^k e^{λ(1 - w)}: (k, λ) = (2, 3) for A ≥ 0, (3, 2) for A < 0.
    torch.testing.assert_close(phi, t64([[4.0 * math.exp(-3.0)], [8.0 * math.exp(-2.0)]]))
    out, grad = off_policy("vespo", ratios=[[2.0, 1.0, 1.0], [2.0, 1.0, 1.0]], normalizer=5.0)
    torch.testing.assert_close(out.phi, phi)
    torch.testing.assert_close(grad, -phi * t64([[1.0], [-1.0]]) * MASK / 5.0)  # φ is a constant
    assert grpo_metrics(out, MASK).local()["vespo/phi_seq_mean"] == pytest.approx(phi.mean().item(), abs=1e-14)


def test_entropy_mask_hand_example():
    entropies = t64([[0.1, 0.5, 0.9], [0.3, 0.7, 9.0]])  # 9.0 sits on padding and must not count
    # Completion entropies sorted: 0.1 0.3 0.5 0.7 0.9. Median 0.5; the 0.6 quantile is 0.5 + 0.4·(0.7 - 0.5) = 0.58.
    assert high_entropy_mask(entropies, MASK, 0.5).tolist() == [[False, True, True], [False, True, False]]
    assert high_entropy_mask(entropies, MASK, 0.6).tolist() == [[False, False, True], [False, True, False]]
    assert high_entropy_mask(entropies, MASK, 0.0).tolist() == MASK.bool().tolist()
    assert high_entropy_mask(entropies, MASK, 1.0).tolist() == [[False, False, True], [False, False, False]]
    assert not high_entropy_mask(entropies, torch.zeros(2, 3), 0.5).any()
    # With every process's entropies the cut-off is global: here 0.8 is the median.
    pooled = high_entropy_mask(entropies, MASK, 0.5, all_entropies=t64([0.8, 0.8, 0.8, 0.1]))
    assert pooled.tolist() == [[False, False, True], [False, False, False]]


def test_entropy_mask_and_bonus_in_the_loss():
    entropies = t64([[0.1, 0.5, 0.9], [0.3, 0.7, 9.0]])
    keep = high_entropy_mask(entropies, MASK, 0.5)  # 3 tokens: (0,1), (0,2), (1,1)
    out, grad = on_policy("bnpo", entropies=entropies, entropy_mask=keep, entropy_coef=0.1)
    policy = -(1.0 + 1.0 + -2.0) / 5  # masked-out tokens add 0 but still count in bnpo's 5 tokens
    bonus = (0.5 + 0.9 + 0.7) / 3  # mean entropy over the same 3 tokens
    assert out.policy_loss.item() == pytest.approx(policy, abs=1e-14)
    assert out.entropy.item() == pytest.approx(bonus, abs=1e-14)
    assert out.loss.item() == pytest.approx(policy - 0.1 * bonus, abs=1e-14)
    torch.testing.assert_close(grad, t64([[0.0, -0.2, -0.2], [0.0, 0.4, 0.0]]))
    # The logged entropy is over all completion tokens.
    assert grpo_metrics(out, MASK, entropies).local()["entropy"] == pytest.approx(2.5 / 5, abs=1e-14)


def test_off_policy_mask_drops_drifted_negative_sequences():
    logps = torch.zeros(3, 2, dtype=F64)
    sampling = t64([[0.3, 0.3], [0.1, NAN], [0.9, 0.9]])  # mean drifts 0.3, 0.05 (NaN counts 0), 0.9
    keep = off_policy_mask(t64([[-1.0], [-1.0], [1.0]]), logps, sampling, torch.ones(3, 2), 0.2)
    torch.testing.assert_close(keep, t64([[0.0], [1.0], [1.0]]))
    out = grpo_loss(logps, None, t64([-1.0, -1.0, 1.0]), torch.ones(3, 2), loss_type="bnpo",
                    off_policy_mask_threshold=0.2, sampling_per_token_logps=sampling)  # fmt: skip
    assert out.loss.item() == pytest.approx((2 * 1.0 + 2 * -1.0) / 6, abs=1e-14)  # row 0 dropped


def test_sampling_importance_ratio_multiplies_the_policy_term():
    ratio = t64([[0.5], [2.0]])
    out, grad = on_policy("bnpo", importance_sampling_ratio=ratio)
    assert out.loss.item() == pytest.approx(-(0.5 * 3 + 2.0 * -4) / 5, abs=1e-14)
    torch.testing.assert_close(grad, t64([[-0.1, -0.1, -0.1], [0.8, 0.8, 0.0]]))


def test_per_token_advantages_and_metrics():
    out, _ = off_policy("bnpo", advantages=(1.0, -1.0))
    per_token = grpo_loss(torch.log(t64(RATIOS)), torch.zeros(2, 3, dtype=F64), t64([[1.0] * 3, [-1.0] * 3]), MASK,
                          loss_type="bnpo")  # fmt: skip
    torch.testing.assert_close(per_token.loss, out.loss.detach())
    metrics = grpo_metrics(out, MASK)
    torch.testing.assert_close(metrics.sums["clip_ratio/low_mean"], t64([1.0, 5.0]))  # (sum, count) to all-reduce
    values = metrics.local()
    assert values["clip_ratio/region_mean"] == pytest.approx(2 / 5)
    assert values["clip_ratio/low_min"] == 0.0  # per-sequence low fractions 0 and 1/2
    assert values["clip_ratio/high_max"] == pytest.approx(1 / 3)  # per-sequence high fractions 1/3 and 0
    assert "kl" not in values and "entropy" not in values


def test_bf16_inputs_are_computed_in_float32():
    logps = torch.tensor(ON_POLICY_LOGPS, dtype=torch.bfloat16)
    out = grpo_loss(logps, None, torch.tensor([1.0, -2.0], dtype=torch.bfloat16), MASK, loss_type="grpo")
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "ppo"}, "Unknown `loss_type`.*'bnpo'.*'vespo'"),
        ({"importance_sampling_level": "tokens"}, "`importance_sampling_level`.*'sequence'"),
        ({"epsilon_low": -0.1}, "`epsilon_low`"),
        ({"epsilon_high": -0.1}, "`epsilon_high`"),
        ({"loss_type": "cispo", "epsilon_high": 0.0}, "ε_max"),
        ({"delta": 0.0}, "`delta`"),
        ({"beta": -1.0}, "`beta`"),
        ({"beta": 0.1}, "`ref_per_token_logps`"),
        ({"entropy_coef": 0.1}, "`entropies`"),
        ({"loss_type": "sapo", "sapo_temperature_neg": 0.0}, "`sapo_temperature_neg`"),
        ({"loss_type": "vespo", "vespo_lambda_pos": -1.0}, "`vespo_lambda_pos`"),
        ({"loss_type": "dr_grpo"}, "`max_completion_length`"),
        ({"loss_type": "dapo", "normalizer": 0.0}, "`normalizer`"),
        ({"normalizer": torch.ones(2)}, "`normalizer` must be a scalar"),
        ({"off_policy_mask_threshold": -1.0}, "`off_policy_mask_threshold`"),
        ({"old_per_token_logps": torch.zeros(2, 4)}, "`old_per_token_logps` must have the shape"),
        ({"mask": torch.ones(2, 4)}, "`mask` must have the shape"),
        ({"advantages": torch.zeros(3)}, "`advantages`"),
        ({"entropies": torch.zeros(2, 2), "entropy_coef": 0.1}, "`entropies` must have the shape"),
        ({"importance_sampling_ratio": torch.ones(2, 2)}, "`importance_sampling_ratio`"),
        ({"per_token_logps": torch.zeros(6)}, "2-D"),
    ],
)
def test_loss_validation(kwargs, message):
    args = {
        "per_token_logps": torch.zeros(2, 3),
        "old_per_token_logps": None,
        "advantages": torch.zeros(2),
        "mask": torch.ones(2, 3),
    }
    for name in list(args):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    with pytest.raises(ValueError, match=message):
        grpo_loss(*args.values(), **kwargs)


def test_mask_helper_validation():
    with pytest.raises(ValueError, match="`threshold`"):
        high_entropy_mask(torch.zeros(2, 3), torch.ones(2, 3), 1.5)
    with pytest.raises(ValueError, match="`mask` must have the shape"):
        high_entropy_mask(torch.zeros(2, 3), torch.ones(2, 2), 0.5)
    with pytest.raises(ValueError, match="`threshold`"):
        off_policy_mask(torch.zeros(2, 1), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), -0.5)
    with pytest.raises(ValueError, match="`sampling_per_token_logps` must have the shape"):
        off_policy_mask(torch.zeros(2, 1), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 0.5)


# ------------------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16: its own code paths, run on a stand-in trainer
# ------------------------------------------------------------------------------------------------------------------


def trl_source_block(function, first_line: str, last_line: str) -> types.CodeType:
    """The statements of a TRL method from the line containing ``first_line`` to the one containing ``last_line``,
    compiled to run in a namespace of our choosing (TRL's own text, so its arithmetic is what runs)."""
    lines = inspect.getsource(function).splitlines()
    start = next(i for i, line in enumerate(lines) if first_line in line)
    stop = next(i for i, line in enumerate(lines) if i > start and last_line in line)
    return compile(textwrap.dedent("\n".join(lines[start : stop + 1])), f"<trl {function.__qualname__}>", "exec")


def trl_grpo_advantages(rewards_per_func, reward_weights, num_generations, scale_rewards, aggregation):
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    block = trl_source_block(
        trainer.GRPOTrainer._generate_and_score_completions,
        "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)",
        "advantages = torch.nan_to_num(advantages, nan=0.0)",
    )
    stand_in = types.SimpleNamespace(
        multi_objective_aggregation=aggregation,
        scale_rewards=scale_rewards,
        reward_weights=reward_weights,
        reward_funcs=[None] * rewards_per_func.shape[1],
    )
    namespace = {
        "self": stand_in, "rewards_per_func": rewards_per_func.clone(), "num_generations": num_generations,
        "device": rewards_per_func.device, "torch": torch, "nanstd": trainer.nanstd,
    }  # fmt: skip
    exec(block, namespace)
    return namespace


ADVANTAGE_CASES = [
    (scale, aggregation, g)
    for aggregation in ("sum_then_normalize", "normalize_then_sum")
    for scale in ("group", "batch", "none")
    for g in (4, 1)
]


@pytest.mark.parametrize(("scale", "aggregation", "num_generations"), ADVANTAGE_CASES)
def test_advantages_parity_with_trl(scale, aggregation, num_generations):
    generator = torch.Generator().manual_seed(0)
    rewards_per_func = torch.randn(16, 3, generator=generator, dtype=F64)
    rewards_per_func[torch.rand(16, 3, generator=generator) < 0.3] = NAN  # some functions skip some completions
    rewards_per_func[[2, 5, 6]] = NAN  # unscorable rows; group 1 keeps two scorable completions
    rewards_per_func[8:12, 0] = 0.5  # a group constant in one function
    rewards_per_func[12:16, 1:] = NAN
    rewards_per_func[12:16, 0] = 2.0  # a group constant in its only function: std 0
    weights = t64([1.0, 0.5, -2.0])
    trl = trl_grpo_advantages(rewards_per_func, weights, num_generations, scale, aggregation)
    ours = grpo_advantages(rewards_per_func, weights, num_generations, scale_rewards=scale,
                           multi_objective_aggregation=aggregation)  # fmt: skip
    torch.testing.assert_close(ours.advantages, trl["advantages"], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(ours.std, trl["std_rewards"], rtol=1e-6, atol=1e-12, equal_nan=True)
    assert ours.is_std_zero.tolist() == trl["is_std_zero"].tolist()
    if aggregation == "sum_then_normalize" and scale != "batch":
        assert ours.is_std_zero.any()  # the constant groups are seen as such
    assert ours.unscorable.tolist() == trl["unscorable_mask"].tolist()
    if aggregation == "sum_then_normalize":
        torch.testing.assert_close(ours.rewards, trl["rewards"], equal_nan=True)


def trl_grpo_compute_loss(settings, tensors, adaptive=None):
    """Run ``GRPOTrainer._compute_loss`` with the model forward replaced by our tensors; return the loss, the
    gradients of the leaf inputs, the logged metrics and the stand-in (whose adaptive-entropy state TRL updates)."""
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    logps = tensors["per_token_logps"].clone().requires_grad_()
    entropies = tensors["entropies"].clone().requires_grad_()
    identity = lambda x: x
    accelerator = types.SimpleNamespace(
        num_processes=settings["num_processes"],
        gather=identity,
        gather_for_metrics=identity,
        reduce=lambda x, reduction: x,
        pad_across_processes=lambda x, dim, pad_index: x,
        sync_gradients=True,
        device=torch.device("cpu"),
    )
    args = types.SimpleNamespace(
        use_bias_correction_kl=settings["use_bias_correction_kl"],
        delta=settings["delta"],
        sapo_temperature_pos=settings["sapo_temperature_pos"],
        sapo_temperature_neg=settings["sapo_temperature_neg"],
        vespo_k_pos=settings["vespo_k_pos"],
        vespo_lambda_pos=settings["vespo_lambda_pos"],
        vespo_k_neg=settings["vespo_k_neg"],
        vespo_lambda_neg=settings["vespo_lambda_neg"],
        steps_per_generation=settings["steps_per_generation"],
        entropy_target=0.2,
    )
    stand_in = types.SimpleNamespace(
        args=args,
        accelerator=accelerator,
        model=types.SimpleNamespace(training=settings["training"]),
        aux_loss_enabled=False,
        top_entropy_quantile=settings["top_entropy_quantile"],
        off_policy_mask_threshold=settings["off_policy_mask_threshold"],
        importance_sampling_level=settings["importance_sampling_level"],
        beta=settings["beta"],
        loss_type=settings["loss_type"],
        epsilon_low=settings["epsilon_low"],
        epsilon_high=settings["epsilon_high"],
        use_vllm=settings["importance_sampling_ratio"],
        vllm_importance_sampling_correction=settings["importance_sampling_ratio"],
        current_gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        max_completion_length=settings["max_completion_length"],
        entropy_coef=settings["entropy_coef"],
        use_adaptive_entropy=False,
        _entropy_bonus_enabled=settings["entropy_coef"] != 0.0,
        _last_world_entropy=math.inf,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_off_policy_mask=trainer.GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=trainer.GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, entropies, None),
    )
    stand_in.get_high_entropy_mask = functools.partial(trainer.GRPOTrainer.get_high_entropy_mask, stand_in)
    if adaptive is not None:
        stand_in.use_adaptive_entropy = stand_in._entropy_bonus_enabled = True
        stand_in._last_world_entropy = adaptive["last_entropy"]
        stand_in._entropy_window_stats = None
        for name in ("entropy_target", "entropy_coef_delta", "entropy_coef_min", "entropy_coef_max"):
            setattr(args, name, adaptive[name])
    batch, length = tensors["mask"].shape
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": tensors["mask"],
        "advantages": tensors["advantages"],
        "num_items_in_batch": tensors["num_items_in_batch"],
    }
    for name in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps", "importance_sampling_ratio"):
        if tensors.get(name) is not None:
            inputs[name] = tensors[name]
    loss = trainer.GRPOTrainer._compute_loss(stand_in, None, inputs)
    loss.backward()
    mode = "train" if settings["training"] else "eval"
    metrics = {name: values[-1] for name, values in stand_in._metrics[mode].items()}
    return loss, logps.grad, entropies.grad, metrics, stand_in


DEFAULT_SETTINGS = {
    "importance_sampling_level": "token",
    "beta": 0.0,
    "epsilon_low": 0.2,
    "epsilon_high": 0.28,
    "delta": None,
    "use_bias_correction_kl": True,
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "top_entropy_quantile": 1.0,
    "entropy_coef": 0.0,
    "off_policy_mask_threshold": None,
    "importance_sampling_ratio": False,
    "per_token_advantages": False,
    "on_policy": False,
    "training": True,
    "num_processes": 2,
    "steps_per_generation": 4,
    "gradient_accumulation_steps": 2,
    "max_completion_length": 9,
}


def make_tensors(settings):
    """A micro-batch of 6 completions over 7 positions, ratios spread wide enough that every clip fires."""
    generator = torch.Generator().manual_seed(1234)
    batch, length = 6, 7
    lengths = torch.tensor([7, 3, 5, 1, 6, 0])  # the last completion is empty (e.g. masked as truncated)
    mask = (torch.arange(length) < lengths[:, None]).long()
    old = -torch.rand(batch, length, generator=generator, dtype=F64) * 3
    # Per-token noise plus a per-completion drift, so sequence-level ratios leave the clip range too.
    drift = torch.randn(batch, 1, generator=generator, dtype=F64) * 0.3
    logps = old + drift + torch.randn(batch, length, generator=generator, dtype=F64) * 0.4
    if settings["on_policy"]:
        logps, old = old, None
    advantages = torch.randn(batch, generator=generator, dtype=F64)
    if settings["per_token_advantages"]:
        advantages = advantages[:, None] + 0.3 * torch.randn(batch, length, generator=generator, dtype=F64)
    # float32-exact entropies, so that TRL's float32 quantile picks the same cut-off as our float64 one.
    entropies = (torch.rand(batch, length, generator=generator) * 4).double()
    tensors = {
        "per_token_logps": logps,
        "old_per_token_logps": old,
        "ref_per_token_logps": logps.detach() + torch.randn(batch, length, generator=generator, dtype=F64) * 0.3,
        "entropies": entropies,
        "mask": mask,
        "advantages": advantages,
        # The generation batch of every process and micro-batch has more tokens than this one.
        "num_items_in_batch": torch.tensor(97.0, dtype=F64),
        "sampling_per_token_logps": None,
        "importance_sampling_ratio": None,
    }
    if settings["off_policy_mask_threshold"] is not None:
        tensors["sampling_per_token_logps"] = old + torch.rand(batch, length, generator=generator, dtype=F64)
    if settings["importance_sampling_ratio"]:
        ratio = torch.exp(torch.randn(batch, length, generator=generator, dtype=F64) * 0.2).clamp(max=1.2)
        tensors["importance_sampling_ratio"] = ratio
    return tensors


def ours_grpo(settings, tensors):
    logps = tensors["per_token_logps"].clone().requires_grad_()
    entropies = tensors["entropies"].clone().requires_grad_()
    mask = tensors["mask"]
    entropy_mask = None
    if settings["top_entropy_quantile"] < 1.0:
        entropy_mask = high_entropy_mask(entropies, mask, 1 - settings["top_entropy_quantile"])
    n = tensors["num_items_in_batch"].clamp(min=1.0)
    processes, steps = settings["num_processes"], settings["steps_per_generation"]
    normalizer = n / (processes * steps) if settings["training"] else n / processes
    out = grpo_loss(
        logps,
        tensors["old_per_token_logps"],
        tensors["advantages"],
        mask,
        loss_type=settings["loss_type"],
        importance_sampling_level=settings["importance_sampling_level"],
        epsilon_low=settings["epsilon_low"],
        epsilon_high=settings["epsilon_high"],
        delta=settings["delta"],
        beta=settings["beta"],
        ref_per_token_logps=tensors["ref_per_token_logps"] if settings["beta"] else None,
        use_bias_correction_kl=settings["use_bias_correction_kl"],
        entropies=entropies,
        entropy_mask=entropy_mask,
        entropy_coef=settings["entropy_coef"],
        sapo_temperature_pos=settings["sapo_temperature_pos"],
        sapo_temperature_neg=settings["sapo_temperature_neg"],
        vespo_k_pos=settings["vespo_k_pos"],
        vespo_lambda_pos=settings["vespo_lambda_pos"],
        vespo_k_neg=settings["vespo_k_neg"],
        vespo_lambda_neg=settings["vespo_lambda_neg"],
        max_completion_length=settings["max_completion_length"],
        normalizer=normalizer,
        off_policy_mask_threshold=settings["off_policy_mask_threshold"],
        sampling_per_token_logps=tensors["sampling_per_token_logps"],
        importance_sampling_ratio=tensors["importance_sampling_ratio"],
    )
    accumulation = settings["gradient_accumulation_steps"] if settings["training"] else 1
    (out.loss / accumulation).backward()
    return out, logps.grad, entropies.grad, grpo_metrics(out, mask, entropies).local(), accumulation


LOSS_CASES = [
    {"loss_type": loss_type, "importance_sampling_level": level, "beta": beta}
    for loss_type in sorted(GRPO_LOSSES)
    for level in ("token", "sequence")
    for beta in (0.0, 0.04)
] + [
    {"loss_type": "cispo", "epsilon_high": 1.1, "beta": 0.04, "use_bias_correction_kl": False},
    {"loss_type": "dapo", "delta": 1.3},
    {"loss_type": "bnpo", "delta": 1.2},  # below 1 + ε_high: TRL's clip metrics read the capped ratio
    {"loss_type": "grpo", "delta": 1.25, "importance_sampling_level": "sequence", "beta": 0.04},
    {"loss_type": "bnpo", "top_entropy_quantile": 0.3, "entropy_coef": 0.05},
    {"loss_type": "sapo", "entropy_coef": 0.01, "beta": 0.04},
    {"loss_type": "dapo", "entropy_coef": 0.02, "top_entropy_quantile": 0.5},
    {"loss_type": "dapo", "off_policy_mask_threshold": 0.5},
    {"loss_type": "grpo", "off_policy_mask_threshold": 0.4, "importance_sampling_ratio": True},
    {"loss_type": "vespo", "importance_sampling_ratio": True, "vespo_k_pos": 1.5, "vespo_lambda_neg": 0.5},
    {"loss_type": "sapo", "sapo_temperature_pos": 2.0, "sapo_temperature_neg": 0.7},
    {"loss_type": "luspo", "per_token_advantages": True, "importance_sampling_level": "sequence"},
    {"loss_type": "dr_grpo", "per_token_advantages": True, "beta": 0.04},
    {"loss_type": "dapo", "on_policy": True, "beta": 0.04},
    {"loss_type": "vespo", "on_policy": True},
    {"loss_type": "dapo", "training": False, "entropy_coef": 0.1},
    {"loss_type": "grpo", "training": False},
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_parity_with_trl(case):
    settings = {**DEFAULT_SETTINGS, **case}
    if settings["loss_type"] == "cispo" and "epsilon_high" not in case:
        settings["epsilon_high"] = 1.15  # a cap that the spread of ratios crosses
    tensors = make_tensors(settings)
    trl_loss, trl_grad, trl_entropy_grad, trl_metrics, _ = trl_grpo_compute_loss(settings, tensors)
    out, grad, entropy_grad, metrics, accumulation = ours_grpo(settings, tensors)

    # TRL returns the micro-batch loss already divided by the accumulation steps; ours is before that division.
    assert (out.loss / accumulation).item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-12)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-12)
    if settings["entropy_coef"]:
        torch.testing.assert_close(entropy_grad, trl_entropy_grad, rtol=1e-6, atol=1e-12)
        scale = accumulation if settings["loss_type"] in ("dapo", "cispo", "vespo") else 1
        assert out.policy_loss.item() / scale == pytest.approx(trl_metrics.pop("policy_loss"), rel=1e-6, abs=1e-12)
        trl_metrics.pop("entropy_coef", None)
    assert set(metrics) == set(trl_metrics)
    for name, value in metrics.items():
        assert value == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-12, nan_ok=True), name
    if settings["loss_type"] in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo") and not settings["on_policy"]:
        assert metrics["clip_ratio/region_mean"] > 0  # the case exercises the clip


def test_parity_breaks_when_the_arithmetic_changes():
    """The parity harness is not vacuous: a wrong normaliser or a missing KL factor shows up."""
    settings = {**DEFAULT_SETTINGS, "loss_type": "dapo", "beta": 0.04}
    tensors = make_tensors(settings)
    trl_loss = trl_grpo_compute_loss(settings, tensors)[0]
    ours = ours_grpo({**settings, "steps_per_generation": 2}, tensors)[0]
    assert (ours.loss / 2).item() != pytest.approx(trl_loss.item(), rel=1e-6)
    ours = ours_grpo({**settings, "use_bias_correction_kl": False}, tensors)[0]
    assert (ours.loss / 2).item() != pytest.approx(trl_loss.item(), rel=1e-6)


def test_adaptive_entropy_coefficient_hand_values():
    kwargs = {"entropy_target": 0.5, "entropy_coef_delta": 0.01, "entropy_coef_min": 0.0, "entropy_coef_max": 0.025}
    assert adaptive_entropy_coef(0.01, 0.4, **kwargs) == pytest.approx(0.02)  # below target: more bonus
    assert adaptive_entropy_coef(0.02, 0.5, **kwargs) == pytest.approx(0.025)  # at target, capped at the max
    assert adaptive_entropy_coef(0.005, 0.6, **kwargs) == 0.0  # above target: less, floored at the min
    with pytest.raises(ValueError, match="`entropy_coef_min`"):
        adaptive_entropy_coef(0.1, 0.1, entropy_coef_min=0.5, entropy_coef_max=0.2)
    with pytest.raises(ValueError, match="`entropy_coef_delta`"):
        adaptive_entropy_coef(0.1, 0.1, entropy_coef_delta=-0.1)


@pytest.mark.parametrize("last_entropy", [math.inf, 5.0, 0.1])
@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.4])
def test_adaptive_entropy_parity_with_trl(last_entropy, top_entropy_quantile):
    # One micro-batch is the whole accumulation window here (sync_gradients): TRL measures it, then updates.
    adaptive = {"entropy_target": 2.0, "entropy_coef_delta": 0.003, "entropy_coef_min": 0.0, "entropy_coef_max": 0.1}
    settings = {
        **DEFAULT_SETTINGS,
        "loss_type": "dapo",
        "entropy_coef": 0.02,
        "top_entropy_quantile": top_entropy_quantile,
    }
    tensors = make_tensors(settings)
    trl_loss, trl_grad, _, _, stand_in = trl_grpo_compute_loss(
        settings, tensors, {**adaptive, "last_entropy": last_entropy}
    )
    applied = settings["entropy_coef"] if last_entropy <= adaptive["entropy_target"] else 0.0
    out, grad, _, _, accumulation = ours_grpo({**settings, "entropy_coef": applied}, tensors)
    assert (out.loss / accumulation).item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-12)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-12)
    # The window entropy TRL's controller reads: over the bonus mask (the entropy mask when one is used).
    mask = tensors["mask"].double()
    if top_entropy_quantile < 1.0:
        mask = mask * high_entropy_mask(tensors["entropies"], tensors["mask"], 1 - top_entropy_quantile)
    window_entropy = ((tensors["entropies"] * mask).sum() / mask.sum()).item()
    assert stand_in._last_world_entropy == pytest.approx(window_entropy, rel=1e-12)
    expected = adaptive_entropy_coef(settings["entropy_coef"], window_entropy, **adaptive)
    assert stand_in.entropy_coef == pytest.approx(expected, rel=1e-12)
