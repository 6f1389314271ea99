"""Supervised fine-tuning losses on per-token log-probs.

``nll``: the negative log-likelihood ``-log p(y_t)``.
``dft``: Dynamic Fine-Tuning (Wu et al., 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective
with Reward Rectification", arXiv:2508.05629): each token's NLL is weighted by its own (detached) probability,
``-sg(p(y_t)) * log p(y_t)``, which rescales the SFT gradient the way an on-policy reward would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


def nll_token_loss(logps: Tensor) -> Tensor:
    """``-log p`` per token."""
    return -logps


def dft_token_loss(logps: Tensor) -> Tensor:
    """``-sg(p) * log p`` per token (DFT)."""
    return -logps.detach().exp() * logps


SFT_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {"nll": nll_token_loss, "dft": dft_token_loss}


class SFTLoss(NamedTuple):
    """``loss_sum``: summed token loss (differentiable); ``num_tokens``: tokens in the sum. The mean over an
    optimizer step is ``sum(loss_sum) / sum(num_tokens)`` over its micro-batches and ranks."""

    loss_sum: Tensor
    num_tokens: Tensor


def sft_loss(logps: Tensor, loss_mask: Tensor, loss_type: str = "nll") -> SFTLoss:
    """Summed SFT loss over the tokens where ``loss_mask`` is true.

    Args:
        logps: ``[B, T]`` log-probs of the target tokens.
        loss_mask: ``[B, T]`` bool, the tokens that count.
        loss_type: ``nll`` or ``dft``.
    """
    if loss_type not in SFT_LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(SFT_LOSSES)}, got {loss_type!r}")
    if logps.shape != loss_mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    per_token = SFT_LOSSES[loss_type](logps.float())
    mask = loss_mask.bool()
    return SFTLoss(loss_sum=torch.where(mask, per_token, 0.0).sum(), num_tokens=mask.sum())
