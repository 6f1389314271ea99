"""RLOO: the leave-one-out baseline (with unscorable siblings), reward shaping, the clipped sequence loss and its
metrics against hand-worked values, argument validation, and parity with TRL 1.16's own arithmetic
(``RLOOTrainer._compute_loss`` on a stand-in trainer, and the advantage block of ``_generate_and_score_completions``
run from TRL's source) in float64."""

from __future__ import annotations

import inspect
import math
import textwrap
import types
from collections import defaultdict

import pytest
import torch

from lightning_llm.losses.grpo import weighted_rewards
from lightning_llm.losses.rloo import (
    rloo_advantages,
    rloo_loss,
    rloo_metrics,
    rloo_sequence_kl,
    rloo_sequence_logps,
)

NAN = math.nan
F64 = torch.float64


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# Four groups of three: all scorable; one unscorable sibling; a single scorable completion; nothing scorable.
REWARDS = [1.0, 2.0, 6.0, 1.0, NAN, 6.0, NAN, 3.0, NAN, NAN, NAN, NAN]


def test_leave_one_out_baseline_over_scorable_siblings():
    out = rloo_advantages(t64(REWARDS), 3)
    # Group 0: b_i = (9 - r_i) / 2 = 4, 3.5, 1.5. Group 1: the NaN sibling neither counts nor adds: b = 6 and 1.
    expected_baselines = [4.0, 3.5, 1.5, 6.0, NAN, 1.0, NAN, NAN, NAN, NAN, NAN, NAN]
    torch.testing.assert_close(out.baselines, t64(expected_baselines), equal_nan=True)
    # Unscorable completions and the lone scorable one (0/0 baseline) get advantage 0.
    torch.testing.assert_close(out.advantages, t64([-3.0, -1.5, 4.5, -5.0, 0.0, 5.0] + [0.0] * 6))
    torch.testing.assert_close(out.std[:2], t64([math.sqrt(7.0), math.sqrt(12.5)]))  # Bessel: 14 / 2, 12.5 / 1
    assert torch.isnan(out.std[2:]).all()
    assert not out.is_std_zero.any()
    assert out.unscorable.tolist() == [math.isnan(r) for r in REWARDS]


def test_two_generations_and_a_constant_group():
    out = rloo_advantages(t64([1.0, 3.0, 2.0, 2.0]), 2)
    torch.testing.assert_close(out.advantages, t64([-2.0, 2.0, 0.0, 0.0]))  # b_i is the other completion's reward
    assert out.is_std_zero.tolist() == [False, True]  # frac_reward_zero_std = 0.5


def test_normalized_advantages_use_the_defined_ones_only():
    out = rloo_advantages(t64(REWARDS), 3, normalize_advantages=True)
    defined = [-3.0, -1.5, 4.5, -5.0, 5.0]  # mean 0
    std = math.sqrt(sum(a * a for a in defined) / 4)
    expected = [a / (std + 1e-4) for a in defined[:4]] + [0.0, defined[4] / (std + 1e-4)] + [0.0] * 6
    torch.testing.assert_close(out.advantages, t64(expected), rtol=1e-14, atol=1e-14)


def test_reward_clipping_then_kl_shaping():
    kl = t64([2.0, -1.0])
    out = rloo_advantages(t64([1.0, 5.0]), 2, reward_clip_range=(0.0, 4.0), beta=0.5, sequence_kl=kl)
    # clip -> (1, 4); minus β KL -> (0, 4.5); leave-one-out -> ∓4.5.
    torch.testing.assert_close(out.rewards, t64([0.0, 4.5]))
    torch.testing.assert_close(out.advantages, t64([-4.5, 4.5]))


def test_single_generation_gives_zero_advantages():
    out = rloo_advantages(t64([1.0, 4.0]), 1)
    torch.testing.assert_close(out.advantages, t64([0.0, 0.0]))
    assert out.is_std_zero.all()


