"""Format rewards: does a completion lay out its reasoning in ``<think>`` tags?"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_llm.rewards._text import completion_text

OPEN, CLOSE = "<think>", "</think>"


def _thinks_first(text: str) -> bool:
    """TRL's check: the text starts with ``<think>``, has no second ``<think>``, and closes it with ``</think>``
    (anything, even nothing, may follow)."""
    rest = text[len(OPEN):]
    return text.startswith(OPEN) and OPEN not in rest and CLOSE in rest


def think_format_reward(completions: Sequence, **kwargs: Any) -> list[float]:
    """1.0 when a completion starts with a ``<think>...</think>`` block (one opening tag, closed), else 0.0: what
    TRL's ``think_format_reward`` checks.

    Args:
        completions: strings, or conversational completions (their assistant text is read).
        **kwargs: the other arguments and columns reward functions get (unused).

    Example:
        >>> think_format_reward(["<think>\\nsum it\\n</think>\\n4", "<think>\\nsum it\\n4"])
        [1.0, 0.0]
    """
    return [1.0 if _thinks_first(completion_text(completion)) else 0.0 for completion in completions]


def format_reward(completions: Sequence, **kwargs: Any) -> list[float]:
    """1.0 when a completion is exactly one ``<think>...</think>`` block at its start followed by a non-blank
    answer, else 0.0: :func:`think_format_reward`, stricter (one closing tag, and an answer after it), so that a
    policy is not paid for thinking without answering.

    Args:
        completions: strings, or conversational completions (their assistant text is read).
        **kwargs: the other arguments and columns reward functions get (unused).

    Example:
        >>> format_reward(["<think>2 + 2</think> 4", "<think>2 + 2</think>", "4"])
        [1.0, 0.0, 0.0]
    """
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        good = _thinks_first(text) and text.count(CLOSE) == 1 and text.split(CLOSE, 1)[1].strip() != ""
        rewards.append(1.0 if good else 0.0)
    return rewards
