"""Online softmax statistics over vocabulary chunks: the forward half of the Triton log-prob path.

The logits of a token are seen one ``[rows, cols]`` tile of the vocabulary at a time (a cuBLAS product of a
token chunk with a vocabulary chunk of the head). :func:`fold_softmax_stats` folds a tile into running
per-token statistics with the online-softmax recurrence (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax"): with running maximum ``m`` and a new maximum ``m'``, every running sum is rescaled
by ``exp(m - m')`` before the tile's terms are added. After the last tile :meth:`SoftmaxStats.finish` turns
them into log-probs, entropy, argmax-correctness, mean logit and ``log sum p^2``.

Kept per token (fp32), all relative to the running max ``m``:
``s = sum_j exp(z_j - m)``, ``x = sum_j exp(z_j - m) (z_j - m)``, ``q = sum_j exp(2 (z_j - m))``,
``zsum = sum_j z_j``, ``target_z = z_t``, ``best_before = max_{j < t} z_j``.
Then ``log Z = m + log s``, ``H = log s - x / s``, ``log sum p^2 = log q - 2 log s``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_llm.kernels.logit_transform import LogitTransform
from lightning_llm.kernels.transform import block_size, load_raw_logits, transform_logits

__all__ = ["SoftmaxStats", "fold_softmax_stats", "fold_softmax_stats_reference"]


@dataclass
class SoftmaxStats:
    """Running per-token statistics, each ``[N]`` fp32; see the module docstring for their meaning."""

    max: Tensor
    sum_exp: Tensor
    x_sum_exp: Tensor
    sq_sum_exp: Tensor
    z_sum: Tensor
    best_before: Tensor
    target_z: Tensor

    @classmethod
    def empty(cls, n_rows: int, device: torch.device) -> SoftmaxStats:
        def full(value: float) -> Tensor:
            return torch.full((n_rows,), value, device=device, dtype=torch.float32)

        neg_inf = float("-inf")
        return cls(full(neg_inf), full(0.0), full(0.0), full(0.0), full(0.0), full(neg_inf), full(0.0))

    def rows(self, start: int, end: int) -> SoftmaxStats:
        """Views of rows ``[start, end)``; kernels write through them into the full tensors."""
        return SoftmaxStats(*(getattr(self, f.name)[start:end] for f in fields(self)))

    def clone(self) -> SoftmaxStats:
        return SoftmaxStats(*(getattr(self, f.name).clone() for f in fields(self)))

    @classmethod
    def combine(cls, parts: SoftmaxStats) -> SoftmaxStats:
        """Merge statistics of disjoint vocabulary ranges, each field ``[splits, N]``, into ``[N]`` ones.

        Each split's sums are relative to its own maximum ``m_k``; with ``M = max_k m_k`` and
        ``w_k = exp(m_k - M)``: ``s = sum w_k s_k``, ``x = sum w_k (x_k + (m_k - M) s_k)``, ``q = sum w_k^2 q_k``.
        """
        if parts.max.shape[0] == 1:
            return SoftmaxStats(*(getattr(parts, f.name)[0] for f in fields(parts)))
        new_max = parts.max.amax(0)
        weight = torch.exp(parts.max - new_max)  # [splits, N]; 0 for a split that saw nothing (m_k = -inf)
        shift = torch.where(parts.sum_exp > 0, parts.max - new_max, torch.zeros_like(parts.max))
        return cls(
            max=new_max,
            sum_exp=(weight * parts.sum_exp).sum(0),
            x_sum_exp=(weight * (parts.x_sum_exp + shift * parts.sum_exp)).sum(0),
            sq_sum_exp=(weight * weight * parts.sq_sum_exp).sum(0),
            z_sum=parts.z_sum.sum(0),
            best_before=parts.best_before.amax(0),
            target_z=parts.target_z.sum(0),
        )

    def finish(self, vocab_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(log_z, logps, entropy, is_top1, mean_logits, log_sum_sq_probs)`` once every tile is folded."""
        log_s = torch.log(self.sum_exp)
        log_z = self.max + log_s
        logps = self.target_z - log_z
        entropy = log_s - self.x_sum_exp / self.sum_exp
        # argmax returns the first maximum: the target wins iff it is a maximum and nothing before it ties
        is_top1 = (self.target_z >= self.max) & (self.best_before < self.target_z)
        mean_logits = self.z_sum / vocab_size
        log_sum_sq = torch.log(self.sq_sum_exp) - 2.0 * log_s
        return log_z, logps, entropy, is_top1, mean_logits, log_sum_sq


