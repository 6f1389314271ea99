"""Fixtures of the rollout tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """The tiny llama with its head scaled up: greedy decoding has no near-ties, sampling is not near-uniform."""
    from helpers import sharp_reference_model

    return sharp_reference_model().eval()
