"""NashMDModule as a user meets it: it raises a rule reward on the tiny model, samples every second row from the
geometric mixture at the epoch's ``mixture_coef``, takes a pairwise judge's probability as the preference, and bad
arguments or a judge that fails or answers anything but a probability (its -1 included) stop with a named error.
(Parity: ``tests/parity/test_trl113.py`` against TRL 1.13; the loss by hand in
``tests/losses/test_nash_md_losses.py``; the mixture's sampling in ``tests/rollout/test_rollout_mixture.py``.)"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import MAX_FIXED_COMPLETION, StepMetrics, fixed_completions, id_reward, quiet_trainer, sample_rows

from lightning_llm import NashMDModule, PromptDataModule
from lightning_llm.judges import BasePairwiseJudge
from lightning_llm.modules.nash_md import PairwiseJudgeProbability
from lightning_llm.modules.online_dpo import JudgeError
from lightning_llm.rewards import RewardBatch, make_contains_reward
from lightning_llm.rollout import FixedRollouts
from lightning_llm.rollout.mixture import GeometricMixture


class Probabilities(BasePairwiseJudge):
    """Answers whatever it is given (a list, a function of the number of pairs, or an exception to raise)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list[bool] = []

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        self.calls.append(return_scores)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer(len(prompts)) if callable(self.answer) else self.answer


class Recording(FixedRollouts):
    """Replays :func:`fixed_completions` and remembers what it was asked to sample from."""

    def __init__(self) -> None:
        super().__init__(fixed_completions)
        self.models: list = []

    def generate(self, model, prompt_ids, settings, **kwargs):
        self.models.append(model)
        return super().generate(model, prompt_ids, settings, **kwargs)


def fixed_module(**kwargs) -> NashMDModule:
    kwargs.setdefault("reward_funcs", [id_reward])
    kwargs.setdefault("rollout", FixedRollouts(fixed_completions))
    return NashMDModule("tiny-llama", max_completion_length=MAX_FIXED_COMPLETION, max_length=64, **kwargs)


def windows(values: list[float], size: int = 10) -> tuple[float, float]:
    return sum(values[:size]) / size, sum(values[-size:]) / size


# ---------------------------------------------------------------------------------------------------------- learning
def test_nash_md_raises_a_rule_reward():
    """The share of the policy's completions that contain a "2" goes from a quarter to all of them within 40 steps
    (measured 0.25 -> 1.0 over the first and last 10; the mixture's, 0.2 -> 0.5, follows half way). The rule is
    weighted 5 so that P = σ(s(y) - s(y')) is far from 1/2 when the two completions differ, and β is small."""
    torch.manual_seed(0)
    module = NashMDModule("tiny-llama", reward_funcs=[make_contains_reward("2")], reward_weights=[5.0], beta=0.02,
                          max_completion_length=16, max_length=128, learning_rate=1e-2, rollout="fast")
    metrics = StepMetrics()
    quiet_trainer(max_steps=40, callbacks=[metrics]).fit(module, PromptDataModule("sample:prompt_only", batch_size=8))
    first, last = (value / 5 for value in windows(metrics.series("rewards/chosen")))
    assert first < 0.4 and last > 0.7, (first, last)
    assert windows(metrics.series("rewards/probabilities"))[1] > 0.6
    assert metrics.series("mixture_coef") == pytest.approx([0.5] * 40)
    assert metrics.series("beta") == pytest.approx([0.02] * 40)


# ------------------------------------------------------------------------------------------------- rows and epochs
def test_odd_rows_come_from_the_mixture_at_the_epochs_coefficient():
    engine = Recording()
    module = fixed_module(rollout=engine, mixture_coef=[0.5, 0.2], beta=[0.1, 0.0])
    metrics = StepMetrics()
    quiet_trainer(max_epochs=2, callbacks=[metrics]).fit(
        module, PromptDataModule(sample_rows("prompt_only", 4), batch_size=4))  # two steps per epoch
    assert len(engine.models) == 8  # per step: the policy's rows, then the mixture's
    policies, mixtures = engine.models[0::2], engine.models[1::2]
    assert all(model is module.model for model in policies)
    assert all(isinstance(m, GeometricMixture) and m.policy is module.model and m.reference is module.ref_model
               for m in mixtures)
    assert [m.mixture_coef for m in mixtures] == [0.5, 0.5, 0.2, 0.2]
    assert metrics.series("mixture_coef") == pytest.approx([0.5, 0.5, 0.2, 0.2])
    assert metrics.series("beta") == pytest.approx([0.1, 0.1, 0.0, 0.0])


