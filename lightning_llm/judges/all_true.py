"""A mixture of binary judges that accepts a completion only when every one of them does (CGPO's MoJ)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_llm.judges.base import FAILED, BaseBinaryJudge

_VALID = (0, 1, FAILED)


def combine_all_true(judgements: Sequence[Sequence[int]]) -> list[int]:
    """Per completion: -1 if any judge failed, else 1 if every judge said 1, else 0.

    ``judgements[j][i]`` is judge ``j``'s decision on completion ``i``.
    """
    combined = []
    for index, decisions in enumerate(zip(*judgements)):
        invalid = [decision for decision in decisions if decision not in _VALID]
        if invalid:
            raise ValueError(f"Binary judgements must be 0, 1 or -1; got {invalid} for completion {index}")
        if FAILED in decisions:
            combined.append(FAILED)
        else:
            combined.append(1 if all(decision == 1 for decision in decisions) else 0)
    return combined


class AllTrueJudge(BaseBinaryJudge):
    """Combine binary judges: 1 only when all of them answer 1, -1 when any of them fails, 0 otherwise.

    This is the "mixture of judges" of CGPO (arXiv 2409.20370): a completion passes only if it meets every
    constraint.

    Args:
        judges: the binary judges to combine. None or none at all: every completion passes (all of no constraints
            hold), which is what ``AllTrueJudge()`` means in TRL-style scripts that add judges later.
    """

    def __init__(self, judges: Sequence[BaseBinaryJudge] | None = None) -> None:
        judges = list(judges) if judges is not None else []
        for index, judge in enumerate(judges):
            if not isinstance(judge, BaseBinaryJudge):
                raise ValueError(f"judges[{index}] must be a BaseBinaryJudge, got {type(judge).__name__}")
        self.judges = judges

    def judge(
        self,
        prompts: list[str],
        completions: list[str],
        gold_completions: list[str] | None = None,
        shuffle_order: bool = True,
    ) -> list[int]:
        """Ask every judge about every completion and combine their answers (see the class docstring)."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"prompts and completions must have the same length, got {len(prompts)} and {len(completions)}"
            )
        if gold_completions is not None and len(gold_completions) != len(prompts):
            raise ValueError(
                f"gold_completions must have one entry per prompt, got {len(gold_completions)} for {len(prompts)}"
            )
        judgements = []
        for judge in self.judges:
            decisions = list(judge.judge(prompts, completions, gold_completions, shuffle_order))
            if len(decisions) != len(prompts):
                raise ValueError(
                    f"{type(judge).__name__} returned {len(decisions)} judgements for {len(prompts)} completions"
                )
            judgements.append(decisions)
        if not judgements:
            return [1] * len(completions)
        return combine_all_true(judgements)
