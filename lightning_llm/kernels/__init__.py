"""Triton kernels behind :func:`lightning_llm.ops.linear_logprobs`, each with a torch reference.

Importing this package does not import Triton; the kernel modules load on first use.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

__all__ = ["triton_available", "triton_runs_on", "TritonLinearLogProbs", "default_token_rows"]

# public name -> module that defines it, loaded on first access (they import triton)
_LAZY: dict[str, str] = {
    "TritonLinearLogProbs": "lightning_llm.kernels.linear_logprobs",
    "default_token_rows": "lightning_llm.kernels.linear_logprobs",
}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``import triton`` works in this process."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def __getattr__(name: str) -> Any:
    module_path = _LAZY.get(name)
    if module_path is None:
        raise AttributeError(f"module 'lightning_llm.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_path), name)
    globals()[name] = value
    return value
