"""Chunked torch log-probs of ``hidden @ weight.T``: the CPU path and the fallback wherever Triton is missing.

Tokens are processed ``chunk_rows`` at a time, each chunk holding its full ``[chunk_rows, V]`` row of fp32
logits, so peak memory is bounded by the chunk, not by the batch. The backward recomputes each chunk's logits
instead of storing them (gradient checkpointing of the head, as in Liger-Kernel's fused linear cross-entropy,
Hsu et al. 2024) and accumulates the weight gradient in fp32 across chunks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_llm.kernels.logit_transform import LogitTransform, addmm_f32_, matmul_f32, mm_operand

__all__ = ["ChunkedLinearLogProbs", "ChunkedRowScorer", "full_row_stats", "logits_grad", "default_chunk_rows",
           "LOGITS_BUDGET"]

# fp32 logits elements per chunk (64 MiB); a few temporaries of that size live at once
LOGITS_BUDGET = 1 << 24


def default_chunk_rows(vocab_size: int, budget: int = LOGITS_BUDGET) -> int:
    """Token rows per chunk so that one ``[rows, vocab_size]`` fp32 chunk holds at most ``budget`` elements."""
    return max(1, budget // max(1, vocab_size))


def full_row_stats(
    z: Tensor,  # [n, V] fp32, transformed logits
    targets: Tensor,  # [n] int64 in [0, V)
    *,
    entropy: bool,
    is_top1: bool,
    mean_logits: bool,
    log_sum_sq_probs: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Softmax statistics of complete logit rows.

    With ``log p = z - logsumexp(z)``: the target log-prob ``log p_t``; the entropy ``-sum_j p_j log p_j``;
    whether ``argmax_j z_j == t`` (first maximum wins); ``mean_j z_j``; ``log sum_j p_j^2 = logsumexp(2 log p)``.
    Returns ``(log_z, logps, entropy, is_top1, mean_logits, log_sum_sq_probs)``, the unrequested ones ``None``.
    """
    log_z = torch.logsumexp(z, dim=-1)
    logps = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    ent = top1 = mean = lss = None
    if entropy or log_sum_sq_probs:
        log_p = z - log_z.unsqueeze(-1)
        if entropy:
            ent = -(log_p.exp() * log_p).sum(-1)
        if log_sum_sq_probs:
            lss = torch.logsumexp(2.0 * log_p, dim=-1)
    if is_top1:
        top1 = z.argmax(dim=-1) == targets
    if mean_logits:
        mean = z.mean(dim=-1)
    return log_z, logps, ent, top1, mean, lss


def logits_grad(
    z: Tensor,  # [n, V] fp32, transformed logits
    targets: Tensor,  # [n]
    log_z: Tensor,  # [n]
    entropy: Tensor | None,  # [n]
    grad_logps: Tensor | None,  # [n] fp32
    grad_entropy: Tensor | None,  # [n] fp32
) -> Tensor:
    """``dL/dz`` for upstream gradients on the target log-prob and the entropy.

    ``d log p_t / dz_j = 1[j = t] - p_j`` and ``d H / dz_j = -p_j (log p_j + H)``.
    """
    log_p = z - log_z.unsqueeze(-1)
    probs = log_p.exp()
    grad = torch.zeros_like(z)
    if grad_logps is not None:
        grad -= grad_logps.unsqueeze(-1) * probs
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logps.unsqueeze(-1))
    if grad_entropy is not None:
        grad -= grad_entropy.unsqueeze(-1) * probs * (log_p + entropy.unsqueeze(-1))
    return grad


def _raw_logits(hidden: Tensor, weight_op: Tensor, bias: Tensor | None, compute_dtype: torch.dtype) -> Tensor:
    raw = matmul_f32(hidden, weight_op.t(), compute_dtype)  # [n, V] fp32
    if bias is not None:
        raw += bias.float()
    return raw


