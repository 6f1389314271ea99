"""Win rate of the policy against the reference, decided by a pairwise judge at every validation."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from lightning_llm.callbacks._generation import (
    GenerationSettings,
    check_prompt_arguments,
    generate_across_ranks,
    prompt_texts,
    reference_model,
    resolve_prompts,
)
from lightning_llm.judges.base import FAILED, BasePairwiseJudge

log = logging.getLogger(__name__)


def win_rate(choices: Sequence[int], policy_index: int = 1) -> float | None:
    """Fraction of decided pairs (``choice != -1``) won by the completion at ``policy_index``; ``None`` if none."""
    decided = [choice for choice in choices if choice != FAILED]
    if not decided:
        return None
    return sum(choice == policy_index for choice in decided) / len(decided)


def average_win_probability(first_better: Sequence[float]) -> float | None:
    """Mean probability that the *second* completion (the policy's) is better, over decided pairs (score != -1)."""
    decided = [score for score in first_better if score != FAILED]
    if not decided:
        return None
    return sum(1.0 - score for score in decided) / len(decided)


class WinRateCallback(L.Callback):
    """At every validation, completes the validation prompts with the policy and with the reference, asks a pairwise
    judge which completion is better, and logs ``val/win_rate``: the fraction of prompts where the policy's wins
    (pairs the judge could not decide, -1, are left out).

    The reference is the module's separate ``ref_model`` when it has one (generated from at each validation, so a
    TR-DPO-synced reference is followed); otherwise, as TRL did, the policy's own completions when training
    started (generated once and kept in checkpoints). The judge sees each pair as ``(reference, policy)``, shuffled
    when ``shuffle_order`` is set, with conversations rendered through the chat template. Generation is split
    across ranks; global rank 0 asks the judge and every rank logs its answer.

    Args:
        judge: a pairwise judge (``lightning_llm.judges``), e.g. ``HfPairwiseJudge`` or ``OpenAIPairwiseJudge``.
        prompts: prompts (strings or conversations); default the validation prompts of the trainer's datamodule.
        num_prompts: use at most this many prompts (``None``: all).
        max_new_tokens: generation length limit.
        do_sample: sample (else greedy decoding).
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        batch_size: prompts per ``generate`` call.
        shuffle_order: let the judge present each pair in a random order, cancelling its position bias.
        use_soft_judge: ask the judge for probabilities and also log ``val/avg_win_prob``, the policy's mean
            probability of being better (``val/win_rate`` then counts probabilities above 0.5 as wins).
    """

    def __init__(
        self,
        judge: BasePairwiseJudge,
        prompts: list[str | list[dict]] | None = None,
        num_prompts: int | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 16,
        shuffle_order: bool = True,
        use_soft_judge: bool = False,
    ) -> None:
        if not callable(getattr(judge, "judge", None)):
            raise ValueError(f"judge must be a pairwise judge with a judge() method, got {type(judge).__name__}")
        self.judge = judge
        self.prompts = check_prompt_arguments(prompts, num_prompts)
        self.num_prompts = num_prompts
        self.settings = GenerationSettings(max_new_tokens, do_sample, temperature, top_p, batch_size)
        self.shuffle_order = shuffle_order
        self.use_soft_judge = use_soft_judge
        self.initial_completions: list[str] | None = None
        self.last_win_rate: float | None = None
        self._resolved_prompts: list | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_prompts=self.num_prompts, judge=type(self.judge).__name__)

    def _prompts(self, trainer: L.Trainer) -> list:
        if self._resolved_prompts is None:
            self._resolved_prompts = resolve_prompts(trainer, self.prompts, self.num_prompts)
        return self._resolved_prompts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if reference_model(pl_module) is None and self.initial_completions is None:
            self.initial_completions = self._generate(trainer, pl_module, model=None)

    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule, model: Any) -> list[str]:
        return generate_across_ranks(trainer, pl_module, self._prompts(trainer), self.settings, model=model)

    def _reference_completions(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        ref_model = reference_model(pl_module)
        if ref_model is not None:
            return self._generate(trainer, pl_module, model=ref_model)
        if self.initial_completions is None:
            # Validation before any training (trainer.validate): the current policy is the initial one.
            self.initial_completions = self._generate(trainer, pl_module, model=None)
        if len(self.initial_completions) != len(self._prompts(trainer)):
            raise ValueError(f"WinRateCallback: {len(self.initial_completions)} stored reference completions for "
                             f"{len(self._prompts(trainer))} prompts; the prompts changed since they were generated")
        return self.initial_completions

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        reference = self._reference_completions(trainer, pl_module)
        policy = self._generate(trainer, pl_module, model=None)
        result = self._judge(pl_module, reference, policy) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            result = trainer.strategy.broadcast(result, src=0)
        rate, probability = result
        self.last_win_rate = rate
        if rate is None:
            rank_zero_warn("WinRateCallback: the judge decided none of the pairs; val/win_rate is not logged")
            return
        pl_module.log("val/win_rate", rate, on_step=False, on_epoch=True, batch_size=1, sync_dist=False)
        if probability is not None:
            pl_module.log("val/avg_win_prob", probability, on_step=False, on_epoch=True, batch_size=1,
                          sync_dist=False)

    def _judge(self, pl_module: L.LightningModule, reference: list[str],
               policy: list[str]) -> tuple[float | None, float | None]:
        texts = prompt_texts(pl_module.tokenizer, self._resolved_prompts)
        pairs = [[ref, pol] for ref, pol in zip(reference, policy)]
        if not self.use_soft_judge:
            choices = self._checked(self.judge.judge(texts, pairs, shuffle_order=self.shuffle_order), pairs)
            return win_rate(choices), None
        scores = self._checked(
            self.judge.judge(texts, pairs, shuffle_order=self.shuffle_order, return_scores=True), pairs
        )
        choices = [FAILED if score == FAILED else (0 if score > 0.5 else 1) for score in scores]
        return win_rate(choices), average_win_probability(scores)

    def _checked(self, answers: Any, pairs: list) -> list:
        answers = list(answers)
        if len(answers) != len(pairs):
            raise ValueError(
                f"{type(self.judge).__name__}.judge returned {len(answers)} answers for {len(pairs)} pairs"
            )
        return answers

    def state_dict(self) -> dict[str, Any]:
        return {"initial_completions": self.initial_completions}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_completions = state_dict.get("initial_completions")
