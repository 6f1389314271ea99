"""``ORPOModule``: Odds Ratio Preference Optimization (TRL's ``ORPOTrainer``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_llm.data.batches import PairBatch
from lightning_llm.losses.orpo import orpo_loss
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.preference import PreferenceModule


class ORPOModule(PreferenceModule):
    """ORPO (Hong et al., 2024, arXiv:2403.07691): SFT and preference alignment in one reference-free loss,
    ``L = L_NLL(chosen) - β log σ(log odds(y_w) - log odds(y_l))`` with odds from the average token log-prob.

    As in TRL, the NLL term covers the whole chosen sequence, prompt tokens included; ``nll_on_prompt=False`` keeps
    it to the completion. Logs ``rewards/*`` (``β`` times the average log-probs), ``logps/*``, ``logits/*``,
    ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``, ``entropy``, ``mean_token_accuracy``.

    Args:
        model: see :class:`~lightning_llm.modules.preference.PreferenceModule`.
        tokenizer: see :class:`~lightning_llm.modules.preference.PreferenceModule`.
        beta: weight ``λ`` of the odds-ratio term (TRL default 0.1).
        nll_on_prompt: include the chosen prompt tokens in the NLL term (TRL's behaviour).
        learning_rate: TRL's ORPO default, 1e-6.
        **kwargs: the :class:`~lightning_llm.modules.base.LLMModule` arguments.
    """

    uses_reference = False

    def __init__(self, model: ModelArg, tokenizer: TokenizerArg = None, *, beta: float = 0.1,
                 nll_on_prompt: bool = True, learning_rate: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, beta=beta, learning_rate=learning_rate, **kwargs)
        self.nll_on_prompt = nll_on_prompt

    def compute_loss(self, batch: PairBatch) -> Tensor:
        policy = self.completion_logps(self.model, batch.sequences, return_entropy=True, return_is_top1=True,
                                       return_mean_logits=True, score_chosen_prompts=self.nll_on_prompt)
        chosen_avg, rejected_avg = policy.means.chunk(2)
        chosen_scored = policy.scored.chunk(2)[0]
        chosen_tokens = policy.token_logps.chunk(2)[0]
        nll = -torch.where(chosen_scored, chosen_tokens, 0.0).sum() / chosen_scored.sum().clamp(min=1)
        out = orpo_loss(chosen_avg, rejected_avg, nll, beta=self.beta)
        self.record_pair_metrics(policy, out.chosen_rewards, out.rejected_rewards, chosen_avg, rejected_avg)
        self.record("nll_loss", out.nll_loss)
        self.record_mean("log_odds_ratio", out.log_odds_ratio)
        self.record_mean("log_odds_chosen", out.log_odds_chosen)
        return out.losses.mean()