def test_sequence_kl_and_logps():
    old = t64([[-1.0, -2.0, -3.0]])
    ref = t64([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(rloo_sequence_kl(old, ref, mask), t64([0.5 - 1.0]))  # k1, summed, can be negative
    torch.testing.assert_close(rloo_sequence_logps(old, mask), t64([-3.0]))


# Sequence ratios and advantages that hit every branch of the clip (ε_low = 0.2, ε_high = 0.28).
RATIOS = [1.5, 0.5, 0.5, 3.0, 1.0, 1.25]
ADVANTAGES = [1.0, 1.0, -1.0, -1.0, 2.0, 1.0]


def test_clipped_sequence_loss_hand_values():
    logps = torch.log(t64(RATIOS)).requires_grad_()
    out = rloo_loss(logps, torch.zeros(6, dtype=F64), t64(ADVANTAGES), epsilon_low=0.2, epsilon_high=0.28)
    # -min(r A, clip(r) A): -1.28 (high clip), -0.5, 0.8 (low clip), 3 (A < 0 is unbounded above), -2, and -1.25
    # (above 1 + ε_low but inside 1 + ε_high).
    torch.testing.assert_close(out.per_sequence_loss, t64([-1.28, -0.5, 0.8, 3.0, -2.0, -1.25]))
    assert out.loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 3.0 - 2.0 - 1.25) / 6, abs=1e-14)
    out.loss.backward()
    # d/dlog r of -r A is -r A where unclipped, 0 where clipped; the mean divides by 6.
    torch.testing.assert_close(logps.grad, t64([0.0, -0.5, 0.0, 3.0, -2.0, -1.25]) / 6)
    assert out.is_low_clipped.tolist() == [False, False, True, False, False, False]
    assert out.is_high_clipped.tolist() == [True, False, False, False, False, False]
    metrics = rloo_metrics(out, t64([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[1, 1], [1, 0]]))
    torch.testing.assert_close(metrics.sums["clip_ratio/low_mean"], t64([1.0, 6.0]))
    assert metrics.local() == pytest.approx({
        "clip_ratio/low_mean": 1 / 6, "clip_ratio/high_mean": 1 / 6, "clip_ratio/region_mean": 2 / 6,
        "clip_ratio/low_min": 0.0, "clip_ratio/high_max": 1.0, "entropy": 2.0,
    })  # fmt: skip


def test_symmetric_epsilon_by_default():
    out = rloo_loss(torch.log(t64([1.25])), t64([0.0]), t64([1.0]))
    assert out.loss.item() == pytest.approx(-1.2, abs=1e-14)  # ε_high defaults to ε_low = 0.2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rloo_advantages(torch.zeros(5), 2), "5 completions.*`num_generations`=2"),
        (lambda: rloo_advantages(torch.zeros(4, 1), 2), "1-D"),
        (lambda: rloo_advantages(torch.zeros(4), 2, beta=0.1), "`sequence_kl`"),
        (lambda: rloo_advantages(torch.zeros(4), 2, beta=0.1, sequence_kl=torch.zeros(3)), "`sequence_kl` must"),
        (lambda: rloo_advantages(torch.zeros(4), 2, beta=-0.1), "`beta`"),
        (lambda: rloo_advantages(torch.zeros(4), 2, reward_clip_range=(1.0, 0.0)), "`reward_clip_range`"),
        (lambda: rloo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), epsilon_low=-0.1), "`epsilon_low`"),
        (lambda: rloo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), epsilon_high=-0.1), "`epsilon_high`"),
        (lambda: rloo_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3)), "`old_logps` must have the shape"),
        (lambda: rloo_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1)), "`logps` must be 1-D"),
        (lambda: rloo_sequence_kl(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 2)), "`mask`"),
        (lambda: rloo_sequence_logps(torch.zeros(2, 3), torch.ones(2, 2)), "`mask`"),
    ],
)
def test_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call()


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


def trl_rloo_advantages(rewards_per_func, weights, old, ref, mask, settings):
    trainer = pytest.importorskip("trl.trainer.rloo_trainer")
    block = trl_source_block(
        trainer.RLOOTrainer._generate_and_score_completions,
        "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)",
        "is_std_zero = torch.isclose(std_rewards",
    )
    stand_in = types.SimpleNamespace(
        reward_weights=weights,
        reward_clip_range=settings["reward_clip_range"],
        beta=settings["beta"],
        normalize_advantages=settings["normalize_advantages"],
    )
    namespace = {
        "self": stand_in, "rewards_per_func": rewards_per_func.clone(), "num_generations": settings["num_generations"],
        "device": rewards_per_func.device, "torch": torch, "nanstd": trainer.nanstd, "gather": lambda x: x,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "completion_mask": mask,
    }  # fmt: skip
    exec(block, namespace)
    return namespace


ADVANTAGE_CASES = [
    {"normalize_advantages": normalize, "beta": beta, "reward_clip_range": clip, "num_generations": g}
    for normalize in (False, True)
    for beta in (0.0, 0.05)
    for clip in (None, (-1.0, 0.8))
    for g in (4, 2)
] + [{"normalize_advantages": False, "beta": 0.05, "reward_clip_range": None, "num_generations": 1}]


