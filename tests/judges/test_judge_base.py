"""Judge contracts, order flipping, prompt validation, and AllTrueJudge against hand-made truth tables."""

from __future__ import annotations

import random

import pytest

from lightning_llm.judges import (
    DEFAULT_PAIRWISE_SYSTEM_PROMPT,
    AllTrueJudge,
    BaseBinaryJudge,
    BaseJudge,
    BasePairwiseJudge,
    BaseRankJudge,
)
from lightning_llm.judges.base import (
    apply_flips,
    check_pairwise_prompt,
    choices_from_scores,
    draw_flips,
    render_pairwise_prompt,
    restore_choices,
    restore_scores,
    validate_pairwise_inputs,
)


def test_bases_are_abstract() -> None:
    for base in (BaseJudge, BasePairwiseJudge, BaseBinaryJudge, BaseRankJudge):
        with pytest.raises(TypeError):
            base()


def test_flip_helpers_by_hand() -> None:
    pairs = [["a", "b"], ["c", "d"], ["e", "f"]]
    flips = [True, False, True]
    assert apply_flips(pairs, flips) == [("b", "a"), ("c", "d"), ("f", "e")]
    assert restore_choices([0, 0, -1], flips) == [1, 0, -1]  # a failure is never flipped into a choice
    assert restore_scores([0.8, 0.3, -1.0], flips) == pytest.approx([0.2, 0.3, -1.0])
    assert restore_scores([float("nan")], [False]) == [-1.0]
    assert choices_from_scores([0.9, 0.5, 0.1, -1.0]) == [0, 0, 1, -1]


def test_draw_flips_is_seeded_and_fair() -> None:
    assert draw_flips(50, random.Random(3)) == draw_flips(50, random.Random(3))
    flips = draw_flips(2000, random.Random(0))
    assert 900 < sum(flips) < 1100


class _LongerIsBetter(BasePairwiseJudge):
    """A judge without position bias: prefers the longer completion, whatever order it is shown in."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.shown: list[tuple[str, str]] = []

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        validate_pairwise_inputs(prompts, completions)
        flips = draw_flips(len(prompts), self.rng) if shuffle_order else [False] * len(prompts)
        shown = apply_flips(completions, flips)
        self.shown.extend(shown)
        return restore_choices([0 if len(a) > len(b) else 1 for a, b in shown], flips)


def test_flipping_does_not_change_a_consistent_judge() -> None:
    prompts = [f"p{i}" for i in range(12)]
    completions = [["x" * (i % 4 + 1), "y" * (3 - i % 4 + 1) + "z" * (i % 2)] for i in range(12)]
    expected = [0 if len(a) > len(b) else 1 for a, b in completions]
    judge = _LongerIsBetter(seed=7)
    assert judge.judge(prompts, completions, shuffle_order=True) == expected
    reversed_shown = sum(tuple(shown) != tuple(pair) for shown, pair in zip(judge.shown, completions))
    assert 0 < reversed_shown < 12  # the order really was shuffled, for some pairs only
    assert judge.judge(prompts, completions, shuffle_order=False) == expected


def test_rank_judge_subclass_contract() -> None:
    class ShortestFirst(BaseRankJudge):
        def judge(self, prompts, completions, shuffle_order=True):
            return [sorted(range(len(c)), key=lambda i: len(c[i])) for c in completions]

    assert ShortestFirst().judge(["q"], [["ccc", "a", "bb"]]) == [[1, 2, 0]]


def test_default_prompt_renders_all_fields() -> None:
    text = render_pairwise_prompt(DEFAULT_PAIRWISE_SYSTEM_PROMPT, "PROMPT", ("FIRST", "SECOND"))
    assert text.index("PROMPT") < text.index("FIRST") < text.index("SECOND")
    assert "{" not in text and "}" not in text


@pytest.mark.parametrize(
    "template,match",
    [
        ("{prompt} {response0}", "exactly the placeholders"),
        ("{prompt} {response0} {response1} {extra}", "exactly the placeholders"),
        ("{prompt} {response0} {response1} {", "valid format string"),
        (3, "must be a string"),
    ],
)
def test_check_pairwise_prompt_rejects_bad_templates(template, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_pairwise_prompt(template)


@pytest.mark.parametrize(
    "prompts,completions,match",
    [
        (["a", "b"], [["x", "y"]], "same length"),
        (["a"], [["x", "y", "z"]], "pair"),
        (["a"], ["xy"], "pair"),
        ([1], [["x", "y"]], r"prompts\[0\]"),
        (["a"], [["x", 2]], "two strings"),
        ("a", [["x", "y"]], "list of strings"),
    ],
)
def test_validate_pairwise_inputs(prompts, completions, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_pairwise_inputs(prompts, completions)


# ---- AllTrueJudge ------------------------------------------------------------------------------------------------


class _Contains(BaseBinaryJudge):
    """1 if the completion contains ``word``, 0 if not, -1 if it contains ``fail``."""

    def __init__(self, word: str, fail: str = "\0") -> None:
        self.word, self.fail = word, fail
        self.calls: list[tuple] = []

    def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        self.calls.append((list(prompts), list(completions), gold_completions, shuffle_order))
        return [-1 if self.fail in c else int(self.word in c) for c in completions]


def test_all_true_truth_table() -> None:
    first, second = _Contains("sun", fail="ERR"), _Contains("moon")
    judge = AllTrueJudge([first, second])
    completions = ["sun and moon", "sun only", "moon only", "neither", "sun moon ERR", "ERR"]
    prompts = ["p"] * len(completions)
    assert judge.judge(prompts, completions) == [1, 0, 0, 0, -1, -1]
    gold = ["g"] * len(completions)
    judge.judge(prompts, completions, gold_completions=gold, shuffle_order=False)
    assert first.calls[-1] == (prompts, completions, gold, False)  # arguments are passed through


def test_all_true_single_judge_and_errors() -> None:
    assert AllTrueJudge([_Contains("a")]).judge(["p", "p"], ["a", "b"]) == [1, 0]
    # no judges: every completion passes, and the arguments are still checked
    assert AllTrueJudge().judge(["p", "q", "r"], ["a", "b", "c"]) == [1, 1, 1]
    assert AllTrueJudge([]).judge([], []) == []
    with pytest.raises(ValueError, match="same length"):
        AllTrueJudge().judge(["p"], ["a", "b"])
    with pytest.raises(ValueError, match=r"judges\[0\]"):
        AllTrueJudge([object()])

    class Broken(BaseBinaryJudge):
        def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
            return [2 for _ in completions]

    with pytest.raises(ValueError, match="0, 1 or -1"):
        AllTrueJudge([Broken()]).judge(["p"], ["c"])

    class Short(BaseBinaryJudge):
        def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
            return [1]

    with pytest.raises(ValueError, match="returned 1 judgements for 2"):
        AllTrueJudge([Short()]).judge(["p", "q"], ["c", "d"])
    with pytest.raises(ValueError, match="same length"):
        AllTrueJudge([_Contains("a")]).judge(["p"], ["c", "d"])
