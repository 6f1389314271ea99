"""Shared pieces of the rollout tests (imported as ``rollout_helpers``): prompts, ids, HF's own processors."""

from __future__ import annotations

import torch

from lightning_llm.rollout import SamplingSettings
from lightning_llm.rollout.hf import generation_kwargs

EOS = 2
PAD = 0
#: prompts of different lengths, so that the batch is left-padded
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18, 19, 20, 21, 22]]


def hf_processors(model: torch.nn.Module, settings: SamplingSettings, attention_mask: torch.Tensor):
    """The ``LogitsProcessorList`` that ``generate`` itself builds for ``settings`` (its order, its classes), for a
    batch whose prompt padding is ``attention_mask``."""
    from transformers import GenerationConfig

    config = GenerationConfig(**generation_kwargs(settings), eos_token_id=EOS, pad_token_id=PAD)
    return model._get_logits_processor(generation_config=config, input_ids_seq_length=attention_mask.shape[1],
                                       model_kwargs={"attention_mask": attention_mask}, device="cpu")


def hf_scores(model: torch.nn.Module, settings: SamplingSettings, input_ids: torch.Tensor, logits: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``logits`` ``[B, V]`` processed by HF's processors, given the ids so far ``[B, L]`` (left padding marked by
    ``attention_mask``)."""
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    return hf_processors(model, settings, mask)(input_ids, logits.clone().float())
