"""Tiny offline model presets: random-init models built from a config, with the shipped tiny tokenizer.

They exist so that the demo and the tests run on a laptop CPU with no model hub: a few hundred thousand parameters,
the vocabulary of ``lightning_llm/assets/tokenizer``. The weights are drawn from a fixed seed, so ``"tiny-llama"``
is the same model in every process (the DDP tests and the TRL parity tests rely on that).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import (
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from lightning_llm.assets import TOKENIZER_DIR

PRESET_SEED = 1234


def _llama(vocab_size: int, eos: int, pad: int) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=eos,
        pad_token_id=pad, bos_token_id=None,
    )


def _qwen2(vocab_size: int, eos: int, pad: int) -> PretrainedConfig:
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=eos,
        pad_token_id=pad, bos_token_id=None,
    )


def _gpt2(vocab_size: int, eos: int, pad: int) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512, eos_token_id=eos,
        pad_token_id=pad, bos_token_id=eos,
    )


PRESETS: dict[str, Callable[[int, int, int], PretrainedConfig]] = {
    "tiny-llama": _llama,  # untied head, GQA
    "tiny-qwen2": _qwen2,  # tied embeddings, attention biases
    "tiny-gpt2": _gpt2,  # learned absolute positions, tied embeddings
}


def is_preset(name: Any) -> bool:
    """Whether ``name`` names one of the tiny offline presets."""
    return isinstance(name, str) and name in PRESETS


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The shipped byte-level BPE tokenizer (ChatML template with ``{% generation %}`` markers)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def tiny_config(name: str = "tiny-llama", **overrides: Any) -> PretrainedConfig:
    """The config of preset ``name``, sized to the tiny tokenizer; ``overrides`` set config attributes."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    tokenizer = tiny_tokenizer()
    config = PRESETS[name](len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(
    name: str = "tiny-llama",
    task: str = "causal_lm",
    seed: int = PRESET_SEED,
    dtype: torch.dtype | None = None,
    **config_overrides: Any,
) -> torch.nn.Module:
    """Build preset ``name`` with random weights drawn from ``seed`` (global RNG state is left untouched).

    Args:
        name: one of ``tiny-llama``, ``tiny-qwen2``, ``tiny-gpt2``.
        task: ``causal_lm``, ``sequence_classification`` (reward models) or ``token_classification`` (PRMs).
        seed: seed of the weight initialisation.
        dtype: parameter dtype (default float32).
        config_overrides: config attributes to set, e.g. ``num_labels=2`` or ``attn_implementation="eager"``.
    """
    from lightning_llm.models.loading import auto_class

    config = tiny_config(name, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class(task).from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    model.config._name_or_path = name  # so that the tokenizer can be found from the model object
    return model
