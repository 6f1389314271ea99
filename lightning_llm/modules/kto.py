"""``KTOModule``: Kahneman-Tversky Optimization on unpaired feedback (TRL's ``KTOTrainer``)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from lightning_llm.data.batches import UnpairedBatch
from lightning_llm.losses.kto import KTO_LOSSES, kto_kl_estimate, kto_loss, kto_weight_ranges
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.preference import PreferenceModule

log = logging.getLogger(__name__)


class KTOModule(PreferenceModule):
    """KTO (Ethayarajh et al., 2024, arXiv:2402.01306) on an :class:`~lightning_llm.UnpairedPreferenceDataModule`.

    Desirable completions are pushed above, undesirable ones below, the reference point ``z₀ = KL(π‖π_ref)``,
    estimated (without gradient) on the batch's mismatched (prompt, completion) pairs and averaged over processes.
    ``apo_zero_unpaired`` (APO, arXiv:2408.06266) needs no KL term. When the classes are imbalanced and neither
    class weight is in the range of the paper's Eq. 8, a warning gives the recommended weights.

    Logs (TRL names): ``loss``, ``kl``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected``, ``logits/chosen``, ``logits/rejected``, ``entropy``, ``num_tokens``.

    Args:
        model: see :class:`~lightning_llm.modules.preference.PreferenceModule`.
        tokenizer: see :class:`~lightning_llm.modules.preference.PreferenceModule`.
        loss_type: ``kto`` or ``apo_zero_unpaired``.
        desirable_weight: ``λ_D``, weight of the desirable examples' losses.
        undesirable_weight: ``λ_U``, weight of the undesirable examples' losses.
        learning_rate: TRL's KTO default, 1e-6.
        **kwargs: the :class:`~lightning_llm.modules.preference.PreferenceModule` arguments (beta, ref_model,
            precompute_ref_log_probs, ...) and the :class:`~lightning_llm.modules.base.LLMModule` ones.
    """

    def __init__(self, model: ModelArg, tokenizer: TokenizerArg = None, *, loss_type: str = "kto",
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0, learning_rate: float = 1e-6,
                 **kwargs: Any) -> None:
        super().__init__(model, tokenizer, learning_rate=learning_rate, **kwargs)
        if loss_type not in KTO_LOSSES:
            raise ValueError(f"loss_type must be one of {sorted(KTO_LOSSES)}, got {loss_type!r}")
        if desirable_weight < 0 or undesirable_weight < 0:
            raise ValueError("desirable_weight and undesirable_weight must be >= 0")
        self.loss_type = loss_type
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    @property
    def calculate_kl(self) -> bool:
        return self.loss_type != "apo_zero_unpaired"

    @property
    def reference_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("ref_logps", "ref_kl_logps") if self.calculate_kl else ("ref_logps",)

    def _check_kl_pairs(self, batch: UnpairedBatch) -> None:
        if self.calculate_kl and batch.kl_sequences is None:
            raise ValueError("loss_type='kto' needs the mismatched (prompt, completion) pairs of its KL term: use "
                             "UnpairedPreferenceDataModule(kl_pairs=True) (or loss_type='apo_zero_unpaired')")

    def reference_values(self, batch: UnpairedBatch) -> dict[str, Tensor]:
        self._check_kl_pairs(batch)
        values = {"ref_logps": self.reduce_logps(self.reference_completion_logps(batch.sequences))}
        if self.calculate_kl:
            values["ref_kl_logps"] = self.reduce_logps(self.reference_completion_logps(batch.kl_sequences))
        return values

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.calculate_kl and getattr(datamodule, "batch_size", 2) <= 1:
            # The mismatched completion of a one-example batch is its own completion: z0 would be the reward itself.
            raise ValueError("loss_type='kto' estimates its KL reference point on the other examples of each batch; "
                             "use batch_size > 1 (or loss_type='apo_zero_unpaired')")
        super().on_fit_start()
        counts = datamodule.label_counts() if hasattr(datamodule, "label_counts") else None
        if counts is None:
            return
        num_desirable, num_undesirable = counts
        if not num_desirable or not num_undesirable:
            raise ValueError(f"KTO learns from desirable and undesirable examples together; the training data has "
                             f"{num_desirable} desirable (label true) and {num_undesirable} undesirable (label false) "
                             "rows")
        if num_desirable != num_undesirable:
            ranges = kto_weight_ranges(num_desirable, num_undesirable, self.desirable_weight, self.undesirable_weight)
            if not ranges.contains(self.desirable_weight, self.undesirable_weight):
                log.warning(
                    "The data has %d desirable and %d undesirable examples; with these class weights the paper's "
                    "Eq. 8 recommends EITHER desirable_weight in [%.2f, %.2f] OR undesirable_weight in [%.2f, %.2f] "
                    "(not both).", num_desirable, num_undesirable, *ranges.desirable, *ranges.undesirable,
                )

    def _mean_over_processes(self, value: Tensor) -> Tensor:
        world = self.trainer.world_size if self._trainer is not None else 1
        return self._reduce_sum(value.detach().float()) / world

    def compute_loss(self, batch: UnpairedBatch) -> Tensor:
        self._check_kl_pairs(batch)
        policy = self.completion_logps(self.model, batch.sequences, return_entropy=True, return_mean_logits=True)
        policy_logps = self.reduce_logps(policy)
        precomputed = batch.ref_logps is not None and (batch.ref_kl_logps is not None or not self.calculate_kl)
        ref_logps, ref_kl_logps = batch.ref_logps, batch.ref_kl_logps
        if not precomputed:
            values = self.reference_values(batch)
            ref_logps, ref_kl_logps = values["ref_logps"], values.get("ref_kl_logps")
        kl = None
        if self.calculate_kl:
            with torch.no_grad():
                policy_kl = self.reduce_logps(self.completion_logps(self.model, batch.kl_sequences))
            kl = self._mean_over_processes(kto_kl_estimate(policy_kl, ref_kl_logps))
        out = kto_loss(policy_logps, ref_logps, batch.label, kl, beta=self.beta, loss_type=self.loss_type,
                       desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        self.record("kl", out.kl)
        self.record_unpaired_metrics(policy, batch.label, out.chosen_rewards, out.rejected_rewards)
        return out.losses.nanmean()
