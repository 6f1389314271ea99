"""The logit transform and fp32-accumulating matmuls shared by every log-prob implementation.

Models differ in what they do to the raw head output ``y = hidden @ weight.T (+ bias)`` before the softmax:
Cohere-style models multiply by a ``logit_scale``, Gemma-2/3 soft-cap with ``softcap * tanh(y / softcap)``
(Gemma 2 report, Team Gemma 2024), and sampling divides by a ``temperature``. :class:`LogitTransform` applies
them in that order and back-propagates through them, so the chunked torch path, the Triton path and the eager
reference agree by construction.

It lives with the kernels (which take its plain fields) in a module that does not import Triton, so that the torch
paths of :mod:`lightning_llm.ops` import it from below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LogitTransform", "matmul_f32", "addmm_f32_", "mm_operand", "has_mm_out_dtype"]


def has_mm_out_dtype() -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` exists (torch >= 2.8, CUDA bf16/fp16 operands)."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (2, 8)


_MM_OUT_DTYPE = has_mm_out_dtype()


@dataclass(frozen=True)
class LogitTransform:
    """``z = (softcap * tanh(logit_scale * y / softcap) if softcap else logit_scale * y) / temperature``.

    ``y`` are the raw logits of the head; ``z`` the ones the softmax sees. Every value is a plain float so the
    object can be passed to kernels and stored on an autograd context.
    """

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be None or > 0, got {self.softcap!r}")
        if not (self.logit_scale == self.logit_scale and abs(self.logit_scale) != float("inf")):
            raise ValueError(f"logit_scale must be a finite number, got {self.logit_scale!r}")

    @property
    def is_identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None and self.temperature == 1.0

    def apply(self, raw: Tensor) -> Tensor:
        """``z`` from the raw logits ``y`` (any shape, fp32 expected)."""
        if self.is_identity:
            return raw
        z = raw * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature

    def backward(self, grad_z: Tensor, raw: Tensor) -> Tensor:
        """``dL/dy`` from ``dL/dz`` by the chain rule; ``d(c tanh(s y / c))/dy = s (1 - tanh^2(s y / c))``."""
        if self.is_identity:
            return grad_z
        grad = grad_z * (self.logit_scale / self.temperature)
        if self.softcap is not None:
            tanh = torch.tanh(raw * (self.logit_scale / self.softcap))
            grad = grad * (1.0 - tanh * tanh)
        return grad


def _cuda_low_precision(a: Tensor, compute_dtype: torch.dtype) -> bool:
    return a.device.type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16)


def mm_operand(tensor: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """``tensor`` in the dtype :func:`matmul_f32` multiplies in, so a loop can cast once instead of per call."""
    if _cuda_low_precision(tensor, compute_dtype):
        return tensor.to(compute_dtype)
    return tensor.float()


def matmul_f32(a: Tensor, b: Tensor, compute_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``a @ b`` as fp32, with fp32 accumulation whatever the operands' dtypes.

    On CUDA with bf16/fp16 ``compute_dtype`` the operands go through the tensor cores in that dtype and the
    product is written in fp32 (``out_dtype``), so logits are not rounded to 8 mantissa bits. Elsewhere the
    operands are promoted to fp32 (on CPU there is no speed to win by keeping them narrow).
    """
    if not _cuda_low_precision(a, compute_dtype):
        a, b = a.float(), b.float()
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    a, b = a.to(compute_dtype), b.to(compute_dtype)
    if not _MM_OUT_DTYPE:  # torch < 2.8: one rounding of the product, still fp32 accumulation inside the GEMM
        product = torch.mm(a, b).float()
        return product if out is None else out.copy_(product)
    if out is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def addmm_f32_(acc: Tensor, a: Tensor, b: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """``acc += a @ b`` for an fp32 ``acc``, without rounding the product to ``compute_dtype`` first.

    Rounding each chunk's product to bf16 before summing biases long training runs (TRL's notes on its chunked
    log-prob make the same observation), hence the fp32 output path on CUDA.
    """
    if _cuda_low_precision(a, compute_dtype):
        a, b = a.to(compute_dtype), b.to(compute_dtype)
        if _MM_OUT_DTYPE:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return acc.add_(torch.mm(a, b).float())
    return acc.addmm_(a.float(), b.float())