@pytest.mark.parametrize("settings", ADVANTAGE_CASES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_advantages_parity_with_trl(settings):
    generator = torch.Generator().manual_seed(0)
    num, length = 16, 5
    rewards_per_func = torch.randn(num, 2, generator=generator, dtype=F64)
    rewards_per_func[torch.rand(num, 2, generator=generator) < 0.25] = NAN
    rewards_per_func[[1, 8, 9, 10]] = NAN  # unscorable rows; with G = 4 group 2 keeps one scorable completion
    rewards_per_func[12:16] = t64([0.5, 0.5])  # a constant group
    weights = t64([1.0, -0.5])
    mask = (torch.arange(length) < torch.randint(0, length + 1, (num, 1), generator=generator)).long()
    old = -torch.rand(num, length, generator=generator, dtype=F64) * 2
    ref = old + torch.randn(num, length, generator=generator, dtype=F64) * 0.5
    g = settings["num_generations"]
    trl = trl_rloo_advantages(rewards_per_func, weights, old, ref, mask, settings)
    kl = rloo_sequence_kl(old, ref, mask)
    ours = rloo_advantages(
        weighted_rewards(rewards_per_func, weights),
        g,
        normalize_advantages=settings["normalize_advantages"],
        reward_clip_range=settings["reward_clip_range"],
        beta=settings["beta"],
        sequence_kl=kl,
    )
    torch.testing.assert_close(ours.advantages, trl["advantages"], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(ours.rewards, trl["rewards"], equal_nan=True)
    torch.testing.assert_close(ours.std, trl["std_rewards"], rtol=1e-6, atol=1e-12, equal_nan=True)
    assert ours.is_std_zero.tolist() == trl["is_std_zero"].tolist()
    assert ours.unscorable.tolist() == trl["unscorable_mask"].tolist()
    if settings["beta"] and g > 1:  # TRL's logged kl is the token mean of the same per-token log-ratios
        torch.testing.assert_close(kl.sum() / mask.sum(), (trl["per_token_kl"] * mask).sum() / mask.sum())
    if g == 4 and not settings["reward_clip_range"] and not settings["beta"]:
        assert ours.is_std_zero[3]


def trl_rloo_compute_loss(per_token_logps, entropies, mask, old_logps, advantages, epsilon_low, epsilon_high):
    trainer = pytest.importorskip("trl.trainer.rloo_trainer")
    logps = per_token_logps.clone().requires_grad_()
    identity = lambda x: x
    stand_in = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(gather=identity, gather_for_metrics=identity, reduce=lambda x, reduction: x),
        model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, entropies, None),
    )
    batch, length = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": mask,
        "old_logps": old_logps,
        "advantages": advantages,
    }
    loss = trainer.RLOOTrainer._compute_loss(stand_in, None, inputs)
    loss.backward()
    return loss, logps.grad, {name: values[-1] for name, values in stand_in._metrics["train"].items()}


@pytest.mark.parametrize(("epsilon_low", "epsilon_high"), [(0.2, 0.2), (0.2, 0.28), (0.05, 0.1)])
def test_loss_parity_with_trl(epsilon_low, epsilon_high):
    generator = torch.Generator().manual_seed(3)
    batch, length = 8, 6
    mask = (torch.arange(length) < torch.tensor([6, 2, 4, 1, 5, 3, 6, 0])[:, None]).long()
    old_per_token = -torch.rand(batch, length, generator=generator, dtype=F64) * 2
    per_token_logps = old_per_token + torch.randn(batch, length, generator=generator, dtype=F64) * 0.15
    entropies = torch.rand(batch, length, generator=generator, dtype=F64) * 3
    advantages = torch.randn(batch, generator=generator, dtype=F64)
    old_logps = rloo_sequence_logps(old_per_token, mask)

    trl_loss, trl_grad, trl_metrics = trl_rloo_compute_loss(
        per_token_logps, entropies, mask, old_logps, advantages, epsilon_low, epsilon_high
    )
    leaf = per_token_logps.clone().requires_grad_()
    out = rloo_loss(rloo_sequence_logps(leaf, mask), old_logps, advantages, epsilon_low=epsilon_low,
                    epsilon_high=epsilon_high)  # fmt: skip
    out.loss.backward()
    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-12)
    torch.testing.assert_close(leaf.grad, trl_grad, rtol=1e-6, atol=1e-12)
    metrics = rloo_metrics(out, entropies, mask).local()
    assert set(metrics) == set(trl_metrics)
    for name, value in metrics.items():
        assert value == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-12), name
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0  # both clips fire
