"""The head GEMM fused with its softmax work: logits are produced in registers and never written to memory.

The tile path (:mod:`lightning_llm.kernels.linear_logprobs` with ``TileConfig(fused_gemm=False)``) lets cuBLAS
write each ``[rows, cols]`` tile of logits to memory and reads it back in a Triton kernel: about 8 bytes per
logit in the forward and 14 in the backward (fp32 tile), 55 GB at 16k tokens x 152k vocabulary. Here one
Triton kernel computes a ``[BM, BN]`` block of ``hidden @ W.T`` with ``tl.dot`` (fp32 accumulation) and consumes
it on the spot, as FlashAttention does with ``Q K^T``:

- :func:`gemm_softmax_stats` (forward): each program walks a range of the vocabulary for ``BM`` token rows and
  folds every block into the running softmax statistics with :func:`online_stats_update`; the vocabulary is split
  across programs for parallelism and the per-split statistics are merged afterwards
  (:meth:`SoftmaxStats.combine`). Nothing of size ``[N, V]`` is written.
- :func:`gemm_logits_grad` (backward): each program recomputes one block of logits and writes ``dL/dy`` with
  :func:`logits_grad_block`, in the dtype the two gradient GEMMs (cuBLAS) read: 2 bytes per logit written and 4
  read, instead of 14.

On CPU tensors the kernels run under ``TRITON_INTERPRET=1`` with small blocks (what the tests do); on CUDA a
few block shapes are autotuned per problem size.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_llm.kernels.logit_transform import LogitTransform
from lightning_llm.kernels.logits_grad import logits_grad_block
from lightning_llm.kernels.softmax_stats import SoftmaxStats, online_stats_update
from lightning_llm.kernels.transform import transform_logits

__all__ = ["gemm_softmax_stats", "gemm_logits_grad", "vocab_splits"]

# Column ranges of the forward's vocabulary splits are multiples of this (>= every BN below), so any tuned BN
# divides them and no split is empty
SPLIT_ALIGN = 256
# Programs the forward aims to launch: several waves of a 132-SM Hopper GPU
TARGET_PROGRAMS = 1024
_INTERPRET_BLOCKS = dict(BM=16, BN=32, BK=16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _head_block(
    h_ptr, stride_h, w_ptr, stride_w, bias_ptr, rows, row_ok, cols, col_ok, n_hidden,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``[BM, BN]`` fp32 block of raw logits ``h[rows] @ W[cols].T (+ bias[cols])``; rows are int64."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, n_hidden, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < n_hidden
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        # fp32 master weights meet bf16 activations here: round them as the cast before a cuBLAS GEMM would
        b = b.to(a.dtype)
        if DOT_PRECISION == "ieee":
            # fp32 products of the (possibly bf16) operands: exact, as on the tensor cores. The interpreter's
            # dot cannot multiply bf16 arrays, so that is also how it runs bf16 inputs on CPU
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _gemm_stats_kernel(
    h_ptr, stride_h, w_ptr, stride_w, bias_ptr, targets_ptr,
    partial_ptr,  # [7, splits, N] fp32: max, sum_exp, x_sum_exp, sq_sum_exp, z_sum, best_before, target_z
    n_rows, n_vocab, n_hidden, cols_per_split,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, WANT_TOP1: tl.constexpr, WANT_MEAN: tl.constexpr, WANT_SQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, n_vocab)
    m = tl.full((BM,), float("-inf"), tl.float32)
    s = tl.zeros((BM,), tl.float32)
    x = tl.zeros((BM,), tl.float32)
    q = tl.zeros((BM,), tl.float32)
    z_sum = tl.zeros((BM,), tl.float32)
    best_before = tl.full((BM,), float("-inf"), tl.float32)
    target_z = tl.zeros((BM,), tl.float32)
    for v0 in range(v_begin, v_end, BN):
        cols = v0 + tl.arange(0, BN)
        col_ok = cols < v_end
        raw = _head_block(h_ptr, stride_h, w_ptr, stride_w, bias_ptr, rows, row_ok, cols.to(tl.int64), col_ok,
                          n_hidden, HAS_BIAS, DOT_PRECISION, BM, BN, BK)
        z = transform_logits(raw, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        m, s, x, q, z_sum, best_before, target_z = online_stats_update(
            z, col_ok[None, :], cols[None, :] == targets[:, None], cols[None, :] < targets[:, None],
            m, s, x, q, z_sum, best_before, target_z, WANT_ENTROPY, WANT_TOP1, WANT_MEAN, WANT_SQ,
        )
    plane = tl.num_programs(1).to(tl.int64) * n_rows
    out = partial_ptr + split * n_rows + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, x, mask=row_ok)
    tl.store(out + 3 * plane, q, mask=row_ok)
    tl.store(out + 4 * plane, z_sum, mask=row_ok)
    tl.store(out + 5 * plane, best_before, mask=row_ok)
    tl.store(out + 6 * plane, target_z, mask=row_ok)


@triton.jit
def _gemm_logits_grad_kernel(
    h_ptr, stride_h, w_ptr, stride_w, bias_ptr, targets_ptr, log_z_ptr, entropy_ptr, grad_logps_ptr,
    grad_entropy_ptr, grad_ptr, stride_g,
    n_rows, n_cols, n_hidden, vocab_start,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LOGPS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    raw = _head_block(h_ptr, stride_h, w_ptr, stride_w, bias_ptr, rows, row_ok, cols, col_ok, n_hidden,
                      HAS_BIAS, DOT_PRECISION, BM, BN, BK)
    local_target = tl.load(targets_ptr + rows, mask=row_ok, other=-1) - vocab_start
    # Unused per-row inputs alias log_z and are never read by logits_grad_block
    log_z = tl.load(log_z_ptr + rows, mask=row_ok, other=0.0)[:, None]
    g_logp = tl.load(grad_logps_ptr + rows, mask=row_ok, other=0.0)[:, None]
    entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)[:, None]
    g_entropy = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)[:, None]
    grad = logits_grad_block(
        raw, cols[None, :] == local_target[:, None], log_z, g_logp, entropy, g_entropy, logit_scale, softcap,
        inv_temperature, HAS_SOFTCAP, HAS_GRAD_LOGPS, HAS_GRAD_ENTROPY,
    )
    tl.store(grad_ptr + rows[:, None] * stride_g + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# Block shapes autotuned on CUDA. Compiled for sm_90a with the divisibility hints Triton infers for 16-aligned
# shapes, none of them spills registers in either kernel (benchmarks/compile_check.py prints the figures);
# 128 x 256 (8 warps) and 128 x 64 with 4 warps did, in the statistics kernel with entropy.
_CUDA_CONFIGS = [
    triton.Config(dict(BM=128, BN=128, BK=64), num_warps=8, num_stages=3),
    triton.Config(dict(BM=64, BN=256, BK=64), num_warps=8, num_stages=3),
    triton.Config(dict(BM=64, BN=128, BK=64), num_warps=4, num_stages=4),
    triton.Config(dict(BM=128, BN=64, BK=64), num_warps=8, num_stages=4),
]


# Below this many multiply-adds (e.g. 1024 tokens x 4096 columns x 1024 hidden) tuning costs more than it can
# win (tests, small validation batches): the first configuration runs as it is. One backward tile of the
# first benchmark shape (8192 x 4096 x 896) is 7x above it.
AUTOTUNE_MIN_WORK = 1 << 32
_KERNELS = {"stats": _gemm_stats_kernel, "grad": _gemm_logits_grad_kernel}


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str):
    key = ["n_vocab", "n_hidden"] if kernel_name == "stats" else ["n_cols", "n_hidden"]
    return triton.autotune(configs=_CUDA_CONFIGS, key=key)(_KERNELS[kernel_name])


def _launch(kernel_name: str, grid, work: int, *args, **constexprs) -> None:
    """Run a kernel: small blocks under the interpreter; on GPU autotuned when ``work`` is large, else with
    the first configuration."""
    if _interpreting():
        _KERNELS[kernel_name][grid(_INTERPRET_BLOCKS)](*args, **constexprs, **_INTERPRET_BLOCKS)
    elif work >= AUTOTUNE_MIN_WORK:
        _tuned(kernel_name)[grid](*args, **constexprs)
    else:
        config = _CUDA_CONFIGS[0]
        _KERNELS[kernel_name][grid(config.kwargs)](
            *args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )


def _dot_precision(operand: Tensor) -> str | None:
    # fp32 operands must not silently drop to TF32's 10-bit mantissa; bf16/fp16 keep Triton's default on GPU
    # and run as exact fp32 products in the interpreter
    return "ieee" if operand.dtype == torch.float32 or _interpreting() else None


def _check_operands(hidden: Tensor, weight: Tensor) -> None:
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if hidden.dtype not in floats or weight.dtype not in floats:
        raise ValueError(f"hidden and weight must be fp32/bf16/fp16, got {hidden.dtype}, {weight.dtype}")
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("hidden and weight must be contiguous along the hidden dimension")


def vocab_splits(n_rows: int, n_vocab: int, block_rows: int = 128) -> tuple[int, int]:
    """``(splits, cols_per_split)``: enough vocabulary splits that about :data:`TARGET_PROGRAMS` programs run."""
    row_blocks = triton.cdiv(max(n_rows, 1), block_rows)
    wanted = max(1, min(triton.cdiv(TARGET_PROGRAMS, row_blocks), triton.cdiv(n_vocab, SPLIT_ALIGN)))
    cols_per_split = triton.cdiv(triton.cdiv(n_vocab, wanted), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(n_vocab, cols_per_split), cols_per_split


def gemm_softmax_stats(
    hidden: Tensor,  # [N, H] in the matmul dtype
    weight: Tensor,  # [V, H], cast block by block to hidden's dtype
    bias: Tensor | None,  # [V]
    targets: Tensor,  # [N] int64 in [0, V)
    transform: LogitTransform,
    want: tuple[bool, bool, bool, bool],
    splits: int | None = None,
) -> SoftmaxStats:
    """Softmax statistics of every row of ``hidden @ weight.T (+ bias)`` over the whole vocabulary, in one kernel.

    ``want`` = (entropy, is_top1, mean_logits, log_sum_sq_probs). ``splits`` forces the number of vocabulary
    splits (tests); by default :func:`vocab_splits` picks it.
    """
    _check_operands(hidden, weight)
    n_rows, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    if splits is None:
        splits, cols_per_split = vocab_splits(n_rows, n_vocab)
    else:
        cols_per_split = triton.cdiv(triton.cdiv(n_vocab, splits), SPLIT_ALIGN) * SPLIT_ALIGN
        splits = triton.cdiv(n_vocab, cols_per_split)
    partial = torch.empty(7, splits, n_rows, device=hidden.device, dtype=torch.float32)
    if n_rows:
        want_entropy, want_top1, want_mean, want_sq = want
        _launch(
            "stats",
            lambda meta: (triton.cdiv(n_rows, meta["BM"]), splits),
            n_rows * n_vocab * n_hidden,
            hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight, targets,
            partial, n_rows, n_vocab, n_hidden, cols_per_split,
            float(transform.logit_scale), float(transform.softcap or 1.0), 1.0 / float(transform.temperature),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=transform.softcap is not None, WANT_ENTROPY=want_entropy,
            WANT_TOP1=want_top1, WANT_MEAN=want_mean, WANT_SQ=want_sq, DOT_PRECISION=_dot_precision(hidden),
        )
    return SoftmaxStats.combine(SoftmaxStats(*partial.unbind(0)))


def gemm_logits_grad(
    hidden: Tensor,  # [rows, H] in the matmul dtype
    weight: Tensor,  # [cols, H]: the vocabulary chunk starting at vocab_start, cast to hidden's dtype
    bias: Tensor | None,  # [cols]
    targets: Tensor,  # [rows] int64, global ids
    log_z: Tensor,  # [rows] fp32
    entropy: Tensor | None,
    grad_logps: Tensor | None,
    grad_entropy: Tensor | None,
    vocab_start: int,
    transform: LogitTransform,
    out: Tensor,  # [rows, cols], unit column stride, written
) -> Tensor:
    """Recompute the logits of a ``[rows, cols]`` tile and write ``dL/dy`` into ``out`` (its dtype); returns it."""
    _check_operands(hidden, weight)
    n_rows, n_hidden = hidden.shape
    n_cols = weight.shape[0]
    if out.shape != (n_rows, n_cols) or out.stride(1) != 1:
        raise ValueError(f"out must be [{n_rows}, {n_cols}] with unit column stride, got {tuple(out.shape)}")
    if grad_entropy is not None and entropy is None:
        raise ValueError("entropy is required with grad_entropy")
    if n_rows == 0 or n_cols == 0:
        return out
    _launch(
        "grad",
        lambda meta: (triton.cdiv(n_rows, meta["BM"]), triton.cdiv(n_cols, meta["BN"])),
        n_rows * n_cols * n_hidden,
        hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight, targets, log_z,
        entropy if entropy is not None else log_z, grad_logps if grad_logps is not None else log_z,
        grad_entropy if grad_entropy is not None else log_z, out, out.stride(0),
        n_rows, n_cols, n_hidden, vocab_start,
        float(transform.logit_scale), float(transform.softcap or 1.0), 1.0 / float(transform.temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=transform.softcap is not None,
        HAS_GRAD_LOGPS=grad_logps is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        DOT_PRECISION=_dot_precision(hidden),
    )
    return out
