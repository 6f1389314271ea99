"""``NashMDModule``: Nash Mirror Descent (TRL 1.13's ``trl.experimental.nash_md.NashMDTrainer``)."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_llm.data.batches import PromptBatch, RolloutBatch
from lightning_llm.judges.base import FAILED
from lightning_llm.losses.nash_md import (
    NASH_MD_MIXTURE_COEF,
    check_nash_md_arguments,
    nash_md_loss,
    nash_md_metrics,
    nash_md_probability,
)
from lightning_llm.models.peft import disabled_adapters, is_peft_model
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.online_dpo import JudgeError, OnlineDPOModule, PairwiseJudgeReward
from lightning_llm.rewards import RewardBatch
from lightning_llm.rollout import Rollouts
from lightning_llm.rollout.mixture import GeometricMixture

__all__ = ["NashMDModule", "PairwiseJudgeProbability"]


class PairwiseJudgeProbability(PairwiseJudgeReward):
    """A pairwise judge as Nash-MD's preference: rows ``2i`` (the policy's completion) and ``2i + 1`` (the mixture's)
    are judged together with ``return_scores=True``; row ``2i`` gets the judge's probability ``p`` that the first is
    better, row ``2i + 1`` gets ``1 - p`` (TRL 1.0's Nash-MD read ``p`` as ``P(y ≻ y')``).

    A judge that raises, answers the wrong number of values, or answers anything but a number in ``[0, 1]`` for a
    pair (its -1, "could not decide", and NaN included) raises :class:`~lightning_llm.modules.online_dpo.JudgeError`.
    """

    def score(self, batch: RewardBatch) -> list[float]:
        prompts, answers = self.judge_pairs(batch, "probabilities in [0, 1]", return_scores=True)
        scores: list[float] = []
        for index, answer in enumerate(answers):
            valid = isinstance(answer, numbers.Real) and not isinstance(answer, bool)
            if not valid or not math.isfinite(answer) or not 0 <= answer <= 1:
                meaning = " (the judge could not decide)" if valid and answer == FAILED else ""
                raise JudgeError(f"{self.describe()} answered {answer!r}{meaning} for pair {index} (prompt "
                                 f"{prompts[2 * index]!r:.120}); expected the probability, in [0, 1], that the first "
                                 "completion is better")
            scores += [float(answer), 1.0 - float(answer)]
        return scores


class NashMDModule(OnlineDPOModule):
    """Nash-MD (Munos et al., 2024, "Nash Learning from Human Feedback", arXiv:2312.00886) on a
    :class:`~lightning_llm.PromptDataModule`.

    Each prompt gets one completion ``y`` from the current policy and one ``y'`` from the geometric mixture of policy
    and reference, every token drawn from ``log_softmax(c · z_ref + (1 - c) · z_π)`` (``c = mixture_coef``; see
    :class:`~lightning_llm.rollout.mixture.GeometricMixture`: the ``"fast"`` engine decodes both models with a KV
    cache each, ``"hf"`` runs ``generate`` without a cache, as TRL). The preference ``P(y ≻ y')`` is
    ``σ(s(y) - s(y'))`` of the reward sources' scores (``missing_eos_penalty`` lowers a completion without EOS), or a
    pairwise ``judge``'s probability that the policy's completion is better. The loss, on the policy's completion
    only (:func:`lightning_llm.losses.nash_md.nash_md_loss`), is::

        mean_i( β · Σ_t sg(log π(y_t) - log π_ref(y_t)) · log π(y_t)  -  (P_i - 1/2) · log π(y_i) )

    a REINFORCE estimate of the gradient of ``P(π ≻ π^c_mix) - β KL(π ‖ π_ref)`` with ``1/2`` as the control variate.
    Log-probs are those of the raw logits over prompt + completion, as in :class:`~lightning_llm.OnlineDPOModule`.

    In a micro-batch, row ``2i`` is the policy's completion of a prompt and row ``2i + 1`` the mixture's (the data
    module repeats each prompt twice); ``batch_size`` counts completions, twice TRL's prompts.

    Logs TRL 1.13's metrics: ``loss``, ``loss/score`` (``(P - 1/2) · log π(y)``), ``loss/kl`` (``log π(y) - log
    π_ref(y)``), ``objective/entropy`` (``-log π(y)``), ``rewards/probabilities``, ``rewards/chosen`` and
    ``rewards/rejected`` (the scores of the policy's and the mixture's completions; with reward sources only, as TRL
    1.0 with a judge), ``rewards/margins`` (``log π(y) - log π_ref(y)``) and ``rewards/accuracies`` (the share of them
    > 0), ``logps/chosen`` and ``logps/rejected`` (``log π(y)`` and ``log π_ref(y)``, both of the policy's completion,
    as TRL names them), ``val/model_contain_eos_token``, ``val/ref_contain_eos_token`` (the mixture's), ``beta``,
    ``mixture_coef``; plus ``completions/*``, ``num_tokens``, ``learning_rate``.

    Differences from TRL 1.13, on purpose: TRL 1.13 takes exactly one reward model; any reward sources (functions,
    reward models, several with weights) or a pairwise judge (TRL 1.0's; its -1 or any answer outside ``[0, 1]``
    raises :class:`~lightning_llm.modules.online_dpo.JudgeError`) work here. ``missing_eos_penalty`` looks for EOS in
    the completion only (TRL 1.13 searched prompt + completion). The log-probs are computed over prompt + completion
    cut to ``max_length`` (TRL 1.13 does not cut). A list ``beta``/``mixture_coef`` is indexed by the Lightning epoch.
    Under PEFT without ``ref_model``, the mixture's reference is the policy with its adapters disabled (TRL 1.13 mixed
    the policy with itself there).

    Args:
        model: see :class:`~lightning_llm.modules.online.OnlineModule`.
        tokenizer: see :class:`~lightning_llm.modules.online.OnlineModule`.
        beta: ``β``, the weight of the KL term (>= 0), or a list: ``beta[epoch]``, the last value for later epochs.
            TRL's default 0.1.
        mixture_coef: ``c`` in ``[0, 1]``, the reference's weight in the mixture's logits (0: the policy itself, 1:
            the reference), or a list: ``mixture_coef[epoch]``, the last value for later epochs. TRL's default 0.5.
        **kwargs: the :class:`~lightning_llm.OnlineDPOModule` arguments (``reward_funcs`` or ``judge``,
            ``missing_eos_penalty``, ``max_length``, ``max_completion_length``, ``temperature``, ``ref_model``,
            ``rollout``, ...), but ``loss_type``: Nash-MD has one loss, and any value but Online DPO's default is
            refused; ``count_padding_in_objectives`` has no effect (Nash-MD's metrics sum over completion tokens, as
            TRL 1.13's).
    """

    def __init__(self, model: ModelArg, tokenizer: TokenizerArg = None, *, beta: float | list[float] = 0.1,
                 mixture_coef: float | list[float] = NASH_MD_MIXTURE_COEF, **kwargs: Any) -> None:
        if kwargs.pop("loss_type", "sigmoid") != "sigmoid":  # the CLI passes Online DPO's default along
            raise ValueError("NashMDModule has one loss (the Nash-MD REINFORCE loss): leave loss_type unset")
        betas = [float(b) for b in beta] if isinstance(beta, (list, tuple)) else [float(beta)]
        coefs = ([float(c) for c in mixture_coef] if isinstance(mixture_coef, (list, tuple))
                 else [float(mixture_coef)])
        check_nash_md_arguments(betas, coefs, kwargs.get("missing_eos_penalty"))
        # Online DPO's checks want beta > 0; Nash-MD allows 0 (no KL term): its own beta is set below
        super().__init__(model, tokenizer, beta=0.1, **kwargs)
        self.beta = list(betas) if isinstance(beta, (list, tuple)) else betas[0]
        self.betas = betas
        self.mixture_coef = list(coefs) if isinstance(mixture_coef, (list, tuple)) else coefs[0]
        self.mixture_coefs = coefs
        if self.judge is not None:
            self.reward_specs = [PairwiseJudgeProbability(self.judge)]

    def current_mixture_coef(self) -> float:
        """``c`` of the current epoch."""
        return self.of_epoch(self.mixture_coefs)

    # ------------------------------------------------------------------------------------------- generation
    def sample_completions(self, batch: PromptBatch) -> Rollouts:
        """Rows ``2i`` from the policy, rows ``2i + 1`` from the geometric mixture (the same engine and sampling
        settings)."""
        return self.sample_pairs(batch, lambda: contextlib.nullcontext(self.mixture()))

    def mixture(self) -> GeometricMixture:
        """The policy's geometric mixture with the reference (the frozen copy, or the policy with its adapters
        disabled) at this epoch's ``mixture_coef``."""
        context: Callable[[], Any] | None = None
        if self.ref_model is not None:
            reference = self.ref_model
        elif is_peft_model(self.model):
            reference = self.model
            policy = self.model
            context = lambda: disabled_adapters(policy)  # noqa: E731
        else:
            raise ValueError("NashMDModule samples from the policy's mixture with the reference but has none: give "
                             "ref_model or a PEFT policy")
        return GeometricMixture(self.model, reference, self.current_mixture_coef(), reference_context=context)

    def reference_token_logps(self, rollout: RolloutBatch, micro: int) -> Tensor:
        """``[B, C]`` reference log-probs of the policy's completions (rows ``2i``); the mixture's rows stay 0: only
        the policy's completion enters the loss."""
        rows = torch.arange(0, rollout.size, 2, device=rollout.completion_ids.device)
        values = super().reference_token_logps(rollout.select(rows), max(micro // 2, 1))
        out = torch.zeros(rollout.completion_ids.shape, dtype=values.dtype, device=values.device)
        out[rows] = values
        return out

    # ------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, rollout: RolloutBatch) -> Tensor:
        rows = torch.arange(0, rollout.size, 2, device=rollout.completion_ids.device)
        policy_rows = rollout.select(rows)
        token_logps, _ = self.completion_token_logps(self.model, policy_rows)
        scores = rollout.advantages
        if self.judge is None:
            probability = nash_md_probability(scores[0::2], scores[1::2])
        else:
            probability = scores[0::2].detach()
        beta = self.current_beta()
        out = nash_md_loss(token_logps, rollout.ref_per_token_logps[rows], policy_rows.completion_mask, probability,
                           beta=beta)
        eos = self.contains_eos(rollout)
        metrics = nash_md_metrics(out, scores[0::2], scores[1::2], contains_eos=eos[0::2],
                                  mixture_contains_eos=eos[1::2], mixture_coef=self.current_mixture_coef())
        pairs = len(rows)
        for name, value in metrics.items():
            if self.judge is not None and name in ("rewards/chosen", "rewards/rejected"):
                continue  # a judge gives no scores
            if name.startswith("val/"):
                name = self.eos_metric(name.removeprefix("val/"))
            if isinstance(value, Tensor):
                self.record(name, value.detach().float() * pairs, pairs)
            else:
                self.record(name, value)
        return out.loss
