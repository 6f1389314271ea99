"""compute_rewards: TRL 1.16's calling convention, None -> NaN, async functions, and every way a reward function
can answer wrongly (each named by function and row)."""

from __future__ import annotations

import asyncio
import functools
import logging
import math

import numpy as np
import pytest
import torch

from lightning_llm.rewards import (
    FunctionReward,
    RewardError,
    RewardLog,
    RewardState,
    columns_from_rows,
    compute_rewards,
    reward_metrics,
    reward_names,
    shape_completions,
)

CHAT_PROMPTS = [[{"role": "user", "content": "2 + 2?"}], [{"role": "user", "content": "Capital of France?"}]]
TEXT_PROMPTS = ["2 + 2 =", "The capital of France is"]
TEXTS = ["4", "Paris"]
IDS = [[7], [8, 9]]


def score(sources, prompts=TEXT_PROMPTS, completions=TEXTS, completion_ids=IDS, **kwargs):
    return compute_rewards(sources, prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)


def constant(*values):
    """A reward function answering ``values``."""
    def constant_reward(completions, **kwargs):
        return list(values)
    return constant_reward


# -- the calling convention -----------------------------------------------------------------------------------------


def test_every_argument_and_column_reaches_the_function():
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return [0.0, 0.0]

    state = RewardState(global_step=3, epoch=1.5, max_steps=10)
    log = RewardLog()
    columns = {"solution": ["4", "Paris"], "difficulty": [1, 2], "prompt": ["dropped", "dropped"],
               "completion": ["x", "y"], "completion_ids": [[0], [0]]}
    score([spy], columns=columns, trainer_state=state, log_metric=log.log_metric, log_extra=log.log_extra)
    assert set(seen) == {"prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra",
                         "solution", "difficulty"}  # TRL leaves the prompt/completion/completion_ids columns out
    assert seen["prompts"] == TEXT_PROMPTS and seen["completions"] == TEXTS and seen["completion_ids"] == IDS
    assert seen["solution"] == ["4", "Paris"] and seen["difficulty"] == [1, 2]
    assert seen["trainer_state"] is state and seen["trainer_state"].global_step == 3
    assert seen["log_metric"] == log.log_metric and seen["log_extra"] == log.log_extra


def test_conversational_completions_are_shaped_like_trl():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen["prompts"], seen["completions"] = prompts, completions
        return [1.0, 1.0]

    score([spy], prompts=CHAT_PROMPTS)
    # TRL: decoded texts become [{"role": "assistant", "content": text}] for conversational prompts
    assert seen["completions"] == [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "Paris"}]]
    assert seen["prompts"] == CHAT_PROMPTS
    already = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "Paris"}]]
    assert shape_completions(CHAT_PROMPTS, already) == already
    assert shape_completions(TEXT_PROMPTS, TEXTS) == TEXTS


def test_a_function_changing_its_arguments_does_not_change_the_next_ones():
    def vandal(completions, solution, **kwargs):
        completions.clear()
        solution[0] = "vandalised"
        return [0.0, 0.0]

    def reader(completions, solution, **kwargs):
        return [float(len(completions)), float(solution[0] == "4")]

    rewards = score([vandal, reader], columns={"solution": ["4", "Paris"]})
    assert rewards[:, 1].tolist() == [2.0, 1.0]


def test_rewards_have_one_column_per_source_and_none_becomes_nan():
    rewards = score([constant(1.0, None), constant(0.5, -2)])
    assert rewards.shape == (2, 2) and rewards.dtype == torch.float32
    assert rewards[0].tolist() == [1.0, 0.5]
    assert math.isnan(rewards[1, 0]) and rewards[1, 1] == -2.0


def test_nan_is_kept_as_trl_keeps_it_and_other_numeric_types_are_accepted():
    rewards = score([constant(float("nan"), True), constant(np.float32(0.25), torch.tensor(3.0)),
                     lambda completions, **kw: torch.tensor([1.0, 2.0]), lambda completions, **kw: (x for x in (5, 6))])
    assert math.isnan(rewards[0, 0]) and rewards[1, 0] == 1.0
    assert rewards[:, 1].tolist() == [0.25, 3.0]
    assert rewards[:, 2].tolist() == [1.0, 2.0] and rewards[:, 3].tolist() == [5.0, 6.0]


def test_no_source_gives_an_empty_column_set_and_device_is_honoured():
    assert score([]).shape == (2, 0)
    assert score([constant(1.0, 2.0)], device="cpu").device.type == "cpu"


def test_a_row_no_source_scores_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_llm.rewards.compute"):
        score([constant(None, 1.0), constant(None, None)])
    assert "1 of 2 completions got no reward" in caplog.text and "rows 0" in caplog.text


# -- async functions ------------------------------------------------------------------------------------------------


def sync_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


async def async_length(completions, **kwargs):
    await asyncio.sleep(0)
    return [float(len(c)) for c in completions]


