"""``linear_token_loss``: a per-token loss of the head's log-probs whose gradient is computed in the forward.

:func:`~lightning_llm.ops.linear_logprobs` returns log-probs and accepts *any* upstream gradient later, so its
backward must recompute the logits: ``2NHV`` FLOPs forward plus ``6NHV`` backward. When the loss is a sum of
per-token terms ``l_i(log p_i, H_i)`` whose other inputs are known before the forward (SFT's NLL and DFT, a mean
cross-entropy, GRPO/PPO's clipped per-token objective with fixed advantages and old log-probs), the gradient
of each token is known as soon as its row of logits is complete. This function then does everything in one
pass over full ``[rows, V]`` chunks of logits: statistics, the token losses, their gradients with respect to
the log-prob and entropy (torch autograd on ``[rows]`` tensors), ``dL/dy`` in place and the two gradient
GEMMs: ``6NHV`` FLOPs in all, a quarter less than the recomputing path.

The price: the gradients of ``hidden``, ``weight`` and ``bias`` are materialised in the forward and held until
the backward, which only scales them by the upstream gradient of the scalar loss. The weight gradient is
accumulated in fp32 over the chunks (an fp32 ``[V, H]`` buffer during the forward) and then kept in the
weight's dtype, so bf16 weights see two roundings (at the end of the forward and after the scaling) where
the recomputing path has one.

Where it pays: on the chunked torch path it does the same memory traffic as the recomputing backward with a
quarter fewer FLOPs. On GPUs the Triton log-prob path's vocabulary-outer schedule finishes each slice of the
weight gradient in one GEMM over all tokens; this function's token-outer schedule instead revisits an fp32
``[V, H]`` accumulator once per chunk, which costs memory traffic unless the chunks are large (see
``benchmarks/README.md``). The modules therefore fuse by default on the chunked path only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import Tensor

from lightning_llm.kernels.logit_transform import LogitTransform, addmm_f32_, matmul_f32, mm_operand
from lightning_llm.ops.chunked import ChunkedRowScorer, default_chunk_rows
from lightning_llm.ops.logprobs import check_tiles, head_rows

if TYPE_CHECKING:
    from lightning_llm.kernels.linear_logprobs import TileConfig

__all__ = ["TokenLoss", "TokenLossFn", "linear_token_loss"]

TokenLossFn = Callable[..., Tensor]
"""``token_loss(logps, entropy, **token_inputs) -> [n]``: the loss of each of ``n`` tokens from its log-prob
(``[n]`` fp32, differentiable), its entropy (``[n]`` fp32 or None when not requested) and the caller's per-token
inputs (``[n]`` each). Each output element may depend on its own token only."""


class TokenLoss(NamedTuple):
    """Result of :func:`linear_token_loss`.

    ``loss``: the sum of the token losses over non-ignored tokens (fp32 scalar, differentiable).
    ``logps``, ``entropy``, ``is_top1``: per-token values in the shape of ``targets``, detached, 0 / False at
    ignored positions; ``entropy`` and ``is_top1`` are None unless requested.
    """

    loss: Tensor
    logps: Tensor
    entropy: Tensor | None = None
    is_top1: Tensor | None = None


class _RowScorer(Protocol):
    """Scores chunks of token rows against the whole vocabulary, then gives ``dL/dy`` of the last chunk."""

    weight_op: Tensor  # [V, H] in the dtype the gradient GEMMs multiply in

    def scores(
        self, hidden: Tensor, targets: Tensor, entropy: bool, is_top1: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]: ...

    def grad(
        self,
        targets: Tensor,
        log_z: Tensor,
        entropy: Tensor | None,
        grad_logps: Tensor | None,
        grad_entropy: Tensor | None,
    ) -> Tensor: ...


@dataclass(frozen=True)
class _Spec:
    transform: LogitTransform
    compute_dtype: torch.dtype
    impl: str
    chunk_rows: int
    want_entropy: bool
    want_top1: bool
    token_loss: TokenLossFn
    inputs: dict[str, Tensor]  # compacted to the valid rows
    with_grads: bool
    tiles: TileConfig | None = None


def _token_grads(
    token_loss: TokenLossFn, logps: Tensor, entropy: Tensor | None, inputs: dict[str, Tensor], with_grads: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(sum of the chunk's token losses, d/d logps, d/d entropy)`` by autograd on ``[n]`` tensors."""
    logps = logps.detach().requires_grad_(with_grads)
    entropy = entropy.detach().requires_grad_(with_grads) if entropy is not None else None
    # autograd.Function.forward runs with grad mode off: switch it on for these [n]-sized tensors only
    with torch.enable_grad():
        values = token_loss(logps, entropy, **inputs)
        if not isinstance(values, Tensor) or values.shape != logps.shape or not values.is_floating_point():
            raise ValueError(
                f"token_loss must return one floating-point loss per token, shape {tuple(logps.shape)}; got "
                f"{tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__}"
            )
        total = values.float().sum()
        if not (with_grads and total.requires_grad):
            return total.detach(), None, None
        leaves = [logps] + ([entropy] if entropy is not None else [])
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
    grad_entropy = grads[1] if entropy is not None else None
    return total.detach(), grads[0], grad_entropy


