"""The pieces of a causal LM that the log-prob path needs: backbone, LM head, and the head's logit transform.

Every algorithm scores tokens by running the backbone to the final hidden states and projecting them through the LM
head in chunks (``lightning_llm.ops.linear_logprobs``), never through the model's own ``forward`` (which would build
the full ``[batch, seq, vocab]`` logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class OutputScaling:
    """``logits = softcap * tanh(logit_scale * (h @ W.T) / softcap)`` (softcap optional), as the model computes them."""

    logit_scale: float = 1.0
    softcap: float | None = None


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The ``transformers`` model under PEFT / ``torch.compile`` wrappers (LoRA layers stay injected in it)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DeepSpeed engines
            model = model.module
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"Expected a transformers PreTrainedModel (possibly wrapped), got {type(model).__name__}")
    return model


def output_scaling(config) -> OutputScaling:
    """Read the output-logit scaling the architecture applies after the LM head from its config.

    Gemma 2/3 soft-cap (``final_logit_softcapping``); Cohere multiplies by ``logit_scale``; Falcon-H1 by
    ``lm_head_multiplier``; Granite and MiniCPM3 divide by ``logits_scaling`` (HyperCLOVA X multiplies by it).
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        divisor = text_config.logits_scaling
        scale = divisor if getattr(text_config, "model_type", "") == "hyperclovax" else 1.0 / divisor
    return OutputScaling(logit_scale=1.0 if scale is None else float(scale), softcap=softcap)


@dataclass
class CausalLMParts:
    """Backbone (returns ``last_hidden_state``), LM head, and its logit transform."""

    backbone: nn.Module
    lm_head: nn.Module
    scaling: OutputScaling

    def head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight and bias as plain tensors (FSDP2 DTensors are gathered, differentiably)."""
        weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        if hasattr(weight, "full_tensor"):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        return weight, bias


def causal_lm_parts(model: nn.Module) -> CausalLMParts:
    """Split a (possibly PEFT-wrapped) causal LM into backbone, head and logit transform."""
    hf_model = unwrap_model(model)
    backbone = hf_model.base_model
    lm_head = hf_model.get_output_embeddings()
    if backbone is hf_model or lm_head is None:
        raise ValueError(f"{type(hf_model).__name__} is not a causal LM with a separate backbone and LM head")
    return CausalLMParts(backbone=backbone, lm_head=lm_head, scaling=output_scaling(hf_model.config))
