"""Triton device functions for the logit transform of
:class:`lightning_llm.kernels.logit_transform.LogitTransform`."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """``tanh(x) = sign(x) (1 - e) / (1 + e)`` with ``e = exp(-2|x|)``: no overflow, exact saturation."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def transform_logits(raw, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """``z = (softcap * tanh(s y / softcap) if softcap else s y) / T`` in fp32, ``raw`` = ``y``."""
    # Scalars may arrive as fp64 under torch.compile; keep the arithmetic in fp32
    z = raw * tl.cast(logit_scale, tl.float32)
    if HAS_SOFTCAP:
        cap = tl.cast(softcap, tl.float32)
        z = cap * tanh(z / cap)
    return z * tl.cast(inv_temperature, tl.float32)


@triton.jit
def transform_grad(grad_z, raw, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """``dL/dy`` from ``dL/dz``: ``(s / T) (1 - tanh^2(s y / softcap))`` times ``dL/dz``."""
    grad = grad_z * (tl.cast(logit_scale, tl.float32) * tl.cast(inv_temperature, tl.float32))
    if HAS_SOFTCAP:
        t = tanh(raw * tl.cast(logit_scale, tl.float32) / tl.cast(softcap, tl.float32))
        grad = grad * (1.0 - t * t)
    return grad


@triton.jit
def load_raw_logits(row_ptr, bias_ptr, cols, in_chunk, HAS_BIAS: tl.constexpr):
    """One block of a row's raw logits ``y`` (plus the head bias) in fp32; 0 outside the chunk."""
    raw = tl.load(row_ptr + cols, mask=in_chunk, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + cols, mask=in_chunk, other=0.0).to(tl.float32)
    return raw


def block_size(n_cols: int, block: int | None) -> int:
    """The column block of the row kernels: ``block`` if given, else the next power of two up to 1024."""
    return block or min(1024, triton.next_power_of_2(max(n_cols, 16)))
