"""``OnlineDPOModule``: Online DPO (TRL 1.16's ``trl.experimental.online_dpo.OnlineDPOTrainer``), with reward sources
or a pairwise judge."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_llm.data.batches import IGNORE_INDEX, PromptBatch, RolloutBatch
from lightning_llm.judges.base import FAILED, BasePairwiseJudge
from lightning_llm.losses.online import (
    check_online_dpo_arguments,
    first_is_chosen,
    online_dpo_loss,
    online_dpo_scores,
    pair_up,
    sequence_logps,
)
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.online import OnlineModule
from lightning_llm.rewards import RewardBatch, RewardError, RewardSource
from lightning_llm.rewards._text import completion_text, conversation_plain_text, is_conversation
from lightning_llm.rollout import Rollouts

__all__ = ["JudgeError", "OnlineDPOModule", "PairwiseJudgeReward", "interleave_rollouts"]


class JudgeError(RewardError):
    """A pairwise judge failed, or answered something other than 0 or 1 for a pair (its -1, "could not decide",
    included): Online DPO refuses to turn it into a preference."""


class PairwiseJudgeReward(RewardSource):
    """A pairwise judge as the reward source of :class:`OnlineDPOModule`: rows ``2i`` and ``2i + 1`` (the two
    completions of one prompt) are judged together; the completion the judge prefers scores 1.0, the other 0.0.

    Judges read strings, so a conversational prompt is shown as ``"User: ...\\n\\nAssistant:"`` and a conversational
    completion as its text (the simple chat template TRL 1.0's online trainers rendered for judges).
    """

    kind = "pairwise judge"

    def __init__(self, judge: BasePairwiseJudge) -> None:
        if not isinstance(judge, BasePairwiseJudge):
            raise ValueError(f"judge must be a BasePairwiseJudge (lightning_llm.judges), got {type(judge).__name__}")
        self.judge = judge
        self.name = type(judge).__name__

    def judge_pairs(self, batch: RewardBatch, expected: str, **judge_kwargs: Any) -> tuple[list[str], list[Any]]:
        """The prompts as the judge reads them (one per row) and the judge's answers for the pairs of rows ``2i``,
        ``2i + 1``: one per pair, else a :class:`JudgeError` that says the ``expected`` answers."""
        prompts = [conversation_plain_text(p) if is_conversation(p) else p for p in batch.prompts]
        completions = [completion_text(c) for c in batch.completions]
        if len(prompts) % 2 or prompts[0::2] != prompts[1::2]:
            raise JudgeError(f"{self.describe()} needs the two completions of each prompt in consecutive rows")
        pairs = [[first, second] for first, second in zip(completions[0::2], completions[1::2])]
        try:
            answers = self.judge.judge(prompts[0::2], pairs, **judge_kwargs)
        except Exception as error:
            raise JudgeError(f"{self.describe()} raised {type(error).__name__}: {error} (judging {len(pairs)} "
                             "pairs)") from error
        if isinstance(answers, (str, bytes)) or not hasattr(answers, "__len__") or len(answers) != len(pairs):
            raise JudgeError(f"{self.describe()} answered {answers!r} for {len(pairs)} pairs; expected a list of "
                             f"{len(pairs)} {expected}")
        return prompts, list(answers)

    def score(self, batch: RewardBatch) -> list[float]:
        prompts, choices = self.judge_pairs(batch, "indices, 0 or 1 each")
        scores: list[float] = []
        for index, choice in enumerate(choices):
            if isinstance(choice, bool) or not isinstance(choice, numbers.Integral) or choice not in (0, 1):
                meaning = " (the judge could not decide)" if choice == FAILED else ""
                raise JudgeError(f"{self.describe()} answered {choice!r}{meaning} for pair {index} (prompt "
                                 f"{prompts[2 * index]!r:.120}); expected 0 (the first completion is better) or 1")
            scores += [1.0, 0.0] if choice == 0 else [0.0, 1.0]
        return scores


class OnlineDPOModule(OnlineModule):
    """Online DPO (Guo et al., 2024, arXiv:2402.04792) on a :class:`~lightning_llm.PromptDataModule`.

    Each prompt is completed twice by the current policy. The reward sources score both completions (the weighted
    sum over the sources that apply, minus ``missing_eos_penalty`` without an EOS) and the first is *chosen* when its
    score is at least the second's (TRL's tie rule); or a pairwise ``judge`` picks the chosen one. The policy is then
    trained with the DPO loss of ``loss_type`` on that pair (see :func:`lightning_llm.losses.online.online_dpo_loss`).
    Log-probs are those of the raw logits (no temperature division) over prompt + completion, the prompt cut from the
    left so that the batch fits ``max_length``, as TRL computes them (GRPO and RLOO divide by the temperature).

    ``batch_size`` of the data module counts completions, so it is twice TRL's ``per_device_train_batch_size`` (which
    counts prompts) and must be even; a micro-batch holds whole pairs, in the loader's prompt order (TRL generates
    per micro-batch and does not reshuffle). A pair's per-completion scores travel in the rollout's ``advantages``
    (under a judge: 1 for the preferred completion, 0 for the other).

    Logs TRL 1.16's metrics: ``loss``, ``objective/kl``, ``objective/entropy``, ``objective/non_score_reward``,
    ``objective/rlhf_reward``, ``objective/scores``, ``objective/scores_margin`` (the last three with reward sources
    only, as TRL), ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected``, ``val/contain_eos_token``, ``beta``; plus ``completions/*``, ``num_tokens``,
    ``learning_rate``; under validation the same under ``val/`` (``val/contain_eos_token`` there too).

    Deviations from TRL 1.16, on purpose: ``objective/kl``, ``objective/entropy`` and ``objective/non_score_reward``
    sum over the completion tokens only (TRL also sums the padding after shorter completions, so its values depend
    on the batch's padding; ``count_padding_in_objectives=True`` restores that). A list ``beta`` is indexed by the
    Lightning epoch (TRL indexes the list with its fractional epoch, which fails after the first step). TRL 1.16 has
    no judge; the judge path follows TRL 1.0, but a judge's -1 or any answer other than 0/1 raises
    :class:`JudgeError` (TRL 1.0 read it as "the second is better").

    Args:
        model: see :class:`~lightning_llm.modules.online.OnlineModule`.
        tokenizer: see :class:`~lightning_llm.modules.online.OnlineModule`.
        reward_funcs: the reward sources (functions, import paths, reward models, binary judges; see
            :class:`~lightning_llm.modules.online.OnlineModule`); give these or ``judge``.
        judge: a :class:`~lightning_llm.judges.BasePairwiseJudge` that picks the better completion of each pair
            (e.g. :class:`~lightning_llm.judges.PairRMJudge`); give this or ``reward_funcs``.
        beta: ``β`` of the DPO loss (IPO's ``τ``), or a list: ``beta[epoch]``, the last value for later epochs.
        loss_type: ``sigmoid`` (DPO) or ``ipo``.
        missing_eos_penalty: subtracted from the score of each completion without an EOS token (reward sources
            only: a judge gives no score to lower); ``None``: off.
        max_length: the most tokens of prompt + completion the log-probs are computed over; longer prompts lose
            their first tokens. Must exceed ``max_completion_length``.
        max_completion_length: the most tokens a completion has (TRL's ``max_new_tokens``, default 64).
        temperature: sampling temperature (TRL's Online DPO default 0.9); the log-probs do not use it.
        count_padding_in_objectives: sum the ``objective/*`` metrics over padding positions too, as TRL does.
        disable_dropout: TRL's default, True.
        learning_rate: TRL's Online DPO default, 5e-7.
        num_generations: completions per prompt; Online DPO compares pairs, so 2 (any other value is refused).
        num_generations_eval: the same under validation: 2.
        **kwargs: the :class:`~lightning_llm.modules.online.OnlineModule` arguments (reward_weights,
            reward_tokenizers, rollout, rollout_kwargs, steps_per_generation, top_p, top_k, min_p, repetition_penalty,
            ref_model, generation_seed, ...) and the
            :class:`~lightning_llm.modules.base.LLMModule` ones.
    """

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        reward_funcs: Any = None,
        judge: BasePairwiseJudge | None = None,
        beta: float | list[float] = 0.1,
        loss_type: str = "sigmoid",
        missing_eos_penalty: float | None = None,
        max_length: int = 512,
        max_completion_length: int = 64,
        temperature: float = 0.9,
        count_padding_in_objectives: bool = False,
        disable_dropout: bool = True,
        learning_rate: float = 5e-7,
        num_generations: int = 2,
        num_generations_eval: int | None = 2,
        **kwargs: Any,
    ) -> None:
        for name, value in (("num_generations", num_generations), ("num_generations_eval", num_generations_eval)):
            if value not in (2, None):
                raise ValueError(f"OnlineDPOModule compares two completions per prompt: {name} must be 2, got "
                                 f"{value}")
        if (reward_funcs is None) == (judge is None):
            raise ValueError("OnlineDPOModule needs either reward_funcs (reward functions or models that score each "
                             "completion) or a pairwise judge, not both and not neither")
        if judge is not None:
            if missing_eos_penalty is not None:
                raise ValueError("missing_eos_penalty lowers reward scores; a pairwise judge gives none: leave it "
                                 "unset with a judge")
            if kwargs.get("reward_weights") is not None:
                raise ValueError("reward_weights weigh reward sources; a pairwise judge is not one: leave them unset")
            reward_funcs = [PairwiseJudgeReward(judge)]
        betas = [float(b) for b in beta] if isinstance(beta, (list, tuple)) else [float(beta)]
        check_online_dpo_arguments(loss_type, betas, missing_eos_penalty)
        if max_completion_length >= max_length:
            raise ValueError(f"max_length={max_length} must exceed max_completion_length={max_completion_length}: "
                             "the log-probs are computed over prompt + completion cut to max_length, and need at "
                             "least one prompt token")
        super().__init__(model, tokenizer, reward_funcs=reward_funcs, num_generations=2, num_generations_eval=2,
                         max_completion_length=max_completion_length, temperature=temperature, beta=betas[0],
                         disable_dropout=disable_dropout, learning_rate=learning_rate, **kwargs)
        self.beta = list(betas) if isinstance(beta, (list, tuple)) else betas[0]
        self.betas = betas
        self.judge = judge
        self.loss_type = loss_type
        self.missing_eos_penalty = None if missing_eos_penalty is None else float(missing_eos_penalty)
        self.max_length = max_length
        self.count_padding_in_objectives = count_padding_in_objectives

    @property
    def uses_reference(self) -> bool:
        return True

    def current_beta(self) -> float:
        """``β`` of the current epoch: ``beta[epoch]``, the last value once the list runs out."""
        return self.of_epoch(self.betas)

    def of_epoch(self, values: list[float]) -> float:
        """``values[epoch]``, the last value once the list runs out (TRL's per-epoch lists)."""
        return values[min(self.current_epoch, len(values) - 1)]

    # ------------------------------------------------------------------------------------------- generation
    def generate_and_score(self, batch: PromptBatch, num_generations: int, splits: int) -> list[RolloutBatch]:
        local = len(batch.prompt_ids)
        if local % splits == 0 and (local // splits) % 2:
            raise ValueError(f"OnlineDPOModule trains on whole pairs: a micro-batch of {local // splits} completions "
                             "cannot hold them; make the data module's batch_size (completions per micro-batch and "
                             "process, twice TRL's per_device_train_batch_size) even")
        if batch.indices is not None and list(batch.indices[0::2]) != list(batch.indices[1::2]):
            raise ValueError("OnlineDPOModule needs the two copies of each prompt in consecutive rows (a "
                             "PromptDataModule with num_generations=2 draws them so)")
        return super().generate_and_score(batch, num_generations, splits)

    def sample_pairs(self, batch: PromptBatch,
                     second: Callable[[], contextlib.AbstractContextManager[Any]]) -> Rollouts:
        """Rows ``2i`` sampled from the policy, rows ``2i + 1`` from the model that the context manager ``second()``
        yields (XPO's reference, Nash-MD's mixture), with the same engine, sampling settings and random stream. The
        policy samples first, outside that context (which may disable the policy's adapters)."""
        self.engine.sync_weights(self.model)
        generator = self._sampling_generator(batch.generation, self.training)
        prompts = batch.prompts

        def sample(model: Any, rows: slice) -> Rollouts:
            return self.engine.generate(
                model, batch.prompt_ids[rows], self.sampling, eos_token_ids=self.eos_token_ids(),
                pad_token_id=self.pad_token_id, generator=generator,
                prompts=None if prompts is None else prompts[rows])

        policy = sample(self.model, slice(0, None, 2))
        with second() as model:
            other = sample(model, slice(1, None, 2))
        return interleave_rollouts(policy, other)

    def generation_order(self, size: int) -> Tensor:
        """The loader's order: pairs stay together and each micro-batch is the prompts TRL would generate it for."""
        return torch.arange(size)

    def needs_old_logps(self, training: bool) -> bool:
        return False  # the loss reads the current policy and the reference only

    def completion_token_logps(self, model: nn.Module, rollout: RolloutBatch, *, return_entropy: bool = False
                               ) -> tuple[Tensor, Tensor | None]:
        """``[B, C]`` log-probs of every completion position (padding included; callers mask) from the raw logits,
        over prompt + completion with the prompt cut from the left to fit ``max_length`` (TRL's ``_forward``)."""
        completion_width = rollout.completion_ids.shape[1]
        cut = max(rollout.prompt_ids.shape[1] + completion_width - self.max_length, 0)
        prompt_ids, prompt_mask = rollout.prompt_ids[:, cut:], rollout.prompt_mask[:, cut:]
        width = prompt_ids.shape[1]
        input_ids = torch.cat([prompt_ids, rollout.completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, rollout.completion_mask], dim=1)
        labels = input_ids.clone()
        labels[:, :width] = IGNORE_INDEX
        out = self.token_logprobs(model, input_ids, labels, attention_mask=attention_mask,
                                  return_entropy=return_entropy)
        entropy = out.entropy[:, width - 1:] if return_entropy else None
        return out.logps[:, width - 1:], entropy

    def contains_eos(self, rollout: RolloutBatch) -> Tensor:
        """``[B]`` whether each completion holds an EOS token."""
        eos = torch.tensor(self.eos_token_ids(), device=rollout.completion_ids.device)
        return (torch.isin(rollout.completion_ids, eos) & rollout.completion_mask.bool()).any(dim=1)

    def compute_advantages(self, rewards_per_func: Tensor, rollout: RolloutBatch, num_generations: int) -> Tensor:
        """The ``[W·L]`` scores of every process's completions (what the pair rule reads)."""
        if self.judge is not None:
            return rewards_per_func[:, 0]
        contains_eos = self._gather_rows(self.contains_eos(rollout))
        return online_dpo_scores(rewards_per_func, self.reward_weight_tensor, contains_eos, self.missing_eos_penalty)

    # ------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, rollout: RolloutBatch) -> Tensor:
        token_logps, _ = self.completion_token_logps(self.model, rollout)
        ref_token_logps = rollout.ref_per_token_logps
        mask = rollout.completion_mask
        scores = rollout.advantages
        first_chosen = first_is_chosen(scores)
        beta = self.current_beta()
        out = online_dpo_loss(sequence_logps(token_logps, mask), sequence_logps(ref_token_logps, mask), first_chosen,
                              beta=beta, loss_type=self.loss_type)
        self.record_pair_metrics(out, token_logps.detach(), ref_token_logps, scores, first_chosen, rollout, beta)
        return out.loss

    def record_pair_metrics(self, out: Any, token_logps: Tensor, ref_token_logps: Tensor, scores: Tensor,
                            first_chosen: Tensor, rollout: RolloutBatch, beta: float) -> None:
        """TRL's Online DPO metrics of one micro-batch (means over its completions or pairs)."""
        mask = torch.ones_like(rollout.completion_mask) if self.count_padding_in_objectives else rollout.completion_mask
        kl = sequence_logps(token_logps - ref_token_logps, mask)  # [N]
        non_score_reward = -beta * kl
        self.record_mean("objective/kl", kl)
        self.record_mean("objective/entropy", -sequence_logps(token_logps, mask))
        self.record_mean("objective/non_score_reward", non_score_reward)
        if self.judge is None:
            chosen_scores, rejected_scores = pair_up(scores, first_chosen)
            self.record_mean("objective/rlhf_reward", scores + non_score_reward)
            self.record_mean("objective/scores", scores)
            self.record_mean("objective/scores_margin", chosen_scores - rejected_scores)
        self.record_dpo_rewards(out.chosen_rewards, out.rejected_rewards)
        self.record_mean("logps/chosen", out.chosen_logps)
        self.record_mean("logps/rejected", out.rejected_logps)
        self.record_mean(self.eos_metric("contain_eos_token"), self.contains_eos(rollout).float())
        self.record("beta", beta)

    def record_dpo_rewards(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> None:
        """``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` and ``rewards/accuracies`` of ``[B]`` pairs."""
        margins = chosen_rewards - rejected_rewards
        self.record_mean("rewards/chosen", chosen_rewards)
        self.record_mean("rewards/rejected", rejected_rewards)
        self.record_mean("rewards/margins", margins)
        self.record_mean("rewards/accuracies", (margins > 0).float())

    def eos_metric(self, name: str) -> str:
        """TRL logs its EOS shares as ``val/<name>`` in training too; under validation the ``val/`` prefix comes
        with the mode."""
        return f"val/{name}" if self.mode == "train" else name



def interleave_rollouts(first: Rollouts, second: Rollouts) -> Rollouts:
    """Rows ``first[0], second[0], first[1], second[1], ...`` (log-probs and extra fields where both have them)."""
    def zip_rows(a: list, b: list) -> list:
        return [row for pair in zip(a, b) for row in pair]

    logprobs = None
    if first.logprobs is not None and second.logprobs is not None:
        logprobs = zip_rows(first.logprobs, second.logprobs)
    names = set(first.extra_fields or {}) & set(second.extra_fields or {})
    extra = {name: zip_rows(first.extra_fields[name], second.extra_fields[name]) for name in sorted(names)} or None
    return Rollouts(completion_ids=zip_rows(first.completion_ids, second.completion_ids), logprobs=logprobs,
                    extra_fields=extra)
