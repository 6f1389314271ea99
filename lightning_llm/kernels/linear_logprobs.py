"""The Triton log-prob path: cuBLAS tiles of the head, Triton kernels for the softmax work on each tile.

Forward: for each vocabulary chunk ``W[v0:v1]`` and each token chunk ``h[r0:r1]``, one GEMM writes the raw
logits tile ``[rows, cols]`` in fp32 (fp32 accumulation and output, bf16/fp16 operands on the tensor cores)
into one reused buffer, and :func:`fold_softmax_stats` folds it into running per-token statistics. Nothing of
size ``[N, V]`` exists at any time; per token only a handful of fp32 scalars are kept for the backward.

Backward (recomputation, as in gradient checkpointing): the same tiles are recomputed, :func:`logits_grad_`
turns each into ``dL/dy`` in place, and two GEMMs consume it:
``grad_hidden[r0:r1] += dy @ W[v0:v1]`` into an fp32 ``[N, H]`` accumulator, and
``grad_weight[v0:v1] = dy.T @ h`` — the vocabulary loop is the outer one so each slice of the weight gradient
is finished by GEMMs that accumulate over the tokens in fp32 inside cuBLAS (plus an fp32 ``[cols, H]``
scratch when the tokens span several chunks). The weight gradient is therefore never rounded to bf16 before
it is complete, and no fp32 ``[V, H]`` buffer is needed.

Work: ``2NHV`` FLOPs forward, ``6NHV`` backward (recompute + two gradient GEMMs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_llm.kernels.gemm import gemm_logits_grad, gemm_softmax_stats
from lightning_llm.kernels.logit_transform import LogitTransform, addmm_f32_, matmul_f32, mm_operand
from lightning_llm.kernels.logits_grad import logits_grad_, narrow_view
from lightning_llm.kernels.softmax_stats import SoftmaxStats, fold_softmax_stats

__all__ = ["TileConfig", "TritonLinearLogProbs", "TritonRowScorer", "default_token_rows", "VOCAB_CHUNK", "TILE_BUDGET"]

# Vocabulary columns per tile: wide enough that the fp32 [N, H] gradient accumulator is revisited only
# V / 4096 times (37 passes at V = 152k), narrow enough that a full-N tile stays small.
VOCAB_CHUNK = 4096
# fp32 elements of one logits tile (128 MiB): 8192 tokens x 4096 columns
TILE_BUDGET = 1 << 25


def default_token_rows(n_rows: int, vocab_chunk: int = VOCAB_CHUNK, budget: int = TILE_BUDGET) -> int:
    """Token rows per tile: every row at once when ``rows x vocab_chunk`` fits ``budget``, else as many as fit."""
    return max(1, min(n_rows, budget // vocab_chunk))


@dataclass(frozen=True)
class TileConfig:
    """Tiling knobs.

    ``vocab_chunk``: vocabulary columns per tile. ``block``: columns per Triton step (None = automatic).
    ``logits_dtype``: dtype the GEMM writes the logits tile in. fp32 (default) keeps log-probs exact to fp32
    for bf16 inputs (bf16 logits of magnitude 10 carry errors of ~0.03 nats, which PPO/GRPO ratios feel);
    bf16 halves the tile's memory traffic, as TRL and Liger do, and is what the benchmark compares.
    ``grad_dtype``: dtype of the in-place gradient tile (None = the GEMM operand dtype, or the tile's own
    dtype when that is narrower); tests force bf16 on CPU to exercise the narrow in-place write.
    ``fused_gemm``: compute the logits inside the Triton kernels (:mod:`lightning_llm.kernels.gemm`) instead of
    having cuBLAS write them to a tile: the forward then keeps no tile at all and the backward's tile holds only
    ``dL/dy`` in ``grad_dtype``; ``logits_dtype`` and ``block`` do not apply.
    """

    vocab_chunk: int = VOCAB_CHUNK
    block: int | None = None
    logits_dtype: torch.dtype = torch.float32
    grad_dtype: torch.dtype | None = None
    fused_gemm: bool = False


class TritonLinearLogProbs(torch.autograd.Function):
    """Same contract as :class:`lightning_llm.ops.chunked.ChunkedLinearLogProbs` (rows are pre-compacted:
    every target lies in ``[0, V)``), plus an optional trailing :class:`TileConfig`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V, H]
        bias: Tensor | None,  # [V]
        targets: Tensor,  # [N] int64
        transform: LogitTransform,
        compute_dtype: torch.dtype,
        token_rows: int,
        want: tuple[bool, bool, bool, bool],
        tiles: TileConfig | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        ctx.set_materialize_grads(False)
        tiles = tiles or TileConfig()
        n_rows, vocab_size = hidden.shape[0], weight.shape[0]
        token_rows = max(1, min(token_rows, n_rows))
        vocab_chunk = min(tiles.vocab_chunk, vocab_size)
        with torch.autocast(hidden.device.type, enabled=False):
            hidden_op = mm_operand(hidden, compute_dtype)
            if tiles.fused_gemm:
                stats = gemm_softmax_stats(hidden_op, weight, bias, targets, transform, want)
            else:
                stats = _tiled_stats(hidden_op, weight, bias, targets, transform, compute_dtype, token_rows,
                                     vocab_chunk, want, tiles)
            log_z, logps, entropy, is_top1, mean_logits, log_sum_sq = stats.finish(vocab_size)

        want_entropy, want_top1, want_mean, want_sq = want
        entropy = entropy if want_entropy else None
        outputs = (logps, entropy, is_top1 if want_top1 else None, mean_logits if want_mean else None,
                   log_sum_sq if want_sq else None)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy)
        ctx.transform = transform
        ctx.compute_dtype = compute_dtype
        ctx.token_rows = token_rows
        ctx.tiles = tiles
        ctx.mark_non_differentiable(*(t for t in outputs[2:] if t is not None))
        return outputs

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logps: Tensor | None, grad_entropy: Tensor | None, *_: Any
    ) -> tuple:
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        nones = (None,) * 6
        if grad_logps is None and grad_entropy is None:
            return (None, None, None) + nones
        with torch.autocast(hidden.device.type, enabled=False):
            grads = _backward(
                hidden,
                weight,
                bias,
                targets,
                log_z,
                entropy,
                grad_logps.float().contiguous() if grad_logps is not None else None,
                grad_entropy.float().contiguous() if grad_entropy is not None else None,
                ctx.needs_input_grad[:3],
                ctx.transform,
                ctx.compute_dtype,
                ctx.token_rows,
                ctx.tiles,
            )
        return grads + nones


