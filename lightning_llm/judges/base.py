"""The judge contracts (TRL's signatures) and the order-flipping that cancels a pairwise judge's position bias.

A judge maps prompts and completions to decisions:

- pairwise: ``judge(prompts, completions, shuffle_order=True, return_scores=False)`` with ``completions[i]`` a pair;
  the index (0 or 1) of the better completion per prompt, or with ``return_scores`` the probability that the first
  one is better;
- binary: ``judge(prompts, completions, gold_completions=None, shuffle_order=True)``; 1 when the completion meets the
  judge's constraint, 0 when it does not;
- rank: ``judge(prompts, completions, shuffle_order=True)``; per prompt, the indices of its completions from best to
  worst.

Every judge answers -1 (a score of -1.0) where it could not decide: an unparseable model answer, a failed request.
Callers must treat -1 as "no judgement".
"""

from __future__ import annotations

import abc
import math
import random
import string
from collections.abc import Sequence

FAILED = -1

# The default pairwise judge prompt. `{prompt}`, `{response0}` and `{response1}` are filled in with str.format (so
# literal braces are doubled); the judge must answer with the single character "0" or "1". A custom prompt must keep
# the three placeholders and the single-character answer.
DEFAULT_PAIRWISE_SYSTEM_PROMPT = """You are comparing two answers written by AI assistants to the same request.

### Request
{prompt}

### Answer 0
{response0}

### Answer 1
{response1}

### Your verdict
Decide which answer serves the person who made the request better: consider correctness, helpfulness, relevance \
and clarity, and ignore the order in which the answers are shown and their length. Reply with one character only: \
0 if Answer 0 is better, 1 if Answer 1 is better. Do not write anything else.
"""


class BaseJudge(abc.ABC):
    """A judge of completions; subclasses implement :meth:`judge`."""

    @abc.abstractmethod
    def judge(self, prompts: list[str], completions: list, shuffle_order: bool = True) -> list:
        """Judge ``completions`` (one entry per prompt) and return one decision per prompt."""


class BaseRankJudge(abc.ABC):
    """A judge that orders several completions of each prompt from best to worst.

    Example:
        >>> class LengthRankJudge(BaseRankJudge):
        ...     def judge(self, prompts, completions, shuffle_order=True):
        ...         return [sorted(range(len(c)), key=lambda i: -len(c[i])) for c in completions]
        >>> LengthRankJudge().judge(["Say hi"], [["hi", "hello there", "hey"]])
        [[1, 2, 0]]
    """

    @abc.abstractmethod
    def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[list[int]]:
        """Rank the completions of each prompt.

        Args:
            prompts: the prompts.
            completions: ``completions[i]`` are the candidate completions of ``prompts[i]``.
            shuffle_order: present the candidates in a random order, to cancel position bias.

        Returns:
            Per prompt, the indices of its completions from best to worst: ``[1, 2, 0]`` means the second is best.
        """


class BasePairwiseJudge(BaseJudge):
    """A judge that picks the better of two completions per prompt."""

    @abc.abstractmethod
    def judge(
        self,
        prompts: list[str],
        completions: list[list[str]],
        shuffle_order: bool = True,
        return_scores: bool = False,
    ) -> list[int] | list[float]:
        """Pick the better completion of each pair.

        Args:
            prompts: the prompts.
            completions: ``completions[i]`` is the pair of completions of ``prompts[i]``.
            shuffle_order: show each pair in a random order (and map the answer back) to cancel position bias.
            return_scores: return the probability that the first completion is better instead of an index.

        Returns:
            Per prompt, 0 or 1 (the index of the better completion), or a probability; -1 where the judge failed.
        """


class BaseBinaryJudge(BaseJudge):
    """A judge that says whether each completion meets a constraint (CGPO's judges, arXiv 2409.20370, §4.1.4)."""

    @abc.abstractmethod
    def judge(
        self,
        prompts: list[str],
        completions: list[str],
        gold_completions: list[str] | None = None,
        shuffle_order: bool = True,
    ) -> list[int]:
        """Check each completion.

        Args:
            prompts: the prompts.
            completions: one completion per prompt.
            gold_completions: reference completions, for judges that compare against one.
            shuffle_order: accepted for signature compatibility with the other judges.

        Returns:
            Per prompt, 1 (meets the constraint), 0 (does not) or -1 (the judge failed).
        """


def validate_pairwise_inputs(prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> None:
    """Raise a ``ValueError`` unless there is exactly one pair of string completions per string prompt."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) != len(completions):
        raise ValueError(
            f"prompts and completions must have the same length, got {len(prompts)} and {len(completions)}"
        )
    for index, (prompt, pair) in enumerate(zip(prompts, completions)):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{index}] must be a string, got {type(prompt).__name__}")
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"completions[{index}] must be a pair of completions, got {pair!r}")
        if not all(isinstance(completion, str) for completion in pair):
            raise ValueError(f"completions[{index}] must hold two strings, got {pair!r}")


def draw_flips(count: int, rng: random.Random) -> list[bool]:
    """Fair coin flips: which pairs are shown to the judge in reversed order."""
    return [rng.random() < 0.5 for _ in range(count)]


def apply_flips(completions: Sequence[Sequence[str]], flips: Sequence[bool]) -> list[tuple[str, str]]:
    """The pairs as shown to the judge: reversed where ``flips`` says so."""
    return [(pair[1], pair[0]) if flip else (pair[0], pair[1]) for pair, flip in zip(completions, flips)]


def restore_choices(choices: Sequence[int], flips: Sequence[bool]) -> list[int]:
    """Map the indices chosen on the shown pairs back to the original order; failures (-1) stay -1."""
    return [FAILED if choice == FAILED else (1 - choice if flip else choice) for choice, flip in zip(choices, flips)]


def restore_scores(scores: Sequence[float], flips: Sequence[bool]) -> list[float]:
    """Map probabilities that the *shown* first completion is better back to the original first; -1.0 stays."""
    return [
        float(FAILED) if score == FAILED or math.isnan(score) else (1.0 - score if flip else score)
        for score, flip in zip(scores, flips)
    ]


def choices_from_scores(scores: Sequence[float]) -> list[int]:
    """0 where the first completion is at least as likely better (probability >= 0.5), else 1; -1 stays -1."""
    return [FAILED if score == FAILED or math.isnan(score) else (0 if score >= 0.5 else 1) for score in scores]


_PAIRWISE_FIELDS = frozenset({"prompt", "response0", "response1"})


def check_pairwise_prompt(template: str) -> str:
    """Return ``template`` if it is a valid pairwise judge prompt: exactly the fields ``{prompt}``, ``{response0}``
    and ``{response1}`` (other literal braces doubled), else raise a ``ValueError`` naming ``system_prompt``."""
    if not isinstance(template, str):
        raise ValueError(f"system_prompt must be a string, got {type(template).__name__}")
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as error:
        raise ValueError(f"system_prompt is not a valid format string ({error}); double literal braces") from error
    if fields != _PAIRWISE_FIELDS:
        raise ValueError(
            f"system_prompt must contain exactly the placeholders {sorted(_PAIRWISE_FIELDS)}, got {sorted(fields)}"
        )
    return template


def render_pairwise_prompt(template: str, prompt: str, pair: Sequence[str]) -> str:
    """The judge's request for one prompt and one (shown-order) pair of completions."""
    return template.format(prompt=prompt, response0=pair[0], response1=pair[1])
