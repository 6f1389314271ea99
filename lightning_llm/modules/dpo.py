"""``DPOModule``: Direct Preference Optimization and every TRL 1.16 DPO variant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lightning_llm.data.batches import PairBatch
from lightning_llm.losses.dpo import check_dpo_arguments, dpo_loss, dpo_sft_loss, ld_dpo_logps, wpo_weights
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.preference import CompletionLogps, PreferenceModule


class DPOModule(PreferenceModule):
    """DPO (Rafailov et al., 2023, arXiv:2305.18290) on a :class:`~lightning_llm.PreferenceDataModule`.

    ``loss = Σ_k w_k · DPO_LOSSES[loss_type[k]]`` of the policy/reference log-ratios of the chosen and rejected
    completions (see :func:`lightning_llm.losses.dpo.dpo_loss` for every variant's formula and paper).

    Logs TRL's metrics: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``logits/chosen``, ``logits/rejected``, ``entropy``,
    ``mean_token_accuracy``, ``num_tokens`` (and ``val/...``).

    Args:
        model: see :class:`~lightning_llm.modules.preference.PreferenceModule`.
        tokenizer: see :class:`~lightning_llm.modules.preference.PreferenceModule`.
        loss_type: one of sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired,
            apo_zero, apo_down, discopop, sft, sigmoid_norm; or a list of them combined with ``loss_weights``.
        loss_weights: weight of each loss type (default 1.0 each).
        label_smoothing: label-noise ε for robust / exo_pair / aot (conservative DPO).
        f_divergence_type: reverse_kl (DPO), forward_kl, js_divergence or alpha_divergence (f-DPO).
        f_alpha_divergence_coef: α of the alpha divergence.
        discopop_tau: τ of the DiscoPOP mixing.
        ld_alpha: LD-DPO (arXiv:2409.06411): weight of the tokens past the shorter completion's length (None = off).
        use_weighting: WPO (arXiv:2406.11827): weight pairs by their length-normalised policy probability.
        learning_rate: TRL's DPO default, 1e-6.
        **kwargs: the :class:`~lightning_llm.modules.preference.PreferenceModule` arguments (beta, ref_model,
            precompute_ref_log_probs, sync_ref_model, ...) and the :class:`~lightning_llm.modules.base.LLMModule` ones.
    """

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        loss_type: str | Sequence[str] = "sigmoid",
        loss_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        learning_rate: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, tokenizer, learning_rate=learning_rate, **kwargs)
        loss_types = check_dpo_arguments(loss_type, loss_weights, self.beta, label_smoothing, f_divergence_type,
                                         discopop_tau)
        if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
        # WPO weights on sorted losses: refused by the loss at the first step; here before training, as in TRL
        sorting = sorted({"aot", "aot_unpaired"} & set(loss_types))
        if use_weighting and sorting:
            raise ValueError(f"use_weighting (WPO) cannot be combined with {sorting}: those losses sort the batch, so "
                             "per-pair weights would not line up with pairs")
        self.loss_types = loss_types
        self.loss_weights = list(loss_weights) if loss_weights is not None else None
        self.label_smoothing = label_smoothing
        self.f_divergence_type = f_divergence_type
        self.f_alpha_divergence_coef = f_alpha_divergence_coef
        self.discopop_tau = discopop_tau
        self.ld_alpha = ld_alpha
        self.use_weighting = use_weighting

    def reduce_logps(self, logps: CompletionLogps) -> Tensor:
        if self.ld_alpha is None:
            return logps.sums
        return ld_dpo_logps(logps.token_logps, logps.mask, self.ld_alpha)

    def compute_loss(self, batch: PairBatch) -> Tensor:
        policy = self.completion_logps(
            self.model, batch.sequences, return_entropy=True, return_is_top1=True, return_mean_logits=True,
            return_log_sum_sq_probs=self.use_weighting,
        )
        chosen_logps, rejected_logps = self.reduce_logps(policy).chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch).chunk(2)
        chosen_lengths, rejected_lengths = policy.lengths.chunk(2)
        sft = None
        if "sft" in self.loss_types:
            chosen_tokens, _ = policy.token_logps.chunk(2)
            sft = dpo_sft_loss(chosen_tokens, policy.mask.chunk(2)[0])
        weights = None
        if self.use_weighting:
            weights = wpo_weights(policy.token_logps, policy.outputs.log_sum_sq_probs, policy.mask)
        out = dpo_loss(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_types,
            loss_weights=self.loss_weights, label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.discopop_tau, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            sft_loss=sft, weights=weights,
        )
        self.record_pair_metrics(policy, out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps)
        return out.losses.mean()
