"""empty_cache: collects reference cycles and empties every present accelerator's cache."""

from __future__ import annotations

import gc
import weakref

import torch

from lightning_llm.utils import memory
from lightning_llm.utils.memory import empty_cache


class _Node:
    def __init__(self) -> None:
        self.partner: _Node | None = None


def test_collects_reference_cycles() -> None:
    was_enabled = gc.isenabled()
    gc.disable()  # only empty_cache may collect the cycle
    try:
        first, second = _Node(), _Node()
        first.partner, second.partner = second, first
        alive = weakref.ref(first)
        del first, second
        assert alive() is not None
        empty_cache()
        assert alive() is None
    finally:
        if was_enabled:
            gc.enable()


def test_empties_every_present_backend(monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(memory, "_cuda_present", lambda: True)
    monkeypatch.setattr(memory, "_mps_present", lambda: True)
    monkeypatch.setattr(memory, "_xpu_present", lambda: False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("mps"))
    monkeypatch.setattr(torch.xpu, "empty_cache", lambda: calls.append("xpu"))
    empty_cache()
    assert calls == ["cuda", "mps"]
    monkeypatch.setattr(memory, "_cuda_present", lambda: False)
    monkeypatch.setattr(memory, "_mps_present", lambda: False)
    monkeypatch.setattr(memory, "_xpu_present", lambda: True)
    empty_cache()
    assert calls == ["cuda", "mps", "xpu"]


def test_runs_on_this_machine() -> None:
    # whatever devices are present, the real probes and calls work
    empty_cache()
    assert memory._cuda_present() == torch.cuda.is_available()
