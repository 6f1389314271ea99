"""``SFTModule``: supervised fine-tuning (TRL's ``SFTTrainer``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_llm.losses.sft import SFT_LOSSES, sft_loss
from lightning_llm.modules.base import IGNORE_INDEX, LLMModule, ModelArg, TokenizerArg


class SFTModule(LLMModule):
    """Supervised fine-tuning of a causal LM on the ``labels`` of :class:`~lightning_llm.SFTDataModule` batches.

    The loss of an optimizer step is the summed token loss of all its micro-batches, on all ranks, divided by their
    total number of loss tokens — as if the whole step were one batch, so 8 examples x 1 micro-batch and 1 x 8 with
    gradient accumulation give the same gradient. The token count is only known once the step's last micro-batch has
    run, so micro-batches backpropagate their sums and the gradient is divided in ``on_before_optimizer_step``
    (before clipping). Under DeepSpeed, whose engine owns the gradients, each micro-batch is normalised by its own
    token count instead.

    Logs (TRL names): ``loss``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``, ``learning_rate``; the same
    under ``val/`` on validation.

    Args:
        model: see :class:`~lightning_llm.modules.base.LLMModule`.
        tokenizer: see :class:`~lightning_llm.modules.base.LLMModule`.
        loss_type: ``nll`` (negative log-likelihood) or ``dft`` (Dynamic Fine-Tuning, arXiv:2508.05629).
        average_tokens_across_steps: normalise by the tokens of the whole optimizer step (all micro-batches and
            ranks, as TRL does with ``average_tokens_across_devices``); ``False`` averages each micro-batch alone.
        **kwargs: the other :class:`~lightning_llm.modules.base.LLMModule` arguments (learning_rate, peft_config, ...).
    """

    def __init__(
        self,
        model: ModelArg = "tiny-llama",
        tokenizer: TokenizerArg = None,
        *,
        loss_type: str = "nll",
        average_tokens_across_steps: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if loss_type not in SFT_LOSSES:
            raise ValueError(f"loss_type must be one of {sorted(SFT_LOSSES)}, got {loss_type!r}")
        self.loss_type = loss_type
        self.average_tokens_across_steps = average_tokens_across_steps
        self._step_loss_tokens: Tensor | float = 0.0

    def _normalise_over_step(self) -> bool:
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        return self.average_tokens_across_steps and not strategy.startswith("DeepSpeed")

    def _shared_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = self.token_logprobs(
            self.model, batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"), return_entropy=True, return_is_top1=True,
        )
        mask = batch["labels"][:, 1:] != IGNORE_INDEX  # [B, T-1]
        loss_sum, num_tokens = sft_loss(out.logps, mask, self.loss_type)
        self.record("loss", loss_sum, num_tokens)
        self.record("entropy", torch.where(mask, out.entropy.detach(), 0.0).sum(), num_tokens)
        self.record("mean_token_accuracy", (out.is_top1 & mask).sum(), num_tokens)
        self.count_input_tokens(batch)
        return loss_sum, num_tokens

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss_sum, num_tokens = self._shared_step(batch)
        if self._normalise_over_step():
            self._step_loss_tokens = self._step_loss_tokens + num_tokens.detach()
            return loss_sum
        return loss_sum / num_tokens.clamp(min=1)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._normalise_over_step():
            # Micro-batch losses were sums; Lightning divided each by accumulate_grad_batches and DDP/FSDP averaged
            # over ranks, so this turns the gradient into that of (total loss / total tokens) over the step.
            tokens = self._reduce_sum(torch.as_tensor(self._step_loss_tokens, dtype=torch.float32, device=self.device))
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens.clamp(min=1).item()
            grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)
        self._step_loss_tokens = 0.0
        super().on_before_optimizer_step(optimizer)
