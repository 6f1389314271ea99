"""Float64 full-logits reference for the log-prob tests (ops and kernels), written independently of the package."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reference_outputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> dict[str, Tensor]:
    """Every per-token output of ``linear_logprobs`` in float64 (differentiable in the inputs' own graph)."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    zero = torch.zeros((), dtype=torch.float64, device=hidden.device)
    target_logp = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return {
        "logps": torch.where(valid, target_logp, zero),
        "entropy": torch.where(valid, -(log_probs.exp() * log_probs).sum(-1), zero),
        "is_top1": (logits.argmax(-1) == targets) & valid,
        "mean_logits": torch.where(valid, logits.mean(-1), zero),
        "log_sum_sq_probs": torch.where(valid, torch.log((log_probs.exp() ** 2).sum(-1)), zero),
    }


def reference_grads(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    grad_logps: Tensor | None,
    grad_entropy: Tensor | None,
    *,
    bias: Tensor | None = None,
    **options,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Float64 gradients of ``sum(grad_logps * logps + grad_entropy * entropy)`` for hidden, weight, bias."""
    leaves = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    if bias is not None:
        leaves.append(bias.detach().double().requires_grad_())
    out = reference_outputs(leaves[0], leaves[1], targets, bias=leaves[2] if bias is not None else None, **options)
    objective = torch.zeros((), dtype=torch.float64, device=hidden.device)
    if grad_logps is not None:
        objective = objective + (grad_logps.double() * out["logps"]).sum()
    if grad_entropy is not None:
        objective = objective + (grad_entropy.double() * out["entropy"]).sum()
    grads = torch.autograd.grad(objective, leaves)
    return grads[0], grads[1], grads[2] if bias is not None else None


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|``: error relative to the tensor's scale."""
    scale = expected.double().abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / max(scale, math.ulp(1.0))
