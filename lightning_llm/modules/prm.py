"""``PRMModule``: process reward models, a token classifier scoring each reasoning step (TRL's ``PRMTrainer``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedModel

from lightning_llm.data.batches import IGNORE_INDEX, StepBatch
from lightning_llm.losses.prm import prm_loss
from lightning_llm.models.loading import load_model
from lightning_llm.models.parts import unwrap_model
from lightning_llm.modules.base import LLMModule, ModelArg, TokenizerArg

#: classes of a step: 0 = incorrect, 1 = correct
NUM_STEP_CLASSES = 2


class PRMModule(LLMModule):
    """Train a process reward model on :class:`~lightning_llm.StepwiseDataModule` batches.

    The model is a token classifier with two classes (``AutoModelForTokenClassification``; a causal-LM checkpoint gets
    a fresh classification head). The loss is the cross-entropy of :func:`~lightning_llm.losses.prm.prm_loss` on the
    labelled tokens: the last token of each step (Uesato et al., 2022, https://huggingface.co/papers/2211.14275).

    The loss of an optimizer step is the summed cross-entropy of all its micro-batches, on all ranks, divided by their
    total number of labelled tokens, which is how ``transformers.Trainer`` (so TRL) normalises it (see
    ``average_tokens_across_steps`` in :class:`~lightning_llm.modules.base.LLMModule`).

    Logs (TRL names): ``loss``, ``accuracy`` (fraction of labelled tokens whose arg-max class is the label),
    ``num_tokens``, ``learning_rate``; ``val/loss`` and ``val/accuracy`` on validation (token-weighted over the whole
    validation set, as TRL's ``compute_accuracy``).

    Args:
        model: hub id, local directory, tiny preset or a ``PreTrainedModel`` (then a ``...ForTokenClassification``
            with two labels); see :class:`~lightning_llm.modules.base.LLMModule`.
        tokenizer: see :class:`~lightning_llm.modules.base.LLMModule`.
        learning_rate: peak learning rate of the default AdamW (TRL's ``PRMConfig`` default).
        disable_dropout: set every dropout probability of the model to zero, as TRL does by default (the fresh
            classification head has a dropout of 0.1 otherwise).
        **kwargs: the other :class:`~lightning_llm.modules.base.LLMModule` arguments (peft_config, optimizer, ...).
    """

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        learning_rate: float = 1e-5,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, tokenizer, learning_rate=learning_rate, disable_dropout=disable_dropout, **kwargs)

    # ------------------------------------------------------------------------------------------------- the model
    @property
    def model_task(self) -> str:
        return "token_classification"

    def build_model(self) -> PreTrainedModel:
        """Load a two-class token classifier (a classification head is added to a causal-LM checkpoint)."""
        return load_model(self.model_source, task=self.model_task, num_labels=NUM_STEP_CLASSES,
                          **self.model_load_kwargs)

    def configure_model(self) -> None:
        super().configure_model()
        check_step_classifier(self.model)

    def step_logits(self, batch: StepBatch) -> Tensor:
        """Per-token class scores ``[B, T, 2]`` of ``batch``."""
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    # ----------------------------------------------------------------------------------------------- the steps
    def _shared_step(self, batch: StepBatch) -> tuple[Tensor, Tensor]:
        """Summed cross-entropy over the labelled tokens of ``batch``, and their number; records the metrics."""
        # num_items_in_batch=1 turns prm_loss's mean into the plain sum, which the step normalises later.
        out = prm_loss(self.step_logits(batch), batch.labels, ignore_index=IGNORE_INDEX, num_items_in_batch=1)
        num_labelled = out.num_labeled.float()
        self.record("loss", out.loss.detach(), num_labelled)
        self.record("accuracy", out.accuracy * num_labelled, num_labelled)
        self.count_input_tokens(batch)
        return out.loss, num_labelled

    def training_step(self, batch: StepBatch, batch_idx: int) -> Tensor:
        return self.step_token_mean(*self._shared_step(batch))

    def validation_step(self, batch: StepBatch, batch_idx: int) -> None:
        self._shared_step(batch)


def check_step_classifier(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` (possibly PEFT-wrapped) is a token classifier with two labels."""
    base = unwrap_model(model)
    if not type(base).__name__.endswith("ForTokenClassification"):
        raise ValueError(
            f"PRMModule needs a token-classification model (AutoModelForTokenClassification), got "
            f"{type(base).__name__}; pass a hub id or path instead and the classification head is added"
        )
    if base.config.num_labels != NUM_STEP_CLASSES:
        raise ValueError(
            f"PRMModule needs a token classifier with num_labels={NUM_STEP_CLASSES} (incorrect / correct step), got "
            f"num_labels={base.config.num_labels}"
        )