def test_under_peft_the_mixtures_reference_is_the_policy_with_its_adapters_off():
    engine = Recording()
    module = fixed_module(rollout=engine, peft_config={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    quiet_trainer(max_steps=1).fit(module, PromptDataModule(sample_rows("prompt_only", 4), batch_size=4))
    mixture = engine.models[1]
    assert module.ref_model is None and mixture.reference is module.model
    lora = next(m for m in module.model.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A"))
    assert not lora.disable_adapters
    with mixture.as_reference():
        assert lora.disable_adapters
    assert not lora.disable_adapters


def test_the_metrics_are_trl_1_13s():
    metrics = StepMetrics()
    quiet_trainer(max_steps=1, callbacks=[metrics]).fit(
        fixed_module(missing_eos_penalty=1.0), PromptDataModule(sample_rows("prompt_only", 4), batch_size=4))
    trl = {"loss", "loss/kl", "objective/entropy", "loss/score", "rewards/probabilities", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected", "val/model_contain_eos_token",
           "val/ref_contain_eos_token", "rewards/chosen", "rewards/rejected", "beta", "mixture_coef"}
    step = metrics.steps[0]
    assert trl <= set(step)
    # the first step's policy is the reference: no KL, log π(y) = log π_ref(y)
    assert step["loss/kl"] == pytest.approx(0.0, abs=1e-5)
    assert step["logps/chosen"] == pytest.approx(step["logps/rejected"], abs=1e-4)
    assert step["objective/entropy"] == pytest.approx(-step["logps/chosen"])
    assert 0 < step["rewards/probabilities"] < 1


# ---------------------------------------------------------------------------------------------------------- judges
def judged(judge, prompts=("p", "p", "q", "q"), completions=("a", "b", "c", "d")) -> list[float]:
    batch = RewardBatch(prompts=list(prompts), completions=list(completions), completion_ids=[[1]] * len(prompts),
                        columns={}, trainer_state=None, log_metric=None, log_extra=None)
    return PairwiseJudgeProbability(judge).score(batch)


def test_the_judges_probability_goes_to_the_first_row_of_each_pair():
    judge = Probabilities([0.75, 0.0])
    assert judged(judge) == [0.75, 0.25, 0.0, 1.0]
    assert judge.calls == [True]  # asked for probabilities, not indices


@pytest.mark.parametrize(("answer", "message"), [
    ([0.5, -1], r"-1 \(the judge could not decide\) for pair 1"),
    ([0.5, -1.0], r"-1.0 \(the judge could not decide\) for pair 1"),
    ([float("nan"), 0.5], "nan for pair 0"),
    ([0.5, 1.5], "1.5 for pair 1"),
    ([True, 0.5], "True for pair 0"),
    (["0.5", 0.5], "'0.5' for pair 0"),
    ([0.5], "for 2 pairs"),
    ("01", "for 2 pairs"),
    (RuntimeError("rate limited"), "raised RuntimeError: rate limited"),
])
def test_a_judge_that_fails_or_answers_garbage_is_an_error(answer, message):
    with pytest.raises(JudgeError, match=message):
        judged(Probabilities(answer))


def test_the_judges_probability_is_the_preference_in_training():
    judge = Probabilities(lambda n: [0.9] * n)
    metrics = StepMetrics()
    quiet_trainer(max_steps=2, callbacks=[metrics]).fit(
        fixed_module(reward_funcs=None, judge=judge), PromptDataModule(sample_rows("prompt_only", 4), batch_size=4))
    assert metrics.series("rewards/probabilities") == pytest.approx([0.9, 0.9])
    assert "rewards/chosen" not in metrics.steps[0]  # a judge gives no scores, as in TRL 1.0
    # the first step is at the reference, so the loss is -(0.9 - 1/2) · mean log π(y)
    assert metrics.steps[0]["loss/score"] == pytest.approx(0.4 * metrics.steps[0]["logps/chosen"], rel=1e-5)


def test_a_judges_minus_one_stops_the_first_training_step():
    module = fixed_module(reward_funcs=None, judge=Probabilities(lambda n: [-1.0] * n))
    with pytest.raises(JudgeError, match="could not decide"):
        quiet_trainer(max_steps=1).fit(module, PromptDataModule(sample_rows("prompt_only", 4), batch_size=4))


# ------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss_type": "ipo"}, "loss_type"),
    ({"mixture_coef": 1.5}, "mixture_coef"),
    ({"mixture_coef": []}, "mixture_coef"),
    ({"mixture_coef": math.nan}, "mixture_coef"),
    ({"beta": -0.1}, "beta"),
    ({"beta": [0.1, -1.0]}, "beta"),
    ({"missing_eos_penalty": -1.0}, "missing_eos_penalty"),
    ({"reward_funcs": None}, "either reward_funcs"),
    ({"judge": Probabilities([0.5]), "reward_funcs": None, "missing_eos_penalty": 1.0}, "missing_eos_penalty"),
    ({"judge": "pair_rm", "reward_funcs": None}, "BasePairwiseJudge"),
    ({"max_length": 12}, "max_length=12 must exceed"),
])
def test_construction_errors_name_the_argument(kwargs, message):
    kwargs = {"reward_funcs": [id_reward], "max_completion_length": MAX_FIXED_COMPLETION, **kwargs}
    with pytest.raises(ValueError, match=message):
        NashMDModule("tiny-llama", **kwargs)


def test_an_odd_micro_batch_is_refused_before_training():
    with pytest.raises(ValueError, match="batch_size"):
        quiet_trainer(max_steps=1).fit(fixed_module(), PromptDataModule(sample_rows("prompt_only", 6), batch_size=3))
