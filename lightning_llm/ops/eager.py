"""The plain full-logits reference: ``log_softmax`` of the whole ``[N, V]`` matrix in fp32, autograd for the rest.

Memory grows with ``N * V``; it exists to test and debug the chunked and Triton paths, never as a default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_llm.kernels.logit_transform import LogitTransform

__all__ = ["eager_linear_logprobs"]


def eager_linear_logprobs(
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    targets: Tensor,  # [N], ignore_index allowed
    valid: Tensor,  # [N] bool, targets != ignore_index
    transform: LogitTransform,
    compute_dtype: torch.dtype,
    want: tuple[bool, bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(logps, entropy, is_top1, mean_logits, log_sum_sq_probs)`` from full logits, zero at ignored rows.

    The head runs in ``compute_dtype`` like a Hugging Face model's ``lm_head`` (so bf16 inputs give bf16 logits),
    then everything after it runs in fp32.
    """
    want_entropy, want_top1, want_mean, want_lss = want
    raw = F.linear(
        hidden.to(compute_dtype), weight.to(compute_dtype), bias.to(compute_dtype) if bias is not None else None
    ).float()  # [N, V]
    z = transform.apply(raw)
    log_p = torch.log_softmax(z, dim=-1)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    zero = torch.zeros((), device=hidden.device)

    logps = torch.where(valid, log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1), zero)
    entropy = torch.where(valid, -(log_p.exp() * log_p).sum(-1), zero) if want_entropy else None
    with torch.no_grad():
        is_top1 = (z.argmax(-1) == targets) & valid if want_top1 else None
        mean_logits = torch.where(valid, z.mean(-1), zero) if want_mean else None
        log_sum_sq = torch.where(valid, torch.logsumexp(2.0 * log_p, dim=-1), zero) if want_lss else None
    return logps, entropy, is_top1, mean_logits, log_sum_sq
