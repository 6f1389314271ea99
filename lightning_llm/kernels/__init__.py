"""Triton kernels behind :func:`lightning_llm.ops.linear_logprobs`, each with a torch reference.

Importing this package does not import Triton; the kernel modules load on first use.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from lightning_llm._lazy import lazy_exports

__all__ = ["triton_available", "triton_runs_on", "TritonLinearLogProbs", "TritonRowScorer", "default_token_rows"]

# public name -> module that defines it, loaded on first access (they import triton)
_LAZY: dict[str, str] = {
    "TritonLinearLogProbs": "lightning_llm.kernels.linear_logprobs",
    "default_token_rows": "lightning_llm.kernels.linear_logprobs",
    "TritonRowScorer": "lightning_llm.kernels.linear_logprobs",
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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

