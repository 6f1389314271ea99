"""Helpers shared by the loss families."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32: bf16/fp16 log-probs lose the small differences preference losses are made of."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
