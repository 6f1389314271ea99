"""OnlineDPOModule and XPOModule as a user meets them: they learn a rule reward on the tiny model (Online DPO also a
pairwise judge's preference), index list ``beta``/``alpha`` by epoch, XPO samples every second row from the
reference, and bad arguments or a judge that fails or answers anything but 0/1 for a pair (its -1 included) stop
with a named error. (Parity: ``tests/parity/test_trl_online_dpo.py`` against TRL 1.16, ``test_trl113.py``
against TRL 1.13; the loss by hand in ``tests/losses/test_online_dpo_losses.py``.)"""

from __future__ import annotations

import pytest
import torch
from helpers import MAX_FIXED_COMPLETION, StepMetrics, fixed_completions, id_reward, quiet_trainer, sample_rows

from lightning_llm import OnlineDPOModule, PromptDataModule, XPOModule
from lightning_llm.judges import BasePairwiseJudge
from lightning_llm.modules.online_dpo import JudgeError, PairwiseJudgeReward
from lightning_llm.rewards import RewardBatch, make_contains_reward
from lightning_llm.rollout import FixedRollouts


class PrefersATwo(BasePairwiseJudge):
    """Prefers the completion that contains a "2" (the first on a tie); remembers the share of completions with one."""

    def __init__(self) -> None:
        self.shares: list[float] = []

    def judge(self, prompts, completions, shuffle_order=True):
        flat = [c for pair in completions for c in pair]
        self.shares.append(sum("2" in c for c in flat) / len(flat))
        return [0 if "2" in first or "2" not in second else 1 for first, second in completions]


