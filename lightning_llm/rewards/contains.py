"""A reward for whether a completion contains a given text: a signal a tiny model can learn in a few steps, for
learning tests and small recipes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning_llm.rewards._text import completion_text


class ContainsReward:
    """1.0 when a completion's text contains ``target``, else 0.0.

    Args:
        target: the text to look for (non-empty).
        case_sensitive: compare case-sensitively (default) or not.
        name: the metric name; default ``contains_<target>`` (non-word characters made ``_``).
    """

    def __init__(self, target: str, *, case_sensitive: bool = True, name: str | None = None) -> None:
        if not isinstance(target, str) or not target:
            raise ValueError(f"make_contains_reward: target must be a non-empty string, got {target!r}")
        self.target = target
        self.case_sensitive = case_sensitive
        slug = re.sub(r"\W+", "_", target).strip("_")
        self.__name__ = name if name is not None else (f"contains_{slug}" if slug else "contains_reward")

    def __call__(self, completions: Sequence, **kwargs: Any) -> list[float]:
        target = self.target if self.case_sensitive else self.target.lower()
        texts = (completion_text(completion) for completion in completions)
        return [1.0 if target in (text if self.case_sensitive else text.lower()) else 0.0 for text in texts]


def make_contains_reward(target: str, *, case_sensitive: bool = True, name: str | None = None) -> ContainsReward:
    """A reward function giving 1.0 to completions that contain ``target`` (see :class:`ContainsReward`).

    Example:
        >>> reward = make_contains_reward("Paris")
        >>> reward.__name__, reward(["It is Paris.", "It is Rome."])
        ('contains_Paris', [1.0, 0.0])
    """
    return ContainsReward(target, case_sensitive=case_sensitive, name=name)
