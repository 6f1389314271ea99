"""``XPOModule``: Exploratory Preference Optimization (TRL 1.13's ``trl.experimental.xpo.XPOTrainer``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from lightning_llm.data.batches import PromptBatch, RolloutBatch
from lightning_llm.losses.online import first_is_chosen, sequence_logps
from lightning_llm.losses.xpo import XPOLossOutput, check_xpo_arguments, xpo_loss
from lightning_llm.models.peft import disabled_adapters, is_peft_model
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.online_dpo import OnlineDPOModule
from lightning_llm.rollout import Rollouts

__all__ = ["XPOModule"]


class XPOModule(OnlineDPOModule):
    """XPO (Xie et al., 2024, "Exploratory Preference Optimization", arXiv:2405.21046) on a
    :class:`~lightning_llm.PromptDataModule`.

    Each prompt gets one completion from the current policy and one from the reference. The reward sources score
    both (``missing_eos_penalty`` lowers a completion without EOS) and the policy's completion is *chosen* when its
    score is at least the reference's (TRL 1.13's rule), or a pairwise ``judge`` picks one. The loss of a pair is the
    DPO loss of ``loss_type`` on it plus the exploration term ``α · log π(y_ref)`` (the policy's token-summed log-prob
    of the reference's completion), averaged over the pairs. Log-probs are those of the raw logits over prompt +
    completion, as in :class:`~lightning_llm.OnlineDPOModule`.

    In a micro-batch, row ``2i`` is the policy's completion of a prompt and row ``2i + 1`` the reference's (the
    data module repeats each prompt twice); ``batch_size`` counts completions, twice TRL's prompts.

    Logs TRL 1.13's metrics: ``loss``, ``loss/dpo``, ``loss/xpo``, ``objective/kl`` (the policy-to-reference
    log-ratio summed over a completion, averaged over both samples), ``objective/entropy``,
    ``objective/model_scores``, ``objective/ref_scores``, ``objective/scores_margin`` (the last three with reward
    sources), ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
    ``logps/chosen`` and ``logps/rejected`` (as TRL 1.13 defines them: the policy's plus the reference's mean
    log-prob of the chosen, resp. rejected, completions), ``val/model_contain_eos_token``,
    ``val/ref_contain_eos_token``, ``alpha``, ``beta``.

    Differences from TRL 1.13, on purpose: TRL 1.13 takes exactly one reward model; any reward sources (functions,
    reward models, several with weights) or a pairwise judge (TRL 1.0's) work here. ``missing_eos_penalty`` looks
    for EOS in the completion only (TRL 1.13 searched prompt + completion). A list ``alpha``/``beta`` is indexed by
    the Lightning epoch.

    Args:
        model: see :class:`~lightning_llm.modules.online.OnlineModule`.
        tokenizer: see :class:`~lightning_llm.modules.online.OnlineModule`.
        alpha: ``α``, the weight of the exploration term, or a list: ``alpha[epoch]``, the last value for later
            epochs. TRL's default 1e-5.
        **kwargs: the :class:`~lightning_llm.OnlineDPOModule` arguments (``reward_funcs`` or ``judge``, ``beta``,
            ``loss_type``, ``missing_eos_penalty``, ``max_length``, ``max_completion_length``, ``temperature``,
            ``ref_model``, ``rollout``, ...).
    """

    def __init__(self, model: ModelArg, tokenizer: TokenizerArg = None, *, alpha: float | list[float] = 1e-5,
                 **kwargs: Any) -> None:
        alphas = [float(a) for a in alpha] if isinstance(alpha, (list, tuple)) else [float(alpha)]
        check_xpo_arguments(kwargs.get("loss_type", "sigmoid"), [0.1], alphas, None)  # beta: OnlineDPOModule's
        super().__init__(model, tokenizer, **kwargs)
        self.alpha = list(alphas) if isinstance(alpha, (list, tuple)) else alphas[0]
        self.alphas = alphas

    def current_alpha(self) -> float:
        """``α`` of the current epoch."""
        return self.of_epoch(self.alphas)

    # ------------------------------------------------------------------------------------------- generation
    def sample_completions(self, batch: PromptBatch) -> Rollouts:
        """Rows ``2i`` from the policy, rows ``2i + 1`` from the reference (the same engine and sampling settings)."""
        return self.sample_pairs(batch, self.reference_for_generation)

    @contextlib.contextmanager
    def reference_for_generation(self) -> Iterator[nn.Module]:
        """The reference as a model to sample from: the frozen copy, or the policy with its adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
        elif is_peft_model(self.model):
            with disabled_adapters(self.model):
                yield self.model
        else:
            raise ValueError("XPOModule samples from the reference but has none: give ref_model or a PEFT policy")

    # ------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, rollout: RolloutBatch) -> Tensor:
        token_logps, _ = self.completion_token_logps(self.model, rollout)
        mask = rollout.completion_mask
        logps = sequence_logps(token_logps, mask)
        ref_logps = sequence_logps(rollout.ref_per_token_logps, mask)
        first_chosen = first_is_chosen(rollout.advantages)
        beta, alpha = self.current_beta(), self.current_alpha()
        # rows 2i: the policy's samples, rows 2i + 1: the reference's
        out = xpo_loss(logps[0::2], ref_logps[0::2], logps[1::2], ref_logps[1::2], first_chosen, beta=beta,
                       alpha=alpha, loss_type=self.loss_type)
        self.record_xpo_metrics(out, logps.detach(), ref_logps, token_logps.detach(), rollout, first_chosen)
        return out.loss

    def record_xpo_metrics(self, out: XPOLossOutput, logps: Tensor, ref_logps: Tensor, token_logps: Tensor,
                           rollout: RolloutBatch, first_chosen: Tensor) -> None:
        """TRL 1.13's XPO metrics of one micro-batch."""
        mask = rollout.completion_mask
        self.record_mean("loss/dpo", out.dpo_losses)
        self.record_mean("loss/xpo", out.xpo_losses)
        self.record_mean("objective/kl", sequence_logps(token_logps - rollout.ref_per_token_logps, mask))
        self.record_mean("objective/entropy", -logps)
        if self.judge is None:
            scores = rollout.advantages
            self.record_mean("objective/model_scores", scores[0::2])
            self.record_mean("objective/ref_scores", scores[1::2])
            self.record_mean("objective/scores_margin", scores[0::2] - scores[1::2])
        self.record_dpo_rewards(out.chosen_rewards, out.rejected_rewards)
        self.record_mean("logps/chosen", out.chosen_logps + out.chosen_ref_logps)
        self.record_mean("logps/rejected", out.rejected_logps + out.rejected_ref_logps)
        eos = self.contains_eos(rollout).float()
        self.record_mean(self.eos_metric("model_contain_eos_token"), eos[0::2])
        self.record_mean(self.eos_metric("ref_contain_eos_token"), eos[1::2])
        self.record("alpha", out.alpha)
        self.record("beta", out.beta)