class Answers(BasePairwiseJudge):
    """Answers whatever it is given (or raises it)."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def judge(self, prompts, completions, shuffle_order=True):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer(len(prompts)) if callable(self.answer) else self.answer


def learn(**kwargs) -> StepMetrics:
    torch.manual_seed(0)
    module = OnlineDPOModule("tiny-llama", max_completion_length=16, max_length=128, learning_rate=1e-2, **kwargs)
    metrics = StepMetrics()
    quiet_trainer(max_steps=40, callbacks=[metrics]).fit(module, PromptDataModule("sample:prompt_only", batch_size=8))
    return metrics


def windows(values: list[float]) -> tuple[float, float]:
    return sum(values[:10]) / 10, sum(values[-10:]) / 10


def test_online_dpo_raises_a_rule_reward():
    """The share of sampled completions that contain a "2" goes from about a quarter to most (measured 0.26 -> 0.83)."""
    metrics = learn(reward_funcs=[make_contains_reward("2")])
    first, last = windows(metrics.series("objective/scores"))
    assert first < 0.4 and last > 0.7, (first, last)
    assert metrics.series("beta") == pytest.approx([0.1] * 40)


def test_online_dpo_learns_a_pairwise_judges_preference():
    judge = PrefersATwo()
    metrics = learn(judge=judge)
    assert "objective/scores" not in metrics.steps[0]  # a judge gives no scores, as in TRL
    first, last = windows(judge.shares)
    assert first < 0.4 and last > 0.7, (first, last)


def test_a_list_beta_is_indexed_by_epoch_and_the_last_value_stays():
    module = OnlineDPOModule("tiny-llama", reward_funcs=[id_reward], rollout=FixedRollouts(fixed_completions),
                             max_completion_length=MAX_FIXED_COMPLETION, max_length=64, beta=[0.1, 0.5])
    metrics = StepMetrics()
    quiet_trainer(max_epochs=3, callbacks=[metrics]).fit(
        module, PromptDataModule(sample_rows("prompt_only", 4), batch_size=4))  # two steps per epoch
    assert metrics.series("beta") == pytest.approx([0.1, 0.1, 0.5, 0.5, 0.5, 0.5])


def judged(judge, prompts=("p", "p", "q", "q"), completions=("a", "b", "c", "d")) -> list[float]:
    batch = RewardBatch(prompts=list(prompts), completions=list(completions), completion_ids=[[1]] * len(prompts),
                        columns={}, trainer_state=None, log_metric=None, log_extra=None)
    return PairwiseJudgeReward(judge).score(batch)


def test_the_judges_choice_becomes_one_and_zero_scores():
    assert judged(Answers([1, 0])) == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(("answer", "message"), [
    ([0, -1], r"-1 \(the judge could not decide\) for pair 1"),
    ([0, 2], "2 for pair 1"),
    ([0, True], "True for pair 1"),
    (["0", 1], "'0' for pair 0"),
    ([0], "for 2 pairs"),
    ("01", "for 2 pairs"),
    (RuntimeError("rate limited"), "raised RuntimeError: rate limited"),
])
def test_a_judge_that_fails_or_answers_garbage_is_an_error(answer, message):
    with pytest.raises(JudgeError, match=message):
        judged(Answers(answer))


def test_the_judge_needs_the_two_copies_of_a_prompt_side_by_side():
    with pytest.raises(JudgeError, match="consecutive rows"):
        judged(Answers([0, 0]), prompts=("p", "q", "p", "q"))


def test_a_judges_minus_one_stops_the_first_training_step():
    module = OnlineDPOModule("tiny-llama", judge=Answers(lambda n: [-1] * n), rollout=FixedRollouts(fixed_completions),
                             max_completion_length=MAX_FIXED_COMPLETION, max_length=64)
    with pytest.raises(JudgeError, match="could not decide"):
        quiet_trainer(max_steps=1).fit(module, PromptDataModule(sample_rows("prompt_only", 4), batch_size=4))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reward_funcs": [id_reward], "num_generations": 4}, "num_generations must be 2"),
    ({}, "either reward_funcs"),
    ({"reward_funcs": [id_reward], "judge": PrefersATwo()}, "not both"),
    ({"judge": PrefersATwo(), "missing_eos_penalty": 1.0}, "missing_eos_penalty"),
    ({"judge": PrefersATwo(), "reward_weights": [1.0]}, "reward_weights"),
    ({"reward_funcs": [id_reward], "loss_type": "hinge"}, "loss_type"),
    ({"reward_funcs": [id_reward], "beta": [0.1, -1.0]}, "beta"),
    ({"reward_funcs": [id_reward], "max_length": 64}, "max_length=64 must exceed max_completion_length=64"),
    ({"judge": "pair_rm"}, "BasePairwiseJudge"),
])
def test_construction_errors_name_the_argument(kwargs, message):
    kwargs.setdefault("max_completion_length", 64)
    with pytest.raises(ValueError, match=message):
        OnlineDPOModule("tiny-llama", **kwargs)


def test_an_odd_micro_batch_is_refused_before_training():
    module = OnlineDPOModule("tiny-llama", reward_funcs=[id_reward], rollout=FixedRollouts(fixed_completions),
                             max_completion_length=MAX_FIXED_COMPLETION, max_length=64)
    with pytest.raises(ValueError, match="batch_size"):
        quiet_trainer(max_steps=1).fit(module, PromptDataModule(sample_rows("prompt_only", 6), batch_size=3))


# ------------------------------------------------------------------------------------------------------------ XPO
def test_xpo_raises_a_rule_reward_on_the_policys_samples():
    """The policy's share of completions with a "2" rises while the reference's stays (measured 0.15 -> 0.65)."""
    torch.manual_seed(0)
    module = XPOModule("tiny-llama", reward_funcs=[make_contains_reward("2")], max_completion_length=16,
                       max_length=128, learning_rate=1e-2)
    metrics = StepMetrics()
    quiet_trainer(max_steps=40, callbacks=[metrics]).fit(module, PromptDataModule("sample:prompt_only", batch_size=8))
    first, last = windows(metrics.series("objective/model_scores"))
    assert first < 0.3 and last > 0.5, (first, last)
    reference = windows(metrics.series("objective/ref_scores"))
    assert abs(reference[1] - reference[0]) < 0.2, reference  # the reference does not learn
    assert metrics.series("alpha") == pytest.approx([1e-5] * 40)


def test_xpo_samples_odd_rows_from_the_reference():
    sources = []

    def completions(prompt_ids):
        sources.append(len(prompt_ids))
        return fixed_completions(prompt_ids)

    module = XPOModule("tiny-llama", reward_funcs=[id_reward], rollout=FixedRollouts(completions),
                       max_completion_length=MAX_FIXED_COMPLETION, max_length=64, alpha=[0.5, 0.1])
    seen = []
    original = module.engine.generate

    def spy(model, *args, **kwargs):
        seen.append(model is module.ref_model)
        return original(model, *args, **kwargs)

    module.engine.generate = spy
    metrics = StepMetrics()
    quiet_trainer(max_epochs=2, callbacks=[metrics]).fit(
        module, PromptDataModule(sample_rows("prompt_only", 2), batch_size=4))
    assert seen == [False, True, False, True] and sources == [2, 2, 2, 2]  # 2 prompts: policy, then reference
    assert metrics.series("alpha") == pytest.approx([0.5, 0.1])


def test_xpo_refuses_an_empty_alpha():
    with pytest.raises(ValueError, match="alpha"):
        XPOModule("tiny-llama", reward_funcs=[id_reward], alpha=[])
