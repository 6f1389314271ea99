"""Log-prob machinery: :func:`linear_logprobs` (Triton on CUDA, chunked torch elsewhere, eager for reference)."""

from __future__ import annotations

from lightning_llm.ops.logprobs import TokenLogProbs, available_impls, linear_logprobs

__all__ = ["TokenLogProbs", "available_impls", "linear_logprobs"]