def _backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    log_z: Tensor,
    entropy: Tensor | None,
    grad_logps: Tensor | None,
    grad_entropy: Tensor | None,
    needs: tuple[bool, bool, bool],
    transform: LogitTransform,
    compute_dtype: torch.dtype,
    token_rows: int,
    tiles: TileConfig,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    need_hidden, need_weight, need_bias = needs
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    vocab_chunk = min(tiles.vocab_chunk, vocab_size)
    device = hidden.device
    hidden_op = mm_operand(hidden, compute_dtype)
    narrow_logits = tiles.logits_dtype.itemsize < 4 and not tiles.fused_gemm
    grad_dtype = tiles.grad_dtype or (tiles.logits_dtype if narrow_logits else hidden_op.dtype)
    single_token_chunk = token_rows >= n_rows

    grad_hidden = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if need_hidden else None
    # Every slice is written by the vocabulary loop below, unless there are no tokens at all
    grad_weight = (torch.empty_like(weight) if n_rows else torch.zeros_like(weight)) if need_weight else None
    grad_bias = torch.zeros(vocab_size, device=device, dtype=torch.float32) if need_bias else None
    # fp32 partial sums of one weight-gradient slice when the tokens span several chunks
    weight_scratch = (
        torch.empty(vocab_chunk, weight.shape[1], device=device, dtype=torch.float32)
        if need_weight and not single_token_chunk
        else None
    )
    # fused: the tile only ever holds dL/dy, in the dtype the gradient GEMMs read
    buffer = torch.empty(token_rows * vocab_chunk, device=device,
                         dtype=grad_dtype if tiles.fused_gemm else tiles.logits_dtype)

    for v0 in range(0, vocab_size, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab_size)
        weight_op = mm_operand(weight[v0:v1], compute_dtype)  # [cols, H]
        bias_chunk = bias[v0:v1] if bias is not None else None
        if weight_scratch is not None:
            scratch = weight_scratch[: v1 - v0].zero_()
        for r0 in range(0, n_rows, token_rows):
            r1 = min(r0 + token_rows, n_rows)
            tile = buffer[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
            row_values = (
                targets[r0:r1],
                log_z[r0:r1],
                entropy[r0:r1] if entropy is not None else None,
                grad_logps[r0:r1] if grad_logps is not None else None,
                grad_entropy[r0:r1] if grad_entropy is not None else None,
            )
            if tiles.fused_gemm:
                grad_tile = gemm_logits_grad(hidden_op[r0:r1], weight_op, bias_chunk, *row_values, v0, transform,
                                             out=tile)
            else:
                _logits_into(tile, hidden_op[r0:r1], weight_op.t(), compute_dtype)
                grad_tile = logits_grad_(tile, narrow_view(tile, grad_dtype), bias_chunk, *row_values, v0, transform,
                                         tiles.block)  # [rows, cols] dL/dy
            if grad_hidden is not None:
                addmm_f32_(grad_hidden[r0:r1], grad_tile, weight_op, compute_dtype)
            if grad_weight is not None:
                if single_token_chunk:
                    _write_weight_grad(grad_weight[v0:v1], grad_tile.t(), hidden_op[r0:r1], compute_dtype)
                else:
                    addmm_f32_(scratch, grad_tile.t(), hidden_op[r0:r1], compute_dtype)
            if grad_bias is not None:
                grad_bias[v0:v1] += grad_tile.sum(0, dtype=torch.float32)
        if weight_scratch is not None:
            grad_weight[v0:v1].copy_(scratch)

    return (
        grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
        grad_weight,
        grad_bias.to(bias.dtype) if grad_bias is not None else None,
    )


def _tiled_stats(
    hidden_op: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    transform: LogitTransform,
    compute_dtype: torch.dtype,
    token_rows: int,
    vocab_chunk: int,
    want: tuple[bool, bool, bool, bool],
    tiles: TileConfig,
) -> SoftmaxStats:
    """Forward of the tile path: cuBLAS writes each logits tile, :func:`fold_softmax_stats` folds it in."""
    n_rows, vocab_size = hidden_op.shape[0], weight.shape[0]
    stats = SoftmaxStats.empty(n_rows, hidden_op.device)
    buffer = torch.empty(token_rows * vocab_chunk, device=hidden_op.device, dtype=tiles.logits_dtype)
    for v0 in range(0, vocab_size, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab_size)
        weight_op = mm_operand(weight[v0:v1], compute_dtype)  # [cols, H]
        bias_chunk = bias[v0:v1] if bias is not None else None
        for r0 in range(0, n_rows, token_rows):
            r1 = min(r0 + token_rows, n_rows)
            tile = buffer[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
            _logits_into(tile, hidden_op[r0:r1], weight_op.t(), compute_dtype)
            fold_softmax_stats(tile, bias_chunk, targets[r0:r1], stats.rows(r0, r1), v0, transform, want, tiles.block)
    return stats


def _logits_into(tile: Tensor, hidden: Tensor, weight_t: Tensor, compute_dtype: torch.dtype) -> None:
    # GEMM straight into the tile: fp32 output, or the operands' own dtype (cuBLAS rounds once at the end)
    if tile.dtype == torch.float32:
        matmul_f32(hidden, weight_t, compute_dtype, out=tile)
    elif hidden.dtype == tile.dtype:
        torch.mm(hidden, weight_t, out=tile)
    else:  # fp32 operands (CPU) into a narrow tile
        tile.copy_(matmul_f32(hidden, weight_t, compute_dtype))


def _write_weight_grad(out: Tensor, grad_t: Tensor, hidden: Tensor, compute_dtype: torch.dtype) -> None:
    # One GEMM over all tokens: fp32 accumulation inside cuBLAS, one rounding to the weight's dtype at the end
    if out.dtype == torch.float32:
        matmul_f32(grad_t, hidden, compute_dtype, out=out)
    else:
        out.copy_(matmul_f32(grad_t, hidden, compute_dtype))


class TritonRowScorer:
    """Scores token rows against the whole vocabulary at once, for :func:`lightning_llm.ops.linear_token_loss`.

    Tile path: one GEMM writes the ``[rows, V]`` logits tile, :func:`fold_softmax_stats` reads it once and
    :meth:`grad` overwrites it in place with ``dL/dy``. With ``TileConfig(fused_gemm=True)`` the statistics come
    from :func:`gemm_softmax_stats` without any tile and :meth:`grad` recomputes the logits inside
    :func:`gemm_logits_grad`, so the tile holds only ``dL/dy``. The Triton counterpart of
    :class:`lightning_llm.ops.chunked.ChunkedRowScorer`; the tile buffer is allocated once for ``max_rows`` rows.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        transform: LogitTransform,
        compute_dtype: torch.dtype,
        max_rows: int,
        tiles: TileConfig | None = None,
    ):
        self.weight_op = mm_operand(weight, compute_dtype)  # [V, H]
        self.bias = bias
        self.transform = transform
        self.compute_dtype = compute_dtype
        self.tiles = tiles or TileConfig()
        vocab_size = weight.shape[0]
        fused = self.tiles.fused_gemm
        self._grad_dtype = self.tiles.grad_dtype or (
            self.tiles.logits_dtype if self.tiles.logits_dtype.itemsize < 4 and not fused else self.weight_op.dtype
        )
        buffer_dtype = self._grad_dtype if fused else self.tiles.logits_dtype
        self._buffer = torch.empty(max_rows * vocab_size, device=weight.device, dtype=buffer_dtype)
        self._tile: Tensor | None = None
        self._hidden: Tensor | None = None

    def scores(
        self, hidden: Tensor, targets: Tensor, entropy: bool, is_top1: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(log_z, logps, entropy, is_top1)`` of the rows ``hidden`` (``[n, H]``) with targets ``[n]``."""
        n_rows, vocab_size = hidden.shape[0], self.weight_op.shape[0]
        hidden_op = mm_operand(hidden, self.compute_dtype)
        want = (entropy, is_top1, False, False)
        self._tile = self._buffer[: n_rows * vocab_size].view(n_rows, vocab_size)
        if self.tiles.fused_gemm:
            self._hidden = hidden_op
            stats = gemm_softmax_stats(hidden_op, self.weight_op, self.bias, targets, self.transform, want)
        else:
            _logits_into(self._tile, hidden_op, self.weight_op.t(), self.compute_dtype)
            stats = SoftmaxStats.empty(n_rows, hidden.device)
            fold_softmax_stats(self._tile, self.bias, targets, stats, 0, self.transform, want, self.tiles.block)
        log_z, logps, ent, top1, _, _ = stats.finish(vocab_size)
        return log_z, logps, ent if entropy else None, top1 if is_top1 else None

    def grad(
        self,
        targets: Tensor,
        log_z: Tensor,
        entropy: Tensor | None,
        grad_logps: Tensor | None,
        grad_entropy: Tensor | None,
    ) -> Tensor:
        """``dL/dy`` of the rows last scored, written over their tile (in the GEMM operand dtype)."""
        tile, hidden, self._tile, self._hidden = self._tile, self._hidden, None, None
        if self.tiles.fused_gemm:
            return gemm_logits_grad(hidden, self.weight_op, self.bias, targets, log_z, entropy, grad_logps,
                                    grad_entropy, 0, self.transform, out=tile)
        return logits_grad_(tile, narrow_view(tile, self._grad_dtype), self.bias, targets, log_z, entropy, grad_logps,
                            grad_entropy, 0, self.transform, self.tiles.block)