class AsyncLength:
    async def __call__(self, completions, **kwargs):
        return [float(len(c)) for c in completions]


def test_async_functions_give_what_the_sync_ones_give():
    sources = [sync_length, async_length, AsyncLength(), functools.partial(async_length)]
    assert [FunctionReward(s).is_async for s in sources] == [False, True, True, True]
    rewards = score(sources)
    assert rewards.tolist() == [[1.0] * 4, [5.0] * 4]


def test_async_functions_run_concurrently_on_one_lasting_loop():
    events: dict[str, asyncio.Event] = {}
    loops = []

    def event(name):
        return events.setdefault(name, asyncio.Event())

    # Each waits for the other: run one after the other, the first would time out.
    async def first(completions, **kwargs):
        loops.append(asyncio.get_running_loop())
        event("first").set()
        await asyncio.wait_for(event("second").wait(), timeout=10)
        return [1.0, 1.0]

    async def second(completions, **kwargs):
        event("second").set()
        await asyncio.wait_for(event("first").wait(), timeout=10)
        return [2.0, 2.0]

    assert score([first, second]).tolist() == [[1.0, 2.0], [1.0, 2.0]]
    events.clear()
    score([first, second])
    assert loops[0] is loops[1]  # async clients made by a reward function stay usable from step to step


def test_a_sync_callable_returning_a_coroutine_is_awaited():
    def returns_coroutine(completions, **kwargs):
        return async_length(completions)

    assert score([returns_coroutine]).flatten().tolist() == [1.0, 5.0]


def test_an_async_function_that_raises_is_named_and_the_others_finish():
    finished = []

    async def fails(completions, **kwargs):
        raise KeyError("solution")

    async def slow(completions, **kwargs):
        await asyncio.sleep(0.05)
        finished.append(True)
        return [0.0, 0.0]

    with pytest.raises(RewardError, match=r"reward function 'fails' raised KeyError") as info:
        score([slow, fails])
    assert isinstance(info.value.__cause__, KeyError) and finished == [True]


def test_async_functions_are_checked_like_sync_ones():
    async def strict(prompts, completions, completion_ids, trainer_state, log_metric, log_extra):
        return [0.0, 0.0]

    async def wordy(completions, **kwargs):
        return [0.0, "high"]

    with pytest.raises(ValueError, match=r"reward function 'strict' cannot be called .*'solution'") as info:
        score([strict], columns={"solution": ["4", "Paris"]})
    assert info.value.__cause__ is not info.value
    with pytest.raises(ValueError, match=r"reward function 'wordy' returned 'high' \(str\) for row 1"):
        score([wordy])


# -- wrong answers --------------------------------------------------------------------------------------------------


def test_a_function_that_raises_is_named_with_its_rows_and_the_error_chained():
    def broken(completions, **kwargs):
        return [1 / 0 for _ in completions]

    with pytest.raises(ValueError, match=r"reward function 'broken' raised ZeroDivisionError.*rows 0, 1") as info:
        score([broken])
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(ValueError, match=r"rows 0 \(id 17\), 1 \(id 18\)"):
        score([broken], row_ids=[17, 18])


def test_the_wrong_number_of_rewards_is_refused():
    with pytest.raises(ValueError, match=r"reward function 'constant_reward' returned 1 rewards for 2 completions"):
        score([constant(1.0)])
    with pytest.raises(ValueError, match=r"'constant_reward' returned 3 rewards for 2"):
        score([constant(1.0, 2.0, 3.0)])


@pytest.mark.parametrize("bad", ["1.0", [1.0], {"reward": 1.0}, object()], ids=["str", "list", "dict", "object"])
def test_a_value_that_is_not_a_number_is_refused_naming_the_row(bad):
    with pytest.raises(ValueError, match=r"reward function 'constant_reward' returned .* for row 1 \(prompt "
                                         r"'The capital of France is', completion 'Paris'\); expected a float or None"):
        score([constant(0.0, bad)])


@pytest.mark.parametrize("answer", [1.0, "1.0, 2.0", {"a": 1.0}, np.zeros((2, 1))], ids=["float", "str", "dict", "2d"])
def test_an_answer_that_is_not_a_list_of_rewards_is_refused(answer):
    def odd(completions, **kwargs):
        return answer

    with pytest.raises(ValueError, match=r"reward function 'odd' returned .*expected a list of 2 rewards"):
        score([odd])


def test_infinite_rewards_are_refused_unless_asked_for():
    with pytest.raises(ValueError, match=r"'constant_reward' returned inf for row 1 .* must be finite"):
        score([constant(0.0, float("inf"))])
    assert score([constant(0.0, float("-inf"))], allow_infinite=True)[1, 0] == float("-inf")


