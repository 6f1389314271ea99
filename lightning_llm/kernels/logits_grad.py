"""In-place gradient of a logits tile: the backward half of the Triton log-prob path.

Given a recomputed tile of raw logits ``y`` and the per-token ``log Z`` and entropy ``H`` saved by the forward,
the gradient of ``L = sum_i g_i log p_i(t_i) + h_i H_i`` with respect to the transformed logits is

    dL/dz_ij = g_i (1[j = t_i] - p_ij) - h_i p_ij (log p_ij + H_i),      p_ij = exp(z_ij - log Z_i),

chained through the transform to ``dL/dy``. The result overwrites the tile's own memory in the dtype the
gradient matmuls want, so the backward needs no second ``[rows, cols]`` buffer: a bf16 gradient is written
into the first half of each fp32 row it replaces (row stride unchanged, in bytes), which is safe because one
program owns one row and writes a block only after reading it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_llm.kernels.logit_transform import LogitTransform
from lightning_llm.kernels.transform import block_size, load_raw_logits, transform_grad, transform_logits

__all__ = ["logits_grad_", "logits_grad_block", "logits_grad_reference", "narrow_view"]


@triton.jit
def logits_grad_block(
    raw,  # raw logits y of a block (fp32), any shape
    is_target,  # same shape (or broadcastable): column == the row's target
    log_z,
    g_logp,
    entropy,
    g_entropy,  # per-row values, broadcastable against raw
    logit_scale,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LOGPS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    """``dL/dy`` of a block (module docstring), shared by the row kernel below and the GEMM kernel of
    :mod:`lightning_llm.kernels.gemm`."""
    z = transform_logits(raw, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    log_p = z - log_z
    p = tl.exp(log_p)
    grad = tl.zeros_like(raw)
    if HAS_GRAD_LOGPS:
        grad += g_logp * (tl.where(is_target, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        grad -= g_entropy * p * (log_p + entropy)
    return transform_grad(grad, raw, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)


@triton.jit
def _logits_grad_kernel(
    tile_ptr,  # [rows, cols] raw logits, read (fp32, bf16 or fp16)
    tile_stride,
    grad_ptr,  # [rows, cols] gradient, written (may alias tile_ptr)
    grad_stride,
    bias_ptr,  # [cols]
    targets_ptr,  # [rows] int64
    log_z_ptr,  # [rows] fp32
    entropy_ptr,  # [rows] fp32
    grad_logps_ptr,  # [rows] fp32
    grad_entropy_ptr,  # [rows] fp32
    vocab_start,
    n_cols,
    logit_scale,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LOGPS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row, blocks in increasing order: the aliased narrow write never outruns the reads
    row = tl.program_id(0).to(tl.int64)
    in_row = tile_ptr + row * tile_stride
    out_row = grad_ptr + row * grad_stride
    log_z = tl.load(log_z_ptr + row)
    local_target = tl.load(targets_ptr + row) - vocab_start
    # Unused ones are never read by logits_grad_block; the pointers then alias log_z
    g_logp = tl.load(grad_logps_ptr + row)
    g_entropy = tl.load(grad_entropy_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_chunk = cols < n_cols
        raw = load_raw_logits(in_row, bias_ptr, cols, in_chunk, HAS_BIAS)
        grad = logits_grad_block(
            raw, cols == local_target, log_z, g_logp, entropy, g_entropy, logit_scale, softcap, inv_temperature,
            HAS_SOFTCAP, HAS_GRAD_LOGPS, HAS_GRAD_ENTROPY,
        )
        tl.store(out_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_chunk)


def narrow_view(tile: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``[rows, cols]`` tensor of ``dtype`` that occupies the start of each row of an fp32 ``tile``.

    Its row stride is the tile's row stride in bytes, so row ``i`` of the view lives inside row ``i`` of the
    tile; for fp32 it is the tile itself.
    """
    if dtype == tile.dtype:
        return tile
    if tile.dtype != torch.float32 or dtype.itemsize != 2 or tile.stride(1) != 1:
        raise ValueError(f"narrow_view needs an fp32 tile with unit column stride and a 2-byte dtype, got {dtype}")
    return tile.view(dtype)[:, : tile.shape[1]]  # [rows, 2 * cols] -> its first half of every row


def logits_grad_(
    tile: Tensor,  # [rows, cols] raw logits (fp32, or bf16/fp16)
    grad: Tensor,  # [rows, cols] output, may be the tile itself or narrow_view(tile, dtype)
    bias: Tensor | None,  # [cols]
    targets: Tensor,  # [rows] int64
    log_z: Tensor,  # [rows] fp32
    entropy: Tensor | None,  # [rows] fp32, needed with grad_entropy
    grad_logps: Tensor | None,  # [rows] fp32
    grad_entropy: Tensor | None,  # [rows] fp32
    vocab_start: int,
    transform: LogitTransform,
    block: int | None = None,
) -> Tensor:
    """Write ``dL/dy`` for one tile (vocabulary columns ``vocab_start + [0, cols)``) into ``grad``; returns it."""
    rows, cols = tile.shape
    if tile.stride(1) != 1 or grad.stride(1) != 1:
        raise ValueError("tile and grad must have unit stride along the vocabulary")
    if grad.element_size() > tile.element_size() and grad.data_ptr() == tile.data_ptr():
        raise ValueError(f"a {grad.dtype} gradient cannot overwrite a narrower {tile.dtype} tile in place")
    if grad_entropy is not None and entropy is None:
        raise ValueError("entropy is required with grad_entropy")
    if rows == 0:
        return grad
    block = block_size(cols, block)
    _logits_grad_kernel[(rows,)](
        tile,
        tile.stride(0),
        grad,
        grad.stride(0),
        bias if bias is not None else tile,
        targets,
        log_z,
        entropy if entropy is not None else log_z,
        grad_logps if grad_logps is not None else log_z,
        grad_entropy if grad_entropy is not None else log_z,
        vocab_start,
        cols,
        float(transform.logit_scale),
        float(transform.softcap or 1.0),
        1.0 / float(transform.temperature),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=transform.softcap is not None,
        HAS_GRAD_LOGPS=grad_logps is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return grad


def logits_grad_reference(
    tile: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    log_z: Tensor,
    entropy: Tensor | None,
    grad_logps: Tensor | None,
    grad_entropy: Tensor | None,
    vocab_start: int,
    transform: LogitTransform,
) -> Tensor:
    """Torch version of :func:`logits_grad_` returning a new fp32 ``[rows, cols]`` tensor."""
    raw = tile.float() + (bias.float() if bias is not None else 0.0)
    log_p = transform.apply(raw) - log_z.unsqueeze(-1)
    p = log_p.exp()
    grad = torch.zeros_like(raw)
    if grad_logps is not None:
        cols = torch.arange(raw.shape[1], device=raw.device) + vocab_start
        one_hot = (cols == targets.unsqueeze(-1)).float()
        grad += grad_logps.unsqueeze(-1) * (one_hot - p)
    if grad_entropy is not None:
        grad -= grad_entropy.unsqueeze(-1) * p * (log_p + entropy.unsqueeze(-1))
    return transform.backward(grad, raw)
