"""Where the Triton tests run: CUDA when present, else CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_llm.kernels import triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

requires_triton = pytest.mark.skipif(
    not triton_runs_on(DEVICE), reason="Triton cannot run here (no triton, or CPU without TRITON_INTERPRET=1)"
)
