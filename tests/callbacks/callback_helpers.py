"""Pieces shared by the callback tests and the DDP script they launch (imported as ``callback_helpers``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from lightning_llm import SFTDataModule, SFTModule


def sft_data(batch_size: int = 8) -> SFTDataModule:
    """The shipped chat sample, 10% held out for validation."""
    return SFTDataModule("sample:messages", val_split=0.1, batch_size=batch_size, max_length=64)


class RefSFTModule(SFTModule):
    """``SFTModule`` with a frozen copy of the initial policy in ``ref_model`` (what a preference module has)."""

    def configure_model(self) -> None:
        super().configure_model()
        if getattr(self, "ref_model", None) is None:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()


def float64_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of ``module`` as float64 CPU copies."""
    return {name: param.detach().to("cpu", torch.float64, copy=True) for name, param in module.named_parameters()}


class PolicySnapshots(Callback):
    """Float64 copies of ``pl_module.model``'s parameters before training and after every optimizer step."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.by_step[trainer.global_step] = float64_state(pl_module.model)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.by_step[trainer.global_step] = float64_state(pl_module.model)