@triton.jit
def online_stats_update(
    z,  # [R, B] transformed logits of one block of columns
    valid,  # [R, B] or [1, B]: columns that exist
    is_target,  # [R, B]: column == the row's target
    before_target,  # [R, B]: column < the row's target
    m,
    s,
    x,
    q,
    z_sum,
    best_before,
    target_z,  # [R] each: the running statistics (module docstring)
    WANT_ENTROPY: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_SQ: tl.constexpr,
):
    """Fold a block into the running statistics of its rows; returns ``(m, s, x, q, z_sum, best_before, target_z)``.

    Shared by the row kernel below (one row, ``R = 1``) and the GEMM kernel of :mod:`lightning_llm.kernels.gemm`.
    """
    z = tl.where(valid, z, float("-inf"))
    new_m = tl.maximum(m, tl.max(z, axis=1))
    rescale = tl.exp(m - new_m)  # 0 on the first block, where m = -inf
    e = tl.exp(z - new_m[:, None])  # 0 where the column does not exist
    if WANT_ENTROPY:
        # sum e (z - m) re-based from the old max to the new one; the s > 0 guard avoids -inf * 0
        shifted = tl.where(valid, z - new_m[:, None], 0.0)
        old_shift = tl.where(s > 0, m - new_m, 0.0)
        x = rescale * (x + old_shift * s) + tl.sum(e * shifted, axis=1)
    if WANT_SQ:
        q = q * rescale * rescale + tl.sum(e * e, axis=1)
    s = s * rescale + tl.sum(e, axis=1)
    if WANT_MEAN:
        z_sum += tl.sum(tl.where(valid, z, 0.0), axis=1)
    # Exactly one column of one block is the target; adding zeros elsewhere keeps z_t bit-exact. The valid test
    # matters: padding columns past the end may carry the index of a later chunk's target
    target_z += tl.sum(tl.where(is_target & valid, z, 0.0), axis=1)
    if WANT_TOP1:
        best_before = tl.maximum(best_before, tl.max(tl.where(before_target, z, float("-inf")), axis=1))
    return new_m, s, x, q, z_sum, best_before, target_z


