"""Utilities shared by the modules: running moments, accuracy, dropout/dtype/freezing helpers, memory."""

from lightning_llm.utils.memory import empty_cache
from lightning_llm.utils.metrics import compute_accuracy
from lightning_llm.utils.model import (
    disable_dropout_in_model,
    freeze_model_layers,
    get_model_param_count,
    peft_module_casting_to_bf16,
)
from lightning_llm.utils.running_moments import RunningMoments

__all__ = [
    "RunningMoments", "compute_accuracy", "disable_dropout_in_model", "empty_cache", "freeze_model_layers",
    "get_model_param_count", "peft_module_casting_to_bf16",
]
