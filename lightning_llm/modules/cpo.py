"""``CPOModule``: Contrastive Preference Optimization, SimPO and AlphaPO (TRL's ``CPOTrainer``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_llm.data.batches import PairBatch
from lightning_llm.losses.cpo import CPO_AVERAGE_LOGPS_LOSS_TYPES, CPO_LOSSES, cpo_loss
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.preference import PreferenceModule


class CPOModule(PreferenceModule):
    """CPO (Xu et al., 2024, arXiv:2401.08417) and its reference-free relatives:
    ``L = ℓ(β (r(y_w) - r(y_l))) + cpo_alpha · L_NLL(chosen completion)``.

    ``loss_type``: ``sigmoid`` / ``hinge`` / ``ipo`` on summed log-probs (``ipo`` averaged); ``simpo`` (SimPO, Meng et
    al., 2024, arXiv:2405.14734: average log-probs and a target margin ``simpo_gamma``; set ``cpo_alpha=0`` for pure
    SimPO); ``alphapo`` (AlphaPO, arXiv:2501.03884: the reward shape ``alpha``). Logs ``rewards/*``, ``logps/*``,
    ``logits/*``, ``nll_loss``, ``entropy``, ``mean_token_accuracy``.

    Args:
        model: see :class:`~lightning_llm.modules.preference.PreferenceModule`.
        tokenizer: see :class:`~lightning_llm.modules.preference.PreferenceModule`.
        beta: reward temperature (TRL default 0.1).
        loss_type: sigmoid, hinge, ipo, simpo or alphapo.
        label_smoothing: conservative label noise ε in [0, 0.5].
        simpo_gamma: SimPO target reward margin.
        alpha: AlphaPO reward-shape parameter (0 = log-prob rewards).
        cpo_alpha: weight of the NLL term on the chosen completions.
        learning_rate: TRL's CPO default, 1e-6.
        **kwargs: the :class:`~lightning_llm.modules.base.LLMModule` arguments.
    """

    uses_reference = False

    def __init__(self, model: ModelArg, tokenizer: TokenizerArg = None, *, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                 alpha: float = 0.0, cpo_alpha: float = 1.0, learning_rate: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, beta=beta, learning_rate=learning_rate, **kwargs)
        if loss_type not in CPO_LOSSES:
            raise ValueError(f"loss_type must be one of {sorted(CPO_LOSSES)}, got {loss_type!r}")
        if not 0.0 <= label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
        if cpo_alpha < 0:
            raise ValueError(f"cpo_alpha must be >= 0, got {cpo_alpha}")
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.simpo_gamma = simpo_gamma
        self.alpha = alpha
        self.cpo_alpha = cpo_alpha

    def compute_loss(self, batch: PairBatch) -> Tensor:
        policy = self.completion_logps(self.model, batch.sequences, return_entropy=True, return_is_top1=True,
                                       return_mean_logits=True)
        sequence = policy.means if self.loss_type in CPO_AVERAGE_LOGPS_LOSS_TYPES else policy.sums
        chosen_logps, rejected_logps = sequence.chunk(2)
        chosen_mask = policy.mask.chunk(2)[0]
        chosen_tokens = policy.completion_token_logps.chunk(2)[0]
        nll = -chosen_tokens.sum() / chosen_mask.sum().clamp(min=1)
        out = cpo_loss(chosen_logps, rejected_logps, nll, beta=self.beta, loss_type=self.loss_type,
                       label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma, alpha=self.alpha,
                       cpo_alpha=self.cpo_alpha)
        self.record_pair_metrics(policy, out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps)
        self.record("nll_loss", out.nll_loss)
        return out.losses.mean()