@triton.jit
def _fold_stats_kernel(
    tile_ptr,  # [rows, cols] raw logits of one vocabulary chunk (fp32, bf16 or fp16)
    tile_stride,
    bias_ptr,  # [cols] bias of the chunk (read only if HAS_BIAS)
    targets_ptr,  # [rows] int64 token ids
    max_ptr,
    sum_exp_ptr,
    x_sum_exp_ptr,
    sq_sum_exp_ptr,
    z_sum_ptr,
    best_before_ptr,
    target_z_ptr,
    vocab_start,
    n_cols,
    logit_scale,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_SQ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per token row, walking its tile in BLOCK-wide steps; the row is a [1, BLOCK] block
    row = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + row * tile_stride
    here = row + tl.arange(0, 1)  # [1]: the statistics of this row as one-element vectors
    local_target = tl.load(targets_ptr + here) - vocab_start  # outside [0, n_cols) when not in this chunk
    m = tl.load(max_ptr + here)
    s = tl.load(sum_exp_ptr + here)
    x = tl.load(x_sum_exp_ptr + here)
    q = tl.load(sq_sum_exp_ptr + here)
    z_sum = tl.load(z_sum_ptr + here)
    best_before = tl.load(best_before_ptr + here)
    target_z = tl.load(target_z_ptr + here)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_chunk = cols < n_cols
        raw = load_raw_logits(row_ptr, bias_ptr, cols, in_chunk, HAS_BIAS)
        z = transform_logits(raw, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)[None, :]
        m, s, x, q, z_sum, best_before, target_z = online_stats_update(
            z, in_chunk[None, :], cols[None, :] == local_target[:, None], cols[None, :] < local_target[:, None],
            m, s, x, q, z_sum, best_before, target_z, WANT_ENTROPY, WANT_TOP1, WANT_MEAN, WANT_SQ,
        )
    tl.store(max_ptr + here, m)
    tl.store(sum_exp_ptr + here, s)
    tl.store(target_z_ptr + here, target_z)
    if WANT_ENTROPY:
        tl.store(x_sum_exp_ptr + here, x)
    if WANT_SQ:
        tl.store(sq_sum_exp_ptr + here, q)
    if WANT_MEAN:
        tl.store(z_sum_ptr + here, z_sum)
    if WANT_TOP1:
        tl.store(best_before_ptr + here, best_before)


_TILE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fold_softmax_stats(
    tile: Tensor,  # [rows, cols] fp32 (or bf16/fp16), unit stride along cols
    bias: Tensor | None,  # [cols]
    targets: Tensor,  # [rows] int64
    stats: SoftmaxStats,  # [rows] each, updated in place
    vocab_start: int,
    transform: LogitTransform,
    want: tuple[bool, bool, bool, bool],
    block: int | None = None,
) -> None:
    """Fold one tile of raw logits (vocabulary columns ``vocab_start + [0, cols)``) into ``stats`` in place.

    ``want`` = (entropy, is_top1, mean_logits, log_sum_sq_probs): statistics not wanted are left untouched.
    """
    rows, cols = tile.shape
    if rows == 0:
        return
    if tile.dtype not in _TILE_DTYPES or tile.stride(1) != 1:
        raise ValueError(f"tile must be fp32/bf16/fp16 with unit stride along the vocabulary, got {tile.dtype}")
    want_entropy, want_top1, want_mean, want_sq = want
    block = block_size(cols, block)
    _fold_stats_kernel[(rows,)](
        tile,
        tile.stride(0),
        bias if bias is not None else tile,
        targets,
        stats.max,
        stats.sum_exp,
        stats.x_sum_exp,
        stats.sq_sum_exp,
        stats.z_sum,
        stats.best_before,
        stats.target_z,
        vocab_start,
        cols,
        float(transform.logit_scale),
        float(transform.softcap or 1.0),
        1.0 / float(transform.temperature),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=transform.softcap is not None,
        WANT_ENTROPY=want_entropy,
        WANT_TOP1=want_top1,
        WANT_MEAN=want_mean,
        WANT_SQ=want_sq,
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )


def fold_softmax_stats_reference(
    tile: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    stats: SoftmaxStats,
    vocab_start: int,
    transform: LogitTransform,
    want: tuple[bool, bool, bool, bool],
) -> None:
    """Torch version of :func:`fold_softmax_stats` (the whole tile at once), for tests and debugging."""
    want_entropy, want_top1, want_mean, want_sq = want
    raw = tile.float() + (bias.float() if bias is not None else 0.0)
    z = transform.apply(raw)  # [rows, cols]
    cols = torch.arange(z.shape[1], device=z.device)
    local = (targets - vocab_start).unsqueeze(-1)  # [rows, 1]
    new_m = torch.maximum(stats.max, z.amax(-1))
    rescale = torch.exp(stats.max - new_m)
    e = torch.exp(z - new_m.unsqueeze(-1))
    if want_entropy:
        old_shift = torch.where(stats.sum_exp > 0, stats.max - new_m, torch.zeros_like(new_m))
        x = rescale * (stats.x_sum_exp + old_shift * stats.sum_exp) + (e * (z - new_m.unsqueeze(-1))).sum(-1)
        stats.x_sum_exp.copy_(x)
    if want_sq:
        stats.sq_sum_exp.copy_(stats.sq_sum_exp * rescale**2 + (e * e).sum(-1))
    stats.sum_exp.copy_(stats.sum_exp * rescale + e.sum(-1))
    stats.max.copy_(new_m)
    if want_mean:
        stats.z_sum.add_(z.sum(-1))
    stats.target_z.add_(torch.where(cols == local, z, torch.zeros_like(z)).sum(-1))
    if want_top1:
        before = torch.where(cols < local, z, torch.full_like(z, float("-inf"))).amax(-1)
        stats.best_before.copy_(torch.maximum(stats.best_before, before))
