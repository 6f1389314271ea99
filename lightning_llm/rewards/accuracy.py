r"""An exact-answer reward: 1.0 when a completion's final answer equals the ``solution`` column.

TRL's ``accuracy_reward`` verifies answers symbolically with the ``math_verify`` package; this one needs no extra
package and follows a rule simple enough to state, so a recipe knows exactly what it rewards.

**The final answer** of a text is, in order of preference:

1. the content of its last ``\boxed{...}`` (braces balanced), else
2. the rest of the line after its last answer marker: ``####`` (GSM8K), ``answer:``, ``answer is:`` or
   ``answer is`` (any case), else
3. the whole text.

**The solution** is read the same way (so a GSM8K ``answer`` column "... #### 72" or a ``\boxed{}`` solution
works).

**Numbers.** When the solution's answer is a number (an integer, a decimal, ``a/b`` or ``\frac{a}{b}``, with an
optional sign, ``1,234``-style thousands separators, and ``$``/``%`` signs, bold ``**`` and a final full stop
ignored), the completion's answer is the number its answer text is, else the *first* number in it when it came
from a box or a marker ("Answer: 42 apples"), else the *last* number of the whole text ("6 * 7 = 42"); they are
equal when they are equal as exact fractions (``0.5`` = ``1/2`` = ``\frac{1}{2}``, ``2.0`` = ``2``).

**Other answers** are compared as strings after normalisation: lower case, runs of whitespace made one space,
surrounding whitespace, ``$``, ``*`` and a final full stop removed.

The reward is ``None`` (not applicable: NaN in the rewards) when the solution is missing (``None``) or empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from lightning_llm.rewards._text import completion_text

_BOXED = re.compile(r"\\boxed\s*\{")
_MARKER = re.compile(r"####|\banswer\s+is\s*:?|\banswer\s*:", re.IGNORECASE)
_NUMBER = re.compile(
    r"(?P<fsign>[-+]?)\\[dt]?frac\{\s*(?P<fnum>\d+)\s*\}\{\s*(?P<fden>\d+)\s*\}"  # \frac{1}{2}
    r"|(?P<num>[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|[-+]?\.\d+)(?:/(?P<den>\d+))?"  # -1,234.5 or 3/4
)


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` of ``text`` (nested braces kept), or None (none, or unbalanced)."""
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    depth, begin = 1, starts[-1].end()
    for position in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[begin:position]
    return None


def after_last_marker(text: str) -> str | None:
    """The rest of the line after the last answer marker of ``text`` (``####``, ``answer:``, ``answer is``), or
    None when there is no marker."""
    markers = list(_MARKER.finditer(text))
    if not markers:
        return None
    rest = text[markers[-1].end():].strip()
    return rest.split("\n", 1)[0]


def answer_region(text: str) -> tuple[str, bool]:
    """The text holding the final answer, and whether it was delimited (a box or a marker) rather than the whole
    text."""
    for extract in (last_boxed, after_last_marker):
        region = extract(text)
        if region is not None:
            return region, True
    return text, False


def _number_of(match: re.Match) -> Fraction | None:
    if match.group("fnum") is not None:
        denominator = int(match.group("fden"))
        if denominator == 0:
            return None
        value = Fraction(int(match.group("fnum")), denominator)
        return -value if match.group("fsign") == "-" else value
    value = Fraction(match.group("num").replace(",", ""))
    if match.group("den") is not None:
        denominator = int(match.group("den"))
        return value / denominator if denominator else None
    return value


def _strip_decorations(text: str) -> str:
    text = re.sub(r"\\?[$%]", "", text).strip().strip("*").strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number when the whole of it (decorations aside, see the module docstring) is one."""
    match = _NUMBER.fullmatch(_strip_decorations(text))
    return _number_of(match) if match else None


def normalize_text(text: str) -> str:
    """A non-numeric answer as it is compared: lower case, whitespace runs made one space, surrounding whitespace,
    ``$``, ``*`` and a final full stop removed."""
    text = re.sub(r"\s+", " ", text.lower()).strip().strip("$*").strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def extract_answer(text: str, numeric: bool) -> Fraction | str | None:
    """The final answer of a completion's ``text``: a number when ``numeric`` (None when it has none), else the
    normalised answer text (see the module docstring)."""
    region, delimited = answer_region(text)
    if not numeric:
        return normalize_text(region)
    whole = parse_number(region)
    if whole is not None:
        return whole
    numbers = list(_NUMBER.finditer(region))
    if not numbers:
        return None
    return _number_of(numbers[0] if delimited else numbers[-1])


def solution_answer(solution: Any, row: int) -> Fraction | str | None:
    """The answer a ``solution`` value states: a number, a normalised string, or None when it is missing/empty."""
    if solution is None:
        return None
    if isinstance(solution, bool) or not isinstance(solution, (str, int, float, Fraction)):
        raise ValueError(f"accuracy_reward: solution[{row}] must be a string or a number, got {solution!r}")
    region, _ = answer_region(str(solution))
    number = parse_number(region)
    if number is not None:
        return number
    text = normalize_text(region)
    return text or None


def accuracy_reward(
    completions: Sequence,
    solution: Sequence,
    log_extra: Callable[[str, list], None] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    r"""1.0 when a completion's final answer equals its row's ``solution``, 0.0 when it does not, None when the
    solution is missing; the rule is in the module docstring.

    Args:
        completions: strings, or conversational completions (``[{"role": "assistant", "content": text}]``).
        solution: the ``solution`` column, one value per completion.
        log_extra: when given (the trainer does), the ``solution``, ``gold_parsed`` and ``answer_parsed`` columns of
            the completions table are logged, as TRL's ``accuracy_reward`` logs them.
        **kwargs: the other arguments and columns reward functions get (unused).

    Example:
        >>> accuracy_reward(["6 * 7 = 42", r"so \boxed{\frac{1}{2}}", "Answer: Paris.", "41"],
        ...                 ["42", "0.5", "paris", None])
        [1.0, 1.0, 1.0, None]
    """
    if len(completions) != len(solution):
        raise ValueError(f"accuracy_reward: {len(completions)} completions for {len(solution)} solutions")
    rewards: list[float | None] = []
    golds, answers = [], []
    for row, (completion, gold_value) in enumerate(zip(completions, solution)):
        gold = solution_answer(gold_value, row)
        if gold is None:
            rewards.append(None)
            golds.append("[missing]")
            answers.append("[skipped]")
            continue
        answer = extract_answer(completion_text(completion), numeric=isinstance(gold, Fraction))
        rewards.append(1.0 if answer == gold else 0.0)
        golds.append(str(gold))
        answers.append("[no answer]" if answer is None else str(answer))
    if log_extra is not None:
        log_extra("solution", [str(value) for value in solution])
        log_extra("gold_parsed", golds)
        log_extra("answer_parsed", answers)
    return rewards