def test_a_function_that_cannot_take_the_arguments_is_named_before_it_runs():
    calls = []

    def no_kwargs(prompts, completions, completion_ids, trainer_state, log_metric, log_extra):
        calls.append(1)
        return [0.0, 0.0]

    assert score([no_kwargs]).shape == (2, 1)  # every argument it declares: fine, as in TRL
    with pytest.raises(ValueError, match=r"reward function 'no_kwargs' cannot be called .*'solution'.*\*\*kwargs"):
        score([no_kwargs], columns={"solution": ["4", "Paris"]})
    assert calls == [1]


def test_an_uncalled_factory_is_refused_when_wrapped():
    from lightning_llm.rewards import get_soft_overlong_punishment

    with pytest.raises(ValueError, match=r"'get_soft_overlong_punishment' cannot be a reward function.*call it"):
        FunctionReward(get_soft_overlong_punishment)


# -- inputs ---------------------------------------------------------------------------------------------------------


def test_inputs_of_different_lengths_and_bad_columns_are_refused():
    with pytest.raises(ValueError, match=r"1 completions for 2 prompts"):
        score([constant(0.0, 0.0)], completions=["4"])
    with pytest.raises(ValueError, match=r"3 completion_ids for 2 prompts"):
        score([constant(0.0, 0.0)], completion_ids=[[1], [2], [3]])
    with pytest.raises(ValueError, match=r"column 'solution' holds 1 values; expected a list of 2"):
        score([constant(0.0, 0.0)], columns={"solution": ["4"]})
    with pytest.raises(ValueError, match=r"column 'trainer_state' has the name of an argument"):
        score([constant(0.0, 0.0)], columns={"trainer_state": [1, 2]})
    with pytest.raises(ValueError, match=r"prompts\[1\] is a string but prompts\[0\] is a conversation"):
        score([constant(0.0, 0.0)], prompts=[CHAT_PROMPTS[0], "text"])
    with pytest.raises(ValueError, match=r"completions\[0\] must be a string for a string prompt"):
        score([constant(0.0, 0.0)], completions=[[{"role": "assistant", "content": "4"}], "Paris"])
    with pytest.raises(ValueError, match=r"resolve it once with resolve_reward_source"):
        score(["tiny-llama"])


def test_columns_from_rows_follows_trl():
    rows = [{"prompt": "a", "solution": "1", "id": 0}, {"prompt": "b", "solution": "2", "id": 1}]
    assert columns_from_rows(rows) == {"solution": ["1", "2"], "id": [0, 1]}
    with pytest.raises(ValueError, match=r"row 1 has no column 'id'"):
        columns_from_rows([rows[0], {"prompt": "b", "solution": "2"}])


# -- hooks, state and metrics ---------------------------------------------------------------------------------------


def test_reward_log_collects_what_functions_log():
    def chatty(completions, log_metric, log_extra, **kwargs):
        log_metric("chatty/calls", 1)
        log_metric("chatty/calls", torch.tensor(3.0))
        log_extra("verdict", ["ok", "ko"])
        return [0.0, 0.0]

    log = RewardLog()
    score([chatty], log_metric=log.log_metric, log_extra=log.log_extra)
    assert log.take_metrics() == {"chatty/calls": 2.0} and log.take_extra() == {"verdict": ["ok", "ko"]}
    assert log.take_metrics() == {} and log.take_extra() == {}
    with pytest.raises(ValueError, match=r"log_metric\('x', ...\): expected a number"):
        log.log_metric("x", "high")
    with pytest.raises(ValueError, match=r"log_extra\('col', ...\): expected a list"):
        log.log_extra("col", "ok")
    score([chatty])  # without hooks the functions may still call them


def test_reward_state_from_a_trainer():
    from helpers import quiet_trainer

    trainer = quiet_trainer(max_steps=7)
    state = RewardState.from_trainer(trainer)
    assert (state.global_step, state.epoch, state.max_steps, state.is_world_process_zero) == (0, 0.0, 7, True)
    assert RewardState().global_step == 0 and RewardState().max_steps is None


def test_reward_metrics_match_trl_nanmean_and_nanstd():
    from trl.trainer.utils import nanstd

    def named(name):
        return FunctionReward(constant(0.0), name=name)

    sources = [named("a"), named("b"), named("a")]
    rewards = torch.tensor([[1.0, float("nan"), 0.0], [2.0, 5.0, float("nan")], [4.0, float("nan"), float("nan")]])
    metrics = reward_metrics(sources, rewards)
    assert reward_names(sources) == ["a", "b", "a_2"]
    for column, name in enumerate(["a", "b", "a_2"]):
        assert metrics[f"rewards/{name}/mean"] == pytest.approx(torch.nanmean(rewards[:, column]).item())
        trl_std = nanstd(rewards[:, column]).item()
        ours = metrics[f"rewards/{name}/std"]
        assert (math.isnan(ours) and math.isnan(trl_std)) or ours == pytest.approx(trl_std)
    assert math.isnan(metrics["rewards/b/std"])  # one value: no spread, as TRL
