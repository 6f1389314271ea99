"""Model loading (hub id, local directory, tiny offline preset, or object), PEFT, and the LM-head parts."""

from lightning_llm.models.loading import load_model, load_tokenizer, model_name, model_spec
from lightning_llm.models.parts import CausalLMParts, OutputScaling, causal_lm_parts, output_scaling, unwrap_model
from lightning_llm.models.peft import apply_peft, disabled_adapters, is_peft_model
from lightning_llm.models.presets import PRESETS, is_preset, tiny_config, tiny_model, tiny_tokenizer

__all__ = [
    "PRESETS", "CausalLMParts", "OutputScaling", "apply_peft", "causal_lm_parts", "disabled_adapters", "is_peft_model",
    "is_preset", "load_model", "load_tokenizer", "model_name", "model_spec", "output_scaling", "tiny_config",
    "tiny_model", "tiny_tokenizer", "unwrap_model",
]
