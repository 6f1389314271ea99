"""Penalties on the shape of a completion's tokens: overlong completions (DAPO) and repeated n-grams.

Both are callable objects rather than closures so that they pickle (to data-loader workers or spawned processes),
and each carries TRL's ``__name__``, so its metrics are TRL's ``rewards/<name>/mean``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class SoftOverlongPunishment:
    r"""DAPO's soft overlong punishment (Yu et al., 2025, arXiv 2503.14476, Eq. 13), per completion of ``|y|``
    tokens, with :math:`L_{max}` = ``max_completion_len`` and :math:`L_{cache}` = ``soft_punish_cache``:

    .. math::

        R(y) = \begin{cases} 0 & |y| \le L_{max} - L_{cache} \\
        \frac{(L_{max} - L_{cache}) - |y|}{L_{cache}} & L_{max} - L_{cache} < |y| \le L_{max} \\
        -1 & |y| > L_{max} \end{cases}

    so the penalty grows linearly from 0 to -1 over the last ``soft_punish_cache`` tokens allowed.
    """

    def __init__(self, max_completion_len: int, soft_punish_cache: int) -> None:
        if max_completion_len < 1:
            raise ValueError(f"max_completion_len must be >= 1, got {max_completion_len}")
        if not 0 <= soft_punish_cache <= max_completion_len:
            raise ValueError(f"soft_punish_cache must be between 0 and max_completion_len ({max_completion_len}), "
                             f"got {soft_punish_cache}")
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache
        self.__name__ = "soft_overlong_punishment_reward"

    def penalty(self, length: int) -> float:
        """The reward of a completion of ``length`` tokens."""
        safe = self.max_completion_len - self.soft_punish_cache  # longest length that goes unpunished
        if length <= safe:
            return 0.0
        if length <= self.max_completion_len:
            return (safe - length) / self.soft_punish_cache
        return -1.0

    def __call__(self, completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float]:
        return [self.penalty(len(ids)) for ids in completion_ids]


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> SoftOverlongPunishment:
    """The reward function of DAPO's soft overlong punishment (see :class:`SoftOverlongPunishment`), TRL's name and
    formula.

    Example:
        >>> get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)([[1] * 90])
        [-0.5]
    """
    return SoftOverlongPunishment(max_completion_len, soft_punish_cache)


class RepetitionPenalty:
    r"""The repetition penalty of Yeo et al., 2025 (arXiv 2502.03373, App. C.2), over each completion's token
    n-grams: ``(1 - unique / total) * max_penalty`` (0 for a completion shorter than ``ngram_size``), from 0 (no
    n-gram repeats) towards ``max_penalty`` (all repeat)."""

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0) -> None:
        if ngram_size < 1:
            raise ValueError(f"ngram_size must be >= 1, got {ngram_size}")
        if max_penalty > 0:
            raise ValueError(f"max_penalty must be <= 0 (a penalty), got {max_penalty}")
        self.ngram_size = ngram_size
        self.max_penalty = max_penalty
        self.__name__ = "repetition_penalty_reward"

    def penalty(self, ids: Sequence[int]) -> float:
        """The reward of one completion's token ids."""
        ids = list(ids)
        ngrams = [tuple(ids[start:start + self.ngram_size]) for start in range(len(ids) - self.ngram_size + 1)]
        if not ngrams:
            return 0.0
        repeated = 1.0 - len(set(ngrams)) / len(ngrams)
        return repeated * self.max_penalty if repeated else 0.0

    def __call__(self, completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float]:
        return [self.penalty(ids) for ids in completion_ids]


def get_repetition_penalty_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> RepetitionPenalty:
    """The reward function penalising repeated token n-grams (see :class:`RepetitionPenalty`), TRL's name and
    formula.

    Example:
        >>> get_repetition_penalty_reward(ngram_size=2)([[1, 2, 3, 4], [5, 5, 5, 5, 5]])
        [0.0, -0.75]
    """
    return RepetitionPenalty(ngram_size, max_penalty)
