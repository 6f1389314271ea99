"""Log-prob machinery: :func:`linear_logprobs` (Triton on CUDA, chunked torch elsewhere, eager for reference) and
:func:`linear_token_loss` (a per-token loss with its gradient computed in the forward)."""

from __future__ import annotations

from lightning_llm.ops.logprobs import TokenLogProbs, available_impls, linear_logprobs
from lightning_llm.ops.token_loss import TokenLoss, linear_token_loss

__all__ = ["TokenLogProbs", "TokenLoss", "available_impls", "linear_logprobs", "linear_token_loss"]
