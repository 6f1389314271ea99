"""Releasing cached accelerator memory between phases (e.g. after generation, before the training step)."""

from __future__ import annotations

import gc

import torch


def _cuda_present() -> bool:
    return torch.cuda.is_available()


def _mps_present() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def _xpu_present() -> bool:
    xpu = getattr(torch, "xpu", None)
    return xpu is not None and xpu.is_available()


def empty_cache() -> None:
    """Collect garbage, then return the caching allocator's free blocks of every present accelerator to the driver.

    Python's garbage collector runs first, so tensors only kept alive by reference cycles are freed before the caches
    are emptied. Unlike TRL's version (which empties only the first device type it finds), every present backend
    among CUDA (and ROCm), MPS and XPU is emptied; on a CPU-only machine only the collection runs.
    """
    gc.collect()
    if _cuda_present():
        torch.cuda.empty_cache()
    if _mps_present():
        torch.mps.empty_cache()
    if _xpu_present():
        torch.xpu.empty_cache()
