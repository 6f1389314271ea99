"""The built-in rewards against hand-written expectations, and those TRL ships against TRL's own functions."""

from __future__ import annotations

import random

import pytest
from trl.rewards import get_repetition_penalty_reward as trl_repetition_penalty
from trl.rewards import get_soft_overlong_punishment as trl_soft_overlong_punishment
from trl.rewards import think_format_reward as trl_think_format_reward

from lightning_llm.rewards import (
    accuracy_reward,
    compute_rewards,
    format_reward,
    get_repetition_penalty_reward,
    get_soft_overlong_punishment,
    make_contains_reward,
    resolve_reward_source,
    think_format_reward,
)

# -- accuracy -------------------------------------------------------------------------------------------------------

ACCURACY_CASES = [
    # (completion, solution, reward): why
    ("The answer is 42.", "42", 1.0),  # a marker, then the number
    ("6 * 7 = 42", "42", 1.0),  # no marker: the last number
    ("42 is wrong; it is 41", "42", 0.0),  # the last number is 41
    ("Answer: 1,000 dollars, not 999", "1000", 1.0),  # after a marker the first number; thousands separators
    (r"I get \boxed{\frac{1}{2}}", "0.5", 1.0),  # a box; numbers are equal as exact fractions
    (r"\boxed{1} at first, then \boxed{2}", "2", 1.0),  # the last box
    (r"\boxed{3/4}", r"\frac{3}{4}", 1.0),
    ("x = 3.0", "3", 1.0),
    ("It is -3", "3", 0.0),
    ("Total: $1,234.50", "1234.5", 1.0),
    ("so #### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),  # GSM8K's answer column as the solution
    ("**Answer:** **72**", "72", 1.0),
    ("no number here", "42", 0.0),
    ("Answer: Paris.", "Paris", 1.0),  # strings: normalised
    ("paris", "  PARIS ", 1.0),
    ("The capital is Paris", "Paris", 0.0),  # no marker: the whole text is the answer
    (r"\boxed{x + 1}", "x+1", 0.0),  # string answers compare exactly after normalisation
]


@pytest.mark.parametrize(("completion", "solution", "reward"), ACCURACY_CASES, ids=[c[0] for c in ACCURACY_CASES])
def test_accuracy_reward_by_hand(completion, solution, reward):
    assert accuracy_reward([completion], [solution]) == [reward]
    conversational = [[{"role": "assistant", "content": completion}]]
    assert accuracy_reward(conversational, [solution]) == [reward]


def test_accuracy_reward_skips_missing_solutions_and_takes_numbers():
    assert accuracy_reward(["42", "42", "42", "7"], [None, "", "  ", 42]) == [None, None, None, 0.0]
    assert accuracy_reward(["0.25"], [0.25]) == [1.0]
    with pytest.raises(ValueError, match=r"accuracy_reward: solution\[1\] must be a string or a number, got \['4'\]"):
        accuracy_reward(["4", "4"], ["4", ["4"]])


def test_accuracy_reward_logs_what_it_parsed():
    logged = {}
    accuracy_reward(["6 * 7 = 42", "nothing", "x"], ["42", "42", None],
                    log_extra=lambda column, values: logged.setdefault(column, values))
    assert logged == {"solution": ["42", "42", "None"], "gold_parsed": ["42", "42", "[missing]"],
                      "answer_parsed": ["42", "[no answer]", "[skipped]"]}


def test_accuracy_reward_through_compute_rewards_reads_the_solution_column():
    rewards = compute_rewards([resolve_reward_source("lightning_llm.rewards.accuracy_reward")],
                              prompts=[[{"role": "user", "content": "6 * 7?"}]] * 3, completions=["42", "41", "42"],
                              completion_ids=[[1], [2], [3]], columns={"solution": ["42", "42", None]})
    assert rewards[:2, 0].tolist() == [1.0, 0.0] and rewards[2, 0].isnan()


# -- format ---------------------------------------------------------------------------------------------------------

FORMAT_TEXTS = [
    "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",
    "<think>\nThis is my reasoning.\nThis is my answer.",
    "<think></think>",
    "<think>a</think>b</think>",
    "<think>a<think>b</think>",
    " <think>a</think>b",
    "Answer first <think>a</think>",
    "<think>\n</think>\n\n",
    "</think><think>",
    "",
]


def test_think_format_reward_equals_trl_on_hand_picked_and_random_texts():
    pieces = ["<think>", "</think>", "a", "\n", " ", "<", ">", "think"]
    generator = random.Random(0)
    fuzz = ["".join(generator.choice(pieces) for _ in range(generator.randint(0, 6))) for _ in range(2000)]
    texts = FORMAT_TEXTS + fuzz
    trl = trl_think_format_reward([[{"role": "assistant", "content": text}] for text in texts])
    assert think_format_reward(texts) == trl
    assert think_format_reward([[{"role": "assistant", "content": text}] for text in texts]) == trl
    assert 0 < sum(trl) < len(trl)  # both verdicts occur
    assert think_format_reward(FORMAT_TEXTS[:4]) == [1.0, 0.0, 1.0, 1.0]


def test_format_reward_also_wants_one_closing_tag_and_an_answer():
    assert format_reward(FORMAT_TEXTS) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert format_reward(["<think>2 + 2</think> 4", [{"role": "assistant", "content": "<think>x</think>y"}]]) == [1.0,
                                                                                                               1.0]


# -- penalties ------------------------------------------------------------------------------------------------------


def test_soft_overlong_punishment_by_hand():
    punish = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    assert punish([[0] * n for n in (0, 80, 81, 90, 100, 101, 500)]) == [0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match=r"soft_punish_cache must be between 0 and max_completion_len \(10\)"):
        get_soft_overlong_punishment(10, 11)


@pytest.mark.parametrize(("max_len", "cache"), [(100, 20), (10, 0), (10, 10), (7, 3), (1, 1)])
def test_soft_overlong_punishment_equals_trl(max_len, cache):
    ids = [[1] * length for length in range(3 * max_len + 2)]
    ours, theirs = get_soft_overlong_punishment(max_len, cache), trl_soft_overlong_punishment(max_len, cache)
    assert ours(completion_ids=ids) == theirs(completion_ids=ids)
    assert ours.__name__ == theirs.__name__ == "soft_overlong_punishment_reward"


@pytest.mark.parametrize(("ngram_size", "max_penalty"), [(1, -1.0), (2, -1.0), (3, -0.5), (4, 0.0)])
def test_repetition_penalty_equals_trl(ngram_size, max_penalty):
    generator = random.Random(ngram_size)
    ids = [[generator.randint(0, 3) for _ in range(generator.randint(0, 12))] for _ in range(300)]
    ours = get_repetition_penalty_reward(ngram_size, max_penalty)
    theirs = trl_repetition_penalty(ngram_size, max_penalty)
    assert ours(completion_ids=ids) == pytest.approx(theirs(completion_ids=ids))
    assert ours.__name__ == theirs.__name__ == "repetition_penalty_reward"
    assert get_repetition_penalty_reward(2)([[1, 2, 3, 4], [5, 5, 5, 5, 5], [9]]) == [0.0, -0.75, 0.0]


def test_penalties_are_picklable_and_take_the_full_calling_convention():
    import pickle

    for reward in (get_soft_overlong_punishment(4, 2), get_repetition_penalty_reward(2), make_contains_reward("a")):
        clone = pickle.loads(pickle.dumps(reward))
        assert clone.__name__ == reward.__name__
    sources = [resolve_reward_source(r) for r in (get_soft_overlong_punishment(4, 2), get_repetition_penalty_reward(1))]
    rewards = compute_rewards(sources, prompts=["p", "p"], completions=["x", "y"], completion_ids=[[1, 1, 1], [1, 2]],
                              columns={"solution": ["1", "2"]})
    assert rewards.tolist() == [[-0.5, pytest.approx(-2 / 3)], [0.0, 0.0]]


# -- contains -------------------------------------------------------------------------------------------------------


def test_contains_reward():
    reward = make_contains_reward("Paris")
    assert reward.__name__ == "contains_Paris"
    assert reward(["It is Paris.", "It is paris.", [{"role": "assistant", "content": "Paris"}]]) == [1.0, 0.0, 1.0]
    assert make_contains_reward("Paris", case_sensitive=False)(["It is paris."]) == [1.0]
    assert make_contains_reward("a b!").__name__ == "contains_a_b"
    assert make_contains_reward("!!!").__name__ == "contains_reward"
    assert resolve_reward_source(make_contains_reward("x", name="has_x")).name == "has_x"
    with pytest.raises(ValueError, match=r"target must be a non-empty string"):
        make_contains_reward("")
