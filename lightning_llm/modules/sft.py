"""``SFTModule``: supervised fine-tuning (TRL's ``SFTTrainer``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_llm.data.batches import IGNORE_INDEX, LMBatch
from lightning_llm.losses.sft import SFT_LOSSES, sft_loss
from lightning_llm.modules.base import LLMModule, ModelArg, TokenizerArg


class SFTModule(LLMModule):
    """Supervised fine-tuning of a causal LM on the ``labels`` of :class:`~lightning_llm.SFTDataModule` batches.

    The loss of an optimizer step is the token mean over all its micro-batches and ranks (see
    ``average_tokens_across_steps`` in :class:`~lightning_llm.modules.base.LLMModule`).

    Logs (TRL names): ``loss``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``, ``learning_rate``; the same
    under ``val/`` on validation.

    Args:
        model: see :class:`~lightning_llm.modules.base.LLMModule`.
        tokenizer: see :class:`~lightning_llm.modules.base.LLMModule`.
        loss_type: ``nll`` (negative log-likelihood) or ``dft`` (Dynamic Fine-Tuning, arXiv:2508.05629).
        fuse_loss: compute the token loss's head gradient during the forward (:meth:`token_loss`, a quarter fewer
            head FLOPs); ``None`` does so where the log-prob path is the chunked torch one, ``True``/``False`` force
            it. The loss, metrics and gradients are the same either way up to float rounding.
        **kwargs: the other :class:`~lightning_llm.modules.base.LLMModule` arguments (learning_rate, peft_config, ...).
    """

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        loss_type: str = "nll",
        fuse_loss: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if loss_type not in SFT_LOSSES:
            raise ValueError(f"loss_type must be one of {sorted(SFT_LOSSES)}, got {loss_type!r}")
        self.loss_type = loss_type
        self.fuse_loss = fuse_loss

    def _shared_step(self, batch: LMBatch) -> tuple[Tensor, Tensor]:
        inputs = dict(
            attention_mask=batch.attention_mask, position_ids=batch.position_ids, return_entropy=True,
            return_is_top1=True,
        )
        mask = batch.labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
        if self.fuses_token_loss(self.fuse_loss, batch.input_ids.device):
            token_loss = SFT_LOSSES[self.loss_type]
            out = self.token_loss(
                self.model, batch.input_ids, batch.labels, lambda logps, entropy: token_loss(logps), **inputs
            )
            loss_sum, num_tokens = out.loss, mask.sum()
        else:
            out = self.token_logprobs(self.model, batch.input_ids, batch.labels, **inputs)
            loss_sum, num_tokens = sft_loss(out.logps, mask, self.loss_type)
        self.record("loss", loss_sum, num_tokens)
        self.record("entropy", torch.where(mask, out.entropy.detach(), 0.0).sum(), num_tokens)
        self.record("mean_token_accuracy", (out.is_top1 & mask).sum(), num_tokens)
        self.count_input_tokens(batch)
        return loss_sum, num_tokens

    def training_step(self, batch: LMBatch, batch_idx: int) -> Tensor:
        return self.step_token_mean(*self._shared_step(batch))

    def validation_step(self, batch: LMBatch, batch_idx: int) -> None:
        self._shared_step(batch)
