"""PPO's pure pieces (``lightning_llm.losses.ppo``) against hand-worked values: masked statistics, TRL 1.12's response
and value masks (the score one position past the last response token, full and empty responses), the KL estimators,
per-token rewards with the missing-EOS penalty and reward whitening, GAE, the clipped policy and value losses at their
clip boundaries, argument validation; and the whole rollout-to-loss pipeline against an independent float64
plain-Python reference of TRL 1.12's ``PPOTrainer.train`` arithmetic."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_llm.losses.ppo import (
    CLIPRANGE,
    CLIPRANGE_VALUE,
    GAMMA,
    KL_COEF,
    KL_ESTIMATOR,
    LAM,
    VF_COEF,
    WHITEN_REWARDS,
    apply_missing_eos_penalty,
    check_ppo_arguments,
    entropy_from_logits,
    first_true_indices,
    gae_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_kl,
    ppo_loss,
    ppo_policy_loss,
    ppo_response_mask,
    ppo_rewards,
    ppo_score_indices,
    ppo_value_loss,
    ppo_value_mask,
    truncate_response,
)

F64 = torch.float64
NAN = math.nan


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def prefix_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[t < n for t in range(width)] for n in lengths])


def test_trl_1_12_defaults():
    assert (KL_COEF, CLIPRANGE, VF_COEF, CLIPRANGE_VALUE, GAMMA, LAM) == (0.05, 0.2, 0.1, 0.2, 1.0, 0.95)
    assert (WHITEN_REWARDS, KL_ESTIMATOR) == (False, "k1")


# ------------------------------------------------------------------------------------------------------------------
# Masked statistics
# ------------------------------------------------------------------------------------------------------------------


def test_masked_mean_ignores_masked_values_even_nan():
    x = t64([[1.0, 2.0, NAN], [4.0, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0, abs=1e-15)
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 4.0]
    assert math.isnan(masked_mean(x, torch.zeros_like(mask)).item())  # 0 / 0, as TRL
    with pytest.raises(ValueError, match="shape"):
        masked_mean(x, mask[:, :2])


def test_masked_var_bessel_correction_and_its_limits():
    x = t64([[1.0, 2.0, 100.0], [3.0, 6.0, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # values 1, 2, 3: mean 2, squared deviations 1 + 0 + 1 = 2; biased 2/3, unbiased 2/3 * 3/2 = 1.
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0, abs=1e-15)
    assert masked_var(x, mask).item() == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match="at least two"):
        masked_var(x, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="got 1"):  # TRL would return NaN here
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_masked_whiten_by_hand():
    x = t64([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    scale = 1.0 / math.sqrt(1.0 + 1e-8)  # mean 2, unbiased variance 1
    expected = [(v - 2.0) * scale for v in (1.0, 2.0, 3.0, 50.0)]  # every position is transformed
    torch.testing.assert_close(masked_whiten(x, mask), t64([expected]), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), t64([[e + 2.0 for e in expected]]))


def run_as_processes(fn, *shares):
    """``fn(share, sum_across)`` on each share in its own thread, with ``sum_across`` summing a tensor over the
    threads (an all-reduce of two simulated processes); returns each thread's result."""
    import threading

    barrier = threading.Barrier(len(shares))
    slots: list = [None] * len(shares)
    results: list = [None] * len(shares)

    def worker(rank: int) -> None:
        def sum_across(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()  # every thread has read the slots before any writes them again
            return total

        results[rank] = fn(shares[rank], sum_across)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(len(shares))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_whitening_over_processes_equals_whitening_the_whole_batch():
    """Each process whitening its own rows with the statistics of every process's rows gives the whitening of the
    concatenated batch, for rewards (scaled, not shifted) and GAE advantages; without ``sum_across`` a process's
    result is that of its own rows alone (TRL's behaviour), which differs."""
    generator = torch.Generator().manual_seed(3)
    lengths, width = [3, 5, 1, 4, 2, 5], 6
    mask = prefix_mask(lengths, width)
    logprobs, ref_logprobs = (torch.randn(6, width, generator=generator, dtype=F64) for _ in range(2))
    scores, values = torch.randn(6, generator=generator, dtype=F64), torch.randn(6, width, generator=generator,
                                                                                 dtype=F64)
    whole = masked_whiten(logprobs, mask)
    halves = run_as_processes(lambda rows, sum_across: masked_whiten(logprobs[rows], mask[rows],
                                                                      sum_across=sum_across),
                              slice(0, 2), slice(2, 6))
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-12, atol=1e-12)
    assert (masked_whiten(logprobs[:2], mask[:2]) - whole[:2]).abs().max() > 1e-2

    def rollout(rows, sum_across=None):
        rewards = ppo_rewards(logprobs[rows], ref_logprobs[rows], scores[rows], mask[rows], whiten_rewards=True,
                              sum_across=sum_across)
        gae = gae_advantages(rewards.rewards, values[rows], mask[rows], sum_across=sum_across)
        return torch.cat([rewards.rewards, gae.advantages, gae.returns], dim=1)

    split = run_as_processes(rollout, slice(0, 3), slice(3, 6))
    torch.testing.assert_close(torch.cat(split), rollout(slice(0, 6)), rtol=1e-12, atol=1e-12)
    assert (rollout(slice(0, 3)) - split[0]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="dim=None"):
        masked_mean(logprobs, mask, dim=1, sum_across=lambda tensor: tensor)


