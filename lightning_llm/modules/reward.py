"""``RewardModule``: outcome reward models trained on preference pairs (TRL's ``RewardTrainer``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy
from transformers import PreTrainedModel

from lightning_llm.data.batches import CompletionBatch, PairBatch
from lightning_llm.losses.reward import reward_loss
from lightning_llm.models.loading import load_model
from lightning_llm.modules.base import LLMModule, ModelArg, TokenizerArg

#: the pairwise reward losses (Bradley-Terry "ranking", :func:`~lightning_llm.losses.reward.reward_loss`)
LOSS_TYPES = ("ranking",)


class RewardModule(LLMModule):
    """A sequence classifier with one output scored on each chosen and rejected sequence of a
    :class:`~lightning_llm.PreferenceDataModule` batch, trained with ``-log σ(r_w - r_l - margin)`` (Bradley-Terry;
    the data's ``margin`` column, else the ``margin`` argument, else 0) plus
    ``center_rewards_coefficient · (r_w + r_l)²``.

    A causal-LM checkpoint (e.g. an SFT model, or a preset) gets a freshly initialised one-output score head. The
    reward of a sequence is the head's output at its last non-padding token.

    Logs (TRL names): ``loss``, ``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``,
    ``num_tokens``; ``val/accuracy`` is a torchmetrics ``BinaryAccuracy`` of ``σ(r_w - r_l)`` against "chosen wins".

    Args:
        model: see :class:`~lightning_llm.modules.base.LLMModule`; a causal LM or a sequence classifier.
        tokenizer: see :class:`~lightning_llm.modules.base.LLMModule`.
        center_rewards_coefficient: weight of the reward-centring term (Eisenstein et al., 2023); None = off.
        loss_type: the pairwise loss; ``"ranking"`` (Bradley-Terry, TRL's reward loss) is the one there is.
        margin: the reward gap asked of every pair whose data has no ``margin`` column (a row's own margin wins);
            None = no margin.
        learning_rate: TRL's reward default, 1e-4.
        disable_dropout: set every dropout probability of the model to zero, as TRL's ``RewardConfig`` does by
            default (the rewards of a pair are then compared under one and the same function).
        **kwargs: the other :class:`~lightning_llm.modules.base.LLMModule` arguments (peft_config, ...).
    """

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        center_rewards_coefficient: float | None = None,
        loss_type: str = "ranking",
        margin: float | None = None,
        learning_rate: float = 1e-4,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(model, PreTrainedModel) and getattr(model.config, "num_labels", None) != 1 \
                and "SequenceClassification" not in type(model).__name__:
            raise ValueError(
                "RewardModule needs a sequence classifier with one output; pass the causal LM's path or hub id "
                "instead of the model object, and the score head is added when loading"
            )
        super().__init__(model, tokenizer, learning_rate=learning_rate, disable_dropout=disable_dropout, **kwargs)
        if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not math.isfinite(margin)):
            raise ValueError(f"margin must be a finite number or None, got {margin!r}")
        self.center_rewards_coefficient = center_rewards_coefficient
        self.loss_type = loss_type
        self.margin = None if margin is None else float(margin)
        self.val_accuracy = BinaryAccuracy()

    @property
    def model_task(self) -> str:
        return "sequence_classification"

    def build_model(self) -> PreTrainedModel:
        kwargs = dict(self.model_load_kwargs)
        return load_model(self.model_source, task="sequence_classification", num_labels=1, **kwargs)

    def rewards(self, sequences: CompletionBatch, model: nn.Module | None = None) -> Tensor:
        """``[R]`` scalar reward of every sequence of a padded batch."""
        if sequences.attention_mask is None:
            raise ValueError("RewardModule needs padded batches (PreferenceDataModule(padding_free=False))")
        model = model if model is not None else self.model
        out = model(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask, use_cache=False)
        return out.logits.squeeze(-1).float()

    def _gathered(self, values: Tensor) -> Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.all_gather(values).reshape(-1)
        return values

    def _step(self, batch: PairBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        chosen, rejected = self.rewards(batch.sequences).chunk(2)
        margin = batch.margin
        if margin is None and self.margin is not None:
            margin = torch.full_like(chosen, self.margin)
        out = reward_loss(chosen, rejected, margin=margin,
                          center_rewards_coefficient=self.center_rewards_coefficient)
        loss = out.losses.mean()
        self.record("loss", loss)
        self.record_mean("margin", out.margins)
        everything = self._gathered(out.rewards)
        self.record("min_reward", everything.min())
        self.record("max_reward", everything.max())
        self.record_mean("mean_reward", out.rewards)
        return loss, chosen.detach(), rejected.detach(), out.accuracies

    def training_step(self, batch: PairBatch, batch_idx: int) -> Tensor:
        loss, _, _, accuracies = self._step(batch)
        self.record_mean("accuracy", accuracies)
        self.count_input_tokens(batch)
        return loss

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        _, chosen, rejected, _ = self._step(batch)
        self.val_accuracy.update(torch.sigmoid(chosen - rejected), torch.ones_like(chosen, dtype=torch.long))
        self.log(f"{self.mode}/accuracy", self.val_accuracy, on_step=False, on_epoch=True)

    @torch.no_grad()
    def score(self, prompts: list, completions: list, batch_size: int = 16) -> list[float]:
        """Rewards of ``(prompt, completion)`` pairs (strings, or conversations rendered with the chat template).

        Sequences are built as in training: a string completion gets EOS appended unless it ends with it (a
        conversation ends with the template's end-of-turn token), so the head reads the token it was trained on.
        """
        from lightning_llm.data.chat import render_ids, text_ids
        from lightning_llm.data.collate import collate_completions

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        model = self.ensure_model()
        tok = self.tokenizer
        seqs = []
        for prompt, completion in zip(prompts, completions):
            if isinstance(prompt, str):
                if tok.eos_token and not completion.endswith(tok.eos_token):
                    completion = completion + tok.eos_token
                seqs.append(text_ids(tok, prompt + completion))
            else:
                completion = completion if isinstance(completion, list) else [
                    {"role": "assistant", "content": completion}]
                seqs.append(render_ids(tok, list(prompt) + list(completion)))
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        scores: list[float] = []
        try:
            for start in range(0, len(seqs), batch_size):
                chunk = seqs[start: start + batch_size]
                sequences = collate_completions(chunk, [[1] * len(s) for s in chunk], tok.pad_token_id).to(device)
                scores += self.rewards(sequences, model).tolist()
        finally:
            model.train(was_training)
        return scores