def _scorer(weight: Tensor, bias: Tensor | None, spec: _Spec, n_rows: int) -> _RowScorer:
    if spec.impl == "triton":
        from lightning_llm.kernels import TritonRowScorer

        return TritonRowScorer(
            weight, bias, spec.transform, spec.compute_dtype, min(spec.chunk_rows, n_rows), spec.tiles
        )
    return ChunkedRowScorer(weight, bias, spec.transform, spec.compute_dtype)


def _fused_rows(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, spec: _Spec, needs: tuple[bool, ...]
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Loss, per-token outputs and (if ``needs``) the gradients for rows that are all valid."""
    need_hidden, need_weight, need_bias = needs
    n_rows, device = hidden.shape[0], hidden.device
    scorer = _scorer(weight, bias, spec, n_rows)
    hidden_op = mm_operand(hidden, spec.compute_dtype)
    weight_op = scorer.weight_op

    def rows_of(dtype: torch.dtype) -> Tensor:
        return torch.empty(n_rows, device=device, dtype=dtype)

    loss = torch.zeros((), device=device, dtype=torch.float32)
    logps = rows_of(torch.float32)
    entropy = rows_of(torch.float32) if spec.want_entropy else None
    is_top1 = rows_of(torch.bool) if spec.want_top1 else None
    grad_hidden = torch.empty(hidden.shape, device=device, dtype=torch.float32) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, device=device, dtype=torch.float32) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], device=device, dtype=torch.float32) if need_bias else None

    for start in range(0, n_rows, spec.chunk_rows):
        rows = slice(start, min(start + spec.chunk_rows, n_rows))
        log_z, chunk_logps, chunk_entropy, chunk_top1 = scorer.scores(
            hidden[rows], targets[rows], spec.want_entropy, spec.want_top1
        )
        logps[rows] = chunk_logps
        if entropy is not None:
            entropy[rows] = chunk_entropy
        if is_top1 is not None:
            is_top1[rows] = chunk_top1
        chunk_loss, grad_logps, grad_entropy = _token_grads(
            spec.token_loss, chunk_logps, chunk_entropy, {k: v[rows] for k, v in spec.inputs.items()}, any(needs)
        )
        loss += chunk_loss
        if grad_logps is None and grad_entropy is None:
            if grad_hidden is not None:
                grad_hidden[rows] = 0.0
            continue
        grad_tile = scorer.grad(targets[rows], log_z, chunk_entropy, grad_logps, grad_entropy)  # [n, V] dL/dy
        if grad_hidden is not None:
            grad_hidden[rows] = matmul_f32(grad_tile, weight_op, spec.compute_dtype)
        if grad_weight is not None:
            addmm_f32_(grad_weight, grad_tile.t(), hidden_op[rows], spec.compute_dtype)
        if grad_bias is not None:
            grad_bias += grad_tile.sum(0, dtype=torch.float32)

    grads = (
        grad_hidden,  # kept in fp32 ([N, H] is small): one rounding, after the scaling in backward
        grad_weight.to(weight.dtype) if grad_weight is not None else None,
        grad_bias.to(bias.dtype) if grad_bias is not None else None,
    )
    return loss, logps, entropy, is_top1, grads


class _LinearTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, spec: _Spec
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        ctx.set_materialize_grads(False)
        needs = tuple(ctx.needs_input_grad[:3]) if spec.with_grads else (False, False, False)
        loss, logps, entropy, is_top1, grads = _fused_rows(hidden, weight, bias, targets, spec, needs)
        ctx.grads = grads
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(*(t for t in (logps, entropy, is_top1) if t is not None))
        return loss, logps, entropy, is_top1

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> tuple:  # type: ignore[override]
        nones = (None, None)
        if grad_loss is None:
            return (None, None, None) + nones
        if ctx.grads is None:
            raise RuntimeError(
                "linear_token_loss computes its gradients once, in the forward; it cannot be back-propagated twice"
            )
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None  # the scaling below is in place: free them as they are handed over
        scale = grad_loss.float()
        return (
            (grad_hidden * scale).to(ctx.hidden_dtype) if grad_hidden is not None else None,
            grad_weight.mul_(scale) if grad_weight is not None else None,
            grad_bias.mul_(scale) if grad_bias is not None else None,
        ) + nones


def _check_token_inputs(token_inputs: Mapping[str, Tensor] | None, targets: Tensor) -> dict[str, Tensor]:
    checked: dict[str, Tensor] = {}
    for name, value in (token_inputs or {}).items():
        if not isinstance(value, Tensor) or value.shape != targets.shape:
            raise ValueError(
                f"token_inputs[{name!r}] must be a tensor shaped like targets {tuple(targets.shape)}, got "
                f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
            )
        if value.requires_grad:
            raise ValueError(
                f"token_inputs[{name!r}] requires grad, but linear_token_loss sends gradients only to hidden, "
                "weight and bias; detach it (inputs are constants of the loss) or use linear_logprobs"
            )
        if value.device != targets.device:
            raise ValueError(f"token_inputs[{name!r}] is on {value.device} but targets are on {targets.device}")
        checked[name] = value.reshape(-1)
    return checked


def linear_token_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_loss: TokenLossFn,
    *,
    token_inputs: Mapping[str, Tensor] | None = None,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    return_is_top1: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
    tiles: TileConfig | None = None,
) -> TokenLoss:
    """Sum over non-ignored tokens of ``token_loss(log p_i, H_i, **inputs_i)``, gradients computed in the forward.

    The log-probs are those of :func:`~lightning_llm.ops.linear_logprobs` with the same arguments (head, bias,
    transform, ignore index); see the module docstring for when this is cheaper than differentiating
    ``linear_logprobs``' output.

    Args:
        hidden: ``[..., H]`` hidden states.
        weight: ``[V, H]`` LM-head weight.
        targets: ``[...]`` token ids in ``[0, V)`` or ``ignore_index``.
        token_loss: per-token loss, see :data:`TokenLossFn`; e.g. ``lambda logps, entropy: -logps`` for the
            summed NLL. Its gradient with respect to the log-prob (and the entropy, when requested) is taken.
        token_inputs: per-token constants handed to ``token_loss`` by name (weights, advantages, old log-probs),
            each shaped like ``targets``; they receive no gradient.
        bias, ignore_index, temperature, logit_scale, softcap: as in ``linear_logprobs``.
        return_entropy: compute the entropy (passed to ``token_loss`` and returned); else ``token_loss`` gets None.
        return_is_top1: also return whether the target is the argmax.
        chunk_size: token rows per ``[rows, V]`` chunk of logits; None picks one from a memory budget.
        impl: ``auto`` (Triton for CUDA tensors, else chunked), ``triton``, ``chunked``, or ``eager`` (one chunk
            of every row: the chunked path without the memory bound, for testing).
        tiles: Triton path only: its :class:`~lightning_llm.kernels.linear_logprobs.TileConfig` (``fused_gemm``,
            ``logits_dtype``, ``grad_dtype``, ``block``; ``vocab_chunk`` does not apply, rows span the vocabulary).

    Returns:
        :class:`TokenLoss`. Back-propagating ``loss`` hands ``hidden``, ``weight`` and ``bias`` their gradients,
        scaled by the upstream gradient; it can be done once.
    """
    if not callable(token_loss):
        raise ValueError(f"token_loss must be callable, got {type(token_loss).__name__}")
    rows = head_rows(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature,
        logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size, impl=impl,
    )
    check_tiles(tiles, rows.impl)
    inputs = _check_token_inputs(token_inputs, targets)
    with torch.autocast(hidden.device.type, enabled=False):
        hidden_rows, flat_targets = rows.compact()
        if rows.index is not None:
            inputs = {name: value.index_select(0, rows.index) for name, value in inputs.items()}
        n_valid, vocab_size = hidden_rows.shape[0], rows.weight.shape[0]
        if rows.impl == "eager":
            chunk_rows = max(1, n_valid)
        elif rows.impl == "triton":
            from lightning_llm.kernels import default_token_rows

            chunk_rows = chunk_size or default_token_rows(n_valid, vocab_chunk=vocab_size)
        else:
            chunk_rows = chunk_size or default_chunk_rows(vocab_size)
        leaves = (hidden, rows.weight, rows.bias)
        spec = _Spec(
            transform=rows.transform,
            compute_dtype=rows.compute_dtype,
            impl=rows.impl,
            chunk_rows=chunk_rows,
            want_entropy=return_entropy,
            want_top1=return_is_top1,
            token_loss=token_loss,
            inputs=inputs,
            tiles=tiles,
            with_grads=torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves),
        )
        loss, logps, entropy, is_top1 = _LinearTokenLoss.apply(hidden_rows, rows.weight, rows.bias, flat_targets, spec)
    return TokenLoss(loss, rows.scatter(logps), rows.scatter(entropy), rows.scatter(is_top1))