class ChunkedLinearLogProbs(torch.autograd.Function):
    """Autograd function over valid (non-ignored) token rows; see :func:`lightning_llm.ops.linear_logprobs`.

    Inputs: ``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``targets [N]`` in ``[0, V)``, a
    :class:`LogitTransform`, the matmul ``compute_dtype``, ``chunk_rows`` and four flags for the optional
    outputs (entropy, is_top1, mean_logits, log_sum_sq_probs). Outputs: ``(logps, entropy, is_top1,
    mean_logits, log_sum_sq_probs)``, ``[N]`` each, ``None`` where not requested; only the first two carry
    gradients.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        transform: LogitTransform,
        compute_dtype: torch.dtype,
        chunk_rows: int,
        want: tuple[bool, bool, bool, bool],
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        # Entropy is often only logged; without this autograd would hand backward a zero gradient to multiply
        ctx.set_materialize_grads(False)
        want_entropy, want_top1, want_mean, want_lss = want
        n_rows = hidden.shape[0]
        device = hidden.device
        weight_op = mm_operand(weight, compute_dtype)

        def empty() -> Tensor:
            return torch.empty(n_rows, device=device, dtype=torch.float32)

        log_z, logps = empty(), empty()
        entropy = empty() if want_entropy else None
        is_top1 = torch.empty(n_rows, device=device, dtype=torch.bool) if want_top1 else None
        mean_logits = empty() if want_mean else None
        log_sum_sq = empty() if want_lss else None

        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n_rows))
            z = transform.apply(_raw_logits(hidden[rows], weight_op, bias, compute_dtype))
            stats = full_row_stats(
                z,
                targets[rows],
                entropy=want_entropy,
                is_top1=want_top1,
                mean_logits=want_mean,
                log_sum_sq_probs=want_lss,
            )
            for out, value in zip((log_z, logps, entropy, is_top1, mean_logits, log_sum_sq), stats):
                if out is not None:
                    out[rows] = value

        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy)
        ctx.transform = transform
        ctx.compute_dtype = compute_dtype
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(*(t for t in (is_top1, mean_logits, log_sum_sq) if t is not None))
        return logps, entropy, is_top1, mean_logits, log_sum_sq

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logps: Tensor | None, grad_entropy: Tensor | None, *_: Any
    ) -> tuple:
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        if grad_logps is None and grad_entropy is None:
            return (None,) * 8
        grad_logps = grad_logps.float() if grad_logps is not None else None
        grad_entropy = grad_entropy.float() if grad_entropy is not None else None

        with torch.autocast(hidden.device.type, enabled=False):
            return _chunked_backward(ctx, hidden, weight, bias, targets, log_z, entropy, grad_logps, grad_entropy)


def _chunked_backward(
    ctx: Any,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    log_z: Tensor,
    entropy: Tensor | None,
    grad_logps: Tensor | None,
    grad_entropy: Tensor | None,
) -> tuple:
    transform: LogitTransform = ctx.transform
    compute_dtype = ctx.compute_dtype
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    weight_op = mm_operand(weight, compute_dtype)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_bias else None

    n_rows = hidden.shape[0]
    for start in range(0, n_rows, ctx.chunk_rows):
        rows = slice(start, min(start + ctx.chunk_rows, n_rows))
        raw = _raw_logits(hidden[rows], weight_op, bias, compute_dtype)
        grad_z = logits_grad(
            transform.apply(raw),
            targets[rows],
            log_z[rows],
            entropy[rows] if entropy is not None else None,
            grad_logps[rows] if grad_logps is not None else None,
            grad_entropy[rows] if grad_entropy is not None else None,
        )
        grad_raw = transform.backward(grad_z, raw)  # [n, V] fp32
        if grad_hidden is not None:
            grad_hidden[rows] = matmul_f32(grad_raw, weight_op, compute_dtype)
        if grad_weight is not None:
            addmm_f32_(grad_weight, grad_raw.t(), hidden[rows], compute_dtype)
        if grad_bias is not None:
            grad_bias += grad_raw.sum(0)

    return (
        grad_hidden,
        grad_weight.to(weight.dtype) if grad_weight is not None else None,
        grad_bias.to(bias.dtype) if grad_bias is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


class ChunkedRowScorer:
    """Scores token rows with full ``[rows, V]`` fp32 logits in torch; :func:`lightning_llm.ops.token_loss`'s CPU path.

    :meth:`scores` keeps the chunk's logits so :meth:`grad` can turn them into ``dL/dy`` without recomputing.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, transform: LogitTransform, compute_dtype: torch.dtype):
        self.weight_op = mm_operand(weight, compute_dtype)
        self.bias = bias
        self.transform = transform
        self.compute_dtype = compute_dtype
        self._raw: Tensor | None = None
        self._z: Tensor | None = None

    def scores(
        self, hidden: Tensor, targets: Tensor, entropy: bool, is_top1: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(log_z, logps, entropy, is_top1)`` of the rows ``hidden`` (``[n, H]``) with targets ``[n]``."""
        self._raw = _raw_logits(hidden, self.weight_op, self.bias, self.compute_dtype)
        self._z = self.transform.apply(self._raw)
        log_z, logps, ent, top1, _, _ = full_row_stats(
            self._z, targets, entropy=entropy, is_top1=is_top1, mean_logits=False, log_sum_sq_probs=False
        )
        return log_z, logps, ent, top1

    def grad(
        self,
        targets: Tensor,
        log_z: Tensor,
        entropy: Tensor | None,
        grad_logps: Tensor | None,
        grad_entropy: Tensor | None,
    ) -> Tensor:
        """``dL/dy`` ``[n, V]`` (fp32) of the rows last scored, for upstream gradients on logps and entropy."""
        grad_z = logits_grad(self._z, targets, log_z, entropy, grad_logps, grad_entropy)
        grad_raw = self.transform.backward(grad_z, self._raw)
        self._raw = self._z = None
        return grad_raw