# ------------------------------------------------------------------------------------------------------------------
# Response processing
# ------------------------------------------------------------------------------------------------------------------


def test_first_true_indices_and_truncation():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    assert first_true_indices(bools).tolist() == [1, 3, 0]
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    # stop token 2 kept, the rest padded with 0; a row without it is unchanged.
    assert truncate_response(responses, 2, 0).tolist() == [[5, 2, 0, 0], [5, 6, 7, 8]]


def test_response_mask_with_pad_equal_to_eos_leaves_eos_out():
    eos = pad = 2
    responses = torch.tensor([[5, 6, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    mask = ppo_response_mask(responses, pad)
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert eos == pad  # the EOS at index 2 of row 0 is the first pad: outside the mask


def test_response_mask_with_a_distinct_pad_keeps_eos_in():
    responses = torch.tensor([[5, 2, 0, 0]])  # eos 2, pad 0
    assert ppo_response_mask(responses, 0).int().tolist() == [[1, 1, 0, 0]]


def test_value_mask_and_score_index_one_past_the_response():
    # L = 1 (two tokens), L = 3 = T - 1 (full), L = -1 (empty), L = 2.
    mask = prefix_mask([2, 4, 0, 3], 4)
    assert ppo_value_mask(mask).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ppo_score_indices(mask).tolist() == [2, 3, 0, 3]


def test_non_prefix_masks_are_refused():
    with pytest.raises(ValueError, match=r"prefix mask.*rows \[1\]"):
        ppo_value_mask(torch.tensor([[1, 1, 0], [1, 0, 1]]))
    with pytest.raises(ValueError, match="at least one position"):
        ppo_score_indices(torch.zeros(2, 0, dtype=torch.bool))


def test_missing_eos_penalty():
    scores = t64([1.0, 2.0, 3.0])
    eos = torch.tensor([True, False, True])
    assert apply_missing_eos_penalty(scores, eos, 0.5).tolist() == [1.0, 1.5, 3.0]
    assert apply_missing_eos_penalty(scores, eos, None).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=">= 0"):
        apply_missing_eos_penalty(scores, eos, -1.0)
    with pytest.raises(ValueError, match=r"\[batch\]"):
        apply_missing_eos_penalty(scores, eos[:2], 1.0)


# ------------------------------------------------------------------------------------------------------------------
# KL and rewards
# ------------------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logprobs = t64([[-1.0, -2.0, NAN]])
    ref = t64([[-1.5, -1.0, NAN]])
    mask = torch.tensor([[1, 1, 0]])
    # k1 = logp - ref: 0.5, -1.0. k3 with x = ref - logp: (e^x - 1) - x.
    torch.testing.assert_close(ppo_kl(logprobs, ref, mask, "k1"), t64([[0.5, -1.0, 0.0]]))
    k3 = [(math.exp(x) - 1) - x for x in (-0.5, 1.0)]
    torch.testing.assert_close(ppo_kl(logprobs, ref, mask, "k3"), t64([k3 + [0.0]]), rtol=1e-15, atol=1e-15)
    assert all(v > 0 for v in k3)
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo_kl(logprobs, ref, mask, "k2")


def test_rewards_place_the_score_one_past_the_last_token():
    # Row 0: two tokens (score at 2). Row 1: full (score at 2 = T - 1). Row 2: empty (score at 0).
    logprobs = t64([[-1.0, -2.0, NAN], [-1.0, -1.0, -1.0], [NAN, NAN, NAN]])
    ref = t64([[-1.5, -1.0, NAN], [-2.0, -1.0, -0.5], [NAN, NAN, NAN]])
    scores = t64([10.0, 20.0, 30.0])
    mask = prefix_mask([2, 3, 0], 3)
    out = ppo_rewards(logprobs, ref, scores, mask, kl_coef=0.1)
    kl = [[0.5, -1.0, 0.0], [1.0, 0.0, -0.5], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(out.kl, t64(kl))
    expected = [[-0.05, 0.1, 10.0], [-0.1, 0.0, 0.05 + 20.0], [30.0, 0.0, 0.0]]
    torch.testing.assert_close(out.rewards, t64(expected), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.non_score_rewards, -0.1 * t64(kl))
    assert out.scores.tolist() == [10.0, 20.0, 30.0]
    torch.testing.assert_close(out.sequence_entropy, t64([3.0, 3.0, 0.0]))
    metrics = out.metrics()
    assert metrics["objective/kl"].item() == pytest.approx((-0.5 + 0.5 + 0.0) / 3, abs=1e-15)
    assert metrics["objective/entropy"].item() == pytest.approx(2.0, abs=1e-15)
    assert metrics["objective/non_score_reward"].item() == pytest.approx(-0.1 * 0.0, abs=1e-15)
    assert metrics["objective/scores"].item() == pytest.approx(20.0)
    assert metrics["objective/rlhf_reward"].item() == pytest.approx(20.0)


def test_rewards_apply_the_missing_eos_penalty_to_scores():
    mask = prefix_mask([1, 1], 2)
    zeros = torch.zeros(2, 2, dtype=F64)
    out = ppo_rewards(zeros, zeros, t64([1.0, 1.0]), mask, missing_eos_penalty=2.0,
                      contains_eos=torch.tensor([True, False]))
    assert out.scores.tolist() == [1.0, -1.0]
    assert out.rewards.tolist() == [[0.0, 1.0], [0.0, -1.0]]
    with pytest.raises(ValueError, match="contains_eos"):
        ppo_rewards(zeros, zeros, t64([1.0, 1.0]), mask, missing_eos_penalty=2.0)


def test_reward_whitening_scales_over_the_value_mask_without_shifting():
    # k1 KL is 0 everywhere; the only rewards are the scores: row 0 at index 1, row 1 at index 2 (full row).
    mask = prefix_mask([1, 3], 3)
    zeros = torch.zeros(2, 3, dtype=F64)
    out = ppo_rewards(zeros, zeros, t64([3.0, 6.0]), mask, whiten_rewards=True)
    # Value mask: row 0 positions 0, 1; row 1 positions 0, 1, 2 -> values 0, 3, 0, 0, 6: mean 1.8,
    # squared deviations 3.24 + 1.44 + 3.24 + 3.24 + 17.64 = 28.8, unbiased variance 28.8 / 4 = 7.2.
    scale = 1.0 / math.sqrt(7.2 + 1e-8)
    w = lambda v: (v - 1.8) * scale + 1.8
    expected = [[w(0.0), w(3.0), 0.0], [w(0.0), w(0.0), w(6.0)]]
    torch.testing.assert_close(out.rewards, t64(expected), rtol=1e-14, atol=1e-14)


def test_rewards_argument_checks():
    mask = prefix_mask([1], 2)
    zeros = torch.zeros(1, 2, dtype=F64)
    with pytest.raises(ValueError, match="kl_coef"):
        ppo_rewards(zeros, zeros, t64([1.0]), mask, kl_coef=-0.1)
    with pytest.raises(ValueError, match=r"`scores` must be \[batch\]"):
        ppo_rewards(zeros, zeros, t64([1.0, 2.0]), mask)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_rewards(zeros, zeros[:, :1], t64([1.0]), mask)


# ------------------------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------------------------


def python_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """Plain GAE over one row: A_t = Σ_k (γλ)^k δ_{t+k}, δ_t = r_t + γ V_{t+1} - V_t, V_T = 0."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    advantages = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_gae_by_hand_without_whitening():
    # One row, one response token (L = 0); the score 1.0 sits at index 1; index 2 is beyond the value mask.
    rewards = t64([[-0.1, 1.0, 0.0]])
    values = t64([[0.5, 0.25, 99.0]])  # 99 is ignored (TRL zero-fills values past L + 1)
    mask = prefix_mask([1], 3)
    out = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5, whiten_advantages=False)
    a1 = 1.0 + 0.9 * 0.0 - 0.25  # 0.75
    a0 = (-0.1 + 0.9 * 0.25 - 0.5) + 0.9 * 0.5 * a1  # -0.375 + 0.3375 = -0.0375
    torch.testing.assert_close(out.advantages, t64([[a0, 0.0, 0.0]]), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.returns, t64([[a0 + 0.5, 1.0, 0.0]]), rtol=1e-14, atol=1e-14)
    assert out.values.tolist() == [[0.5, 0.25, 0.0]]


def test_gae_matches_a_plain_loop_and_whitens_over_the_response_mask():
    rng = random.Random(0)
    lengths, width = [3, 5, 0, 1], 5
    rewards = [[rng.uniform(-1, 1) if t <= n else 0.0 for t in range(width)] for n in lengths]
    values = [[rng.uniform(-1, 1) if t <= n else 0.0 for t in range(width)] for n in lengths]
    gamma, lam = 0.97, 0.9
    raw, returns = zip(*(python_gae(r, v, gamma, lam) for r, v in zip(rewards, values)))
    mask = prefix_mask(lengths, width)
    out = gae_advantages(t64(rewards), t64(values), mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(out.returns, t64(list(returns)), rtol=1e-12, atol=1e-12)
    kept = [raw[i][t] for i, n in enumerate(lengths) for t in range(n)]
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((a - mean) ** 2 for a in kept) / (len(kept) - 1) + 1e-8)
    expected = [[(raw[i][t] - mean) / std if t < n else 0.0 for t in range(width)] for i, n in enumerate(lengths)]
    torch.testing.assert_close(out.advantages, t64(expected), rtol=1e-12, atol=1e-12)


def test_gae_argument_checks():
    x = torch.zeros(1, 2, dtype=F64)
    mask = prefix_mask([2], 2)
    for kwargs in ({"gamma": 1.5}, {"lam": -0.1}):
        with pytest.raises(ValueError, match="must lie in"):
            gae_advantages(x, x, mask, **kwargs)
    with pytest.raises(ValueError, match="values"):
        gae_advantages(x, x[:, :1], mask)


# ------------------------------------------------------------------------------------------------------------------
# Policy and value losses
# ------------------------------------------------------------------------------------------------------------------


def test_policy_loss_clip_boundaries_by_hand():
    # Token ratios 1.5 (A>0: clipped), r_b = 1 + ε exactly (A>0: on the boundary, not counted as clipped),
    # 0.5 (A<0: clipped at 1 - ε), 0.5 (A>0: not clipped, the unclipped term is larger), then a padded position.
    log_ratios = t64([math.log(1.5), math.log(1.25), math.log(0.5), math.log(0.5)])
    r = torch.exp(log_ratios).tolist()
    eps = r[1] - 1.0  # exact: 1 + (r_b - 1) == r_b
    old = t64([[0.0, 0.0, 0.0, 0.0, NAN]])
    logprobs = torch.cat([log_ratios, t64([NAN])]).unsqueeze(0).requires_grad_()
    advantages = t64([[2.0, 1.0, -1.0, 3.0, 7.0]])
    mask = prefix_mask([4], 5)
    out = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=eps)
    per_token = [-2.0 * (1 + eps), -1.0 * r[1], 1.0 * (1 - eps), -3.0 * r[3]]
    assert out.loss.item() == pytest.approx(sum(per_token) / 4, abs=1e-12)
    assert out.policy_clipfrac.item() == pytest.approx(2 / 4)
    # approxkl and ratio_mean average over all five positions (the padded one as log-ratio 0, ratio 1).
    assert out.approxkl.item() == pytest.approx(0.5 * sum(math.log(x) ** 2 for x in r) / 5, abs=1e-12)
    assert out.ratio_mean.item() == pytest.approx((sum(r) + 1.0) / 5, abs=1e-12)
    out.loss.backward()
    # Clipped tokens get no gradient; an unclipped one d(-A r)/d log π / 4; padding none.
    grad = logprobs.grad[0]
    torch.testing.assert_close(grad[[0, 2, 3, 4]], t64([0.0, 0.0, -3.0 * r[3] / 4, 0.0]), rtol=1e-12, atol=1e-12)


def test_policy_loss_on_policy_is_minus_the_mean_advantage():
    logprobs = t64([[-1.0, -2.0], [-0.5, NAN]])
    advantages = t64([[1.0, -3.0], [0.5, 0.0]])
    out = ppo_policy_loss(logprobs, logprobs, advantages, prefix_mask([2, 1], 2))
    assert out.loss.item() == pytest.approx(-(1.0 - 3.0 + 0.5) / 3)
    assert out.approxkl.item() == 0.0 and out.ratio_mean.item() == 1.0 and out.policy_clipfrac.item() == 0.0


def test_value_loss_clip_boundaries_by_hand():
    eps = 0.2
    old = t64([[1.0, 1.0, 1.0, 0.0]])
    returns = t64([[2.0, 0.0, 1.1, 3.0]])
    values = t64([[1.5, 1.1, 1.2, 4.0]]).requires_grad_()
    mask = prefix_mask([2], 4)  # value mask: positions 0, 1, 2
    out = ppo_value_loss(values, old, returns, mask, cliprange_value=eps)
    # 0: V 1.5 clipped to 1.2 -> max(0.25, 0.64) = 0.64 (clipped counts). 1: V 1.1 within the range -> 1.21.
    # 2: V 1.2 exactly at the boundary -> equal, 0.01, not counted. 3: outside the value mask.
    assert out.loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 0.01) / 3, abs=1e-12)
    assert out.value_clipfrac.item() == pytest.approx(1 / 3)
    out.loss.backward()
    # The clipped max has no gradient at 0; at 1: 0.5 · 2 (V - G) / 3; at 2 the tie picks one branch (value 0.2/3).
    torch.testing.assert_close(values.grad[0, :2], t64([0.0, 1.1 / 3]), rtol=1e-12, atol=1e-12)
    assert values.grad[0, 3].item() == 0.0


def test_combined_loss_weights_the_value_loss():
    logprobs = t64([[-1.0, -2.0]])
    old = t64([[-1.1, -1.9]])
    advantages = t64([[0.5, -0.5]])
    values, old_values, returns = t64([[0.3, 0.1]]), t64([[0.2, 0.0]]), t64([[1.0, 0.5]])
    mask = prefix_mask([1], 2)
    policy = ppo_policy_loss(logprobs, old, advantages, mask)
    value = ppo_value_loss(values, old_values, returns, mask)
    out = ppo_loss(logprobs, old, advantages, values, old_values, returns, mask, vf_coef=0.3)
    assert out.loss.item() == pytest.approx(policy.loss.item() + 0.3 * value.loss.item(), abs=1e-15)
    assert out.value_loss.item() == value.loss.item() and out.policy_loss.item() == policy.loss.item()
    with pytest.raises(ValueError, match="vf_coef"):
        ppo_loss(logprobs, old, advantages, values, old_values, returns, mask, vf_coef=-1.0)


def test_loss_argument_checks():
    x = torch.zeros(1, 2, dtype=F64)
    mask = prefix_mask([2], 2)
    with pytest.raises(ValueError, match="cliprange"):
        ppo_policy_loss(x, x, x, mask, cliprange=-0.1)
    with pytest.raises(ValueError, match="cliprange_value"):
        ppo_value_loss(x, x, x, mask, cliprange_value=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(x, x, x[:, :1], mask)
    with pytest.raises(ValueError, match="2-D"):
        ppo_value_loss(x[0], x[0], x[0], mask[0])


def test_entropy_from_logits():
    logits = t64([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, -1.0]]])
    probs = torch.softmax(logits[0, 1], dim=-1)
    assert entropy_from_logits(logits)[0, 0].item() == pytest.approx(math.log(4.0), abs=1e-15)
    assert entropy_from_logits(logits)[0, 1].item() == pytest.approx(-(probs * probs.log()).sum().item(), abs=1e-14)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kl_estimator": "k2"}, "kl_estimator"),
    ({"kl_coef": -1.0}, "kl_coef"),
    ({"cliprange": -0.1}, "cliprange"),
    ({"vf_coef": -0.1}, "vf_coef"),
    ({"cliprange_value": float("nan")}, "cliprange_value"),
    ({"gamma": 1.01}, "gamma"),
    ({"lam": -0.5}, "lam"),
    ({"missing_eos_penalty": -1.0}, "missing_eos_penalty"),
])  # fmt: skip
def test_arguments_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_ppo_arguments(**kwargs)
    check_ppo_arguments()


# ------------------------------------------------------------------------------------------------------------------
# The pipeline against an independent plain-Python float64 reference of TRL 1.12's PPOTrainer.train arithmetic
# ------------------------------------------------------------------------------------------------------------------


def reference_ppo(responses, pad, logp, ref, values, scores, has_eos, new_logp, new_values, *, kl_coef, estimator,
                  penalty, whiten, gamma, lam, eps, eps_v, vf_coef):
    """TRL 1.12 PPO from rollout to micro-batch loss, one number at a time (lists of floats, no tensors)."""
    batch, width = len(responses), len(responses[0])
    last = [next((t for t, tok in enumerate(row) if tok == pad), width) - 1 for row in responses]
    in_response = [[t <= last[i] for t in range(width)] for i in range(batch)]
    in_value = [[t <= last[i] + 1 for t in range(width)] for i in range(batch)]
    scores = [s - penalty if not e else s for s, e in zip(scores, has_eos)]
    kl = [[0.0] * width for _ in range(batch)]
    for i in range(batch):
        for t in range(last[i] + 1):
            x = ref[i][t] - logp[i][t]
            kl[i][t] = -x if estimator == "k1" else math.expm1(x) - x
    rewards = [[-kl_coef * kl[i][t] for t in range(width)] for i in range(batch)]
    for i in range(batch):
        rewards[i][min(last[i] + 1, width - 1)] += scores[i]

    def whiten_over(x, keep, shift):
        kept = [x[i][t] for i in range(batch) for t in range(width) if keep[i][t]]
        mean = sum(kept) / len(kept)
        var = sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
        return [[(x[i][t] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift else mean) for t in range(width)]
                for i in range(batch)]

    if whiten:
        rewards = whiten_over(rewards, in_value, shift=False)
        rewards = [[rewards[i][t] if in_value[i][t] else 0.0 for t in range(width)] for i in range(batch)]
    values = [[values[i][t] if in_value[i][t] else 0.0 for t in range(width)] for i in range(batch)]
    raw, returns = zip(*(python_gae(r, v, gamma, lam) for r, v in zip(rewards, values)))
    advantages = whiten_over(raw, in_response, shift=True)
    advantages = [[advantages[i][t] if in_response[i][t] else 0.0 for t in range(width)] for i in range(batch)]

    pg, pg_clip, vf, vf_clip, sq_log_ratio, ratio_sum = [], [], [], [], 0.0, 0.0
    for i in range(batch):
        for t in range(width):
            if in_response[i][t]:
                r = math.exp(new_logp[i][t] - logp[i][t])
                a = advantages[i][t]
                plain, clipped = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
                pg.append(max(plain, clipped))
                pg_clip.append(float(clipped > plain))
                sq_log_ratio += (new_logp[i][t] - logp[i][t]) ** 2
                ratio_sum += r
            else:
                ratio_sum += 1.0
            if in_value[i][t]:
                v, old, g = new_values[i][t], values[i][t], returns[i][t]
                plain, clipped = (v - g) ** 2, (min(max(v, old - eps_v), old + eps_v) - g) ** 2
                vf.append(max(plain, clipped))
                vf_clip.append(float(clipped > plain))
    policy_loss = sum(pg) / len(pg)
    value_loss = 0.5 * sum(vf) / len(vf)
    entropy = [-sum(logp[i][t] for t in range(last[i] + 1)) for i in range(batch)]
    return {
        "rewards": rewards, "advantages": advantages, "returns": [list(r) for r in returns], "scores": scores,
        "loss": policy_loss + vf_coef * value_loss, "policy_loss": policy_loss, "value_loss": value_loss,
        "policy_clipfrac": sum(pg_clip) / len(pg_clip), "value_clipfrac": sum(vf_clip) / len(vf_clip),
        "approxkl": 0.5 * sq_log_ratio / (batch * width), "ratio_mean": ratio_sum / (batch * width),
        "objective/kl": sum(map(sum, kl)) / batch, "objective/entropy": sum(entropy) / batch,
        "objective/scores": sum(scores) / batch,
        "objective/rlhf_reward": -kl_coef * sum(map(sum, kl)) / batch + sum(scores) / batch,
    }


@pytest.mark.parametrize("seed", range(6))
def test_pipeline_matches_the_plain_python_reference(seed):
    rng = random.Random(seed)
    pad = 0
    batch, width = 5, 6
    responses = []
    for i in range(batch):
        cut = 0 if i == 0 else rng.randint(1, width)  # row 0 empty; some rows full
        responses.append([rng.randint(1, 9) if t < cut else pad for t in range(width)])
    mat = lambda lo, hi: [[rng.uniform(lo, hi) for _ in range(width)] for _ in range(batch)]
    logp, ref, values = mat(-3, 0), mat(-3, 0), mat(-1, 1)
    new_logp = [[lp + rng.uniform(-0.4, 0.4) for lp in row] for row in logp]
    new_values = [[v + rng.uniform(-0.5, 0.5) for v in row] for row in values]
    scores = [rng.uniform(-2, 2) for _ in range(batch)]
    has_eos = [rng.random() < 0.5 for _ in range(batch)]
    settings = {"kl_coef": 0.05, "estimator": ["k1", "k3"][seed % 2], "penalty": 1.0, "whiten": seed % 3 == 0,
                "gamma": [1.0, 0.95][seed % 2], "lam": 0.95, "eps": 0.2, "eps_v": 0.2, "vf_coef": 0.1}
    expected = reference_ppo(responses, pad, logp, ref, values, scores, has_eos, new_logp, new_values, **settings)

    mask = ppo_response_mask(torch.tensor(responses), pad)
    nan_outside = lambda x, keep: torch.where(keep, t64(x), NAN)  # masked-out inputs must not matter
    rollout = ppo_rewards(nan_outside(logp, mask), nan_outside(ref, mask), t64(scores), mask,
                          kl_coef=settings["kl_coef"], kl_estimator=settings["estimator"],
                          missing_eos_penalty=settings["penalty"], contains_eos=torch.tensor(has_eos),
                          whiten_rewards=settings["whiten"])
    gae = gae_advantages(rollout.rewards, nan_outside(values, ppo_value_mask(mask)), mask, gamma=settings["gamma"],
                         lam=settings["lam"])
    out = ppo_loss(nan_outside(new_logp, mask), nan_outside(logp, mask), gae.advantages,
                   nan_outside(new_values, ppo_value_mask(mask)), gae.values, gae.returns, mask,
                   cliprange=settings["eps"], cliprange_value=settings["eps_v"], vf_coef=settings["vf_coef"])

    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rollout.rewards, t64(expected["rewards"]), **close)
    torch.testing.assert_close(rollout.scores, t64(expected["scores"]), **close)
    torch.testing.assert_close(gae.advantages, t64(expected["advantages"]), **close)
    torch.testing.assert_close(gae.returns, t64(expected["returns"]), **close)
    for name in ("loss", "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approxkl", "ratio_mean"):
        assert getattr(out, name).item() == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name
    for name, value in rollout.metrics().items():
        if name in expected:
            assert value.item() == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name
