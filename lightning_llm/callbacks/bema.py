"""BEMA: bias-corrected exponential moving average of the policy's weights (Block & Zhang, 2025, arXiv:2508.00180).

With ``t`` the optimizer step, ``θ_t`` the trained weights and ``θ_0`` their snapshot at step ``update_after``::

    β_t   = max((ρ + γ·t)^(−κ), min_ema_multiplier)        EMA weight
    α_t   = (ρ + γ·t)^(−η)                                  bias-correction weight
    EMA_t = (1 − β_t)·EMA_{t−1} + β_t·θ_t                   (EMA starts at θ_0)
    BEMA_t = EMA_t + α_t·(θ_t − θ_0)

updated every ``φ`` steps after ``τ``. With a constant decay ``beta`` (``BEMACallback(beta=0.999)``), the EMA weight
is ``β_t = 1 − beta`` at every update instead (``EMA_t = beta·EMA_{t−1} + (1 − beta)·θ_t``, the usual EMA); the
bias correction is unchanged. Otherwise ``ρ`` = ``lag``, ``γ`` = ``multiplier``, ``κ`` = ``ema_power``, ``η`` =
``bias_power``, ``φ`` = ``update_freq``, ``τ`` = ``update_after``. As in TRL, ``t`` is the global step.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_llm.models.export import build_replica, export_like_module, policy_state_dict
from lightning_llm.models.sharding import fsdp1_root, full_parameters, named_parameters, read_full, write_full

log = logging.getLogger(__name__)


class BEMACallback(L.Callback):
    """Keeps a BEMA of the policy's trainable parameters, saves it in Hugging Face format at the end of training,
    and optionally validates with it.

    Only the policy (``pl_module.model``) is averaged, never a reference model; under PEFT the adapters are averaged
    and the saved model follows the module's export (``merge_adapters``: LoRA merged into the base, else adapters
    alone). The buffers live on ``device`` (CPU by default, sparing accelerator memory) and are saved in Lightning
    checkpoints, so a resumed run continues the same average. Under sharding, each update gathers the full
    trainable parameters (all ranks keep a full copy of the averages).

    Before the first update the BEMA weights are the snapshot ``θ_0`` (the weights when training starts, or at step
    ``update_after``).

    Args:
        update_freq: update the average every this many optimizer steps (``φ``).
        ema_power: power ``κ`` of the EMA weight; 0 disables the EMA (``β = 1``).
        bias_power: power ``η`` of the bias correction; large values turn it off, 0 keeps it at full strength.
        lag: offset ``ρ`` of the step count in both weights (a virtual starting age).
        update_after: burn-in ``τ``: steps before the snapshot ``θ_0`` is taken and averaging starts.
        multiplier: scale ``γ`` of the step count in both weights.
        min_ema_multiplier: floor of the EMA weight ``β``.
        device: device of the averaging buffers.
        save_dir: where to write the BEMA model (``save_pretrained``) when training ends; default
            ``<trainer.default_root_dir>/bema``.
        save: write the BEMA model when training ends.
        merge_adapters: with PEFT, merge the averaged adapters into the saved model; default: the module's
            ``merge_adapters`` setting (as ``export_hf``).
        evaluate_with_bema: validate with the BEMA weights (swapped in when validation starts, and out when it ends),
            so ``val/`` metrics and validation callbacks see the averaged model.
        beta: a constant EMA decay (the EMA keeps ``beta`` of itself and takes ``1 − beta`` of the new weights at
            each update), in place of the ``(ρ + γ·t)^(−κ)`` schedule, ``ema_power`` and ``min_ema_multiplier``;
            None = the schedule (TRL's BEMA).
    """

    def __init__(
        self,
        update_freq: int = 400,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: int = 10,
        update_after: int = 0,
        multiplier: float = 1.0,
        min_ema_multiplier: float = 0.0,
        device: str = "cpu",
        save_dir: str | None = None,
        save: bool = True,
        merge_adapters: bool | None = None,
        evaluate_with_bema: bool = False,
        beta: float | None = None,
    ) -> None:
        if update_freq < 1:
            raise ValueError(f"update_freq must be >= 1, got {update_freq}")
        if update_after < 0:
            raise ValueError(f"update_after must be >= 0, got {update_after}")
        if ema_power < 0:
            raise ValueError(f"ema_power must be >= 0, got {ema_power}")
        if bias_power < 0:
            raise ValueError(f"bias_power must be >= 0, got {bias_power}")
        if not 0.0 <= min_ema_multiplier <= 1.0:
            raise ValueError(f"min_ema_multiplier must be in [0, 1], got {min_ema_multiplier}")
        if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1):
            raise ValueError(f"beta must be None or a number in [0, 1), got {beta!r}")
        if multiplier <= 0:
            raise ValueError(f"multiplier must be positive, got {multiplier}")
        if lag + multiplier * (update_after + update_freq) <= 0:
            raise ValueError(f"lag ({lag}) + multiplier * step must be positive at the first update")
        self.update_freq = update_freq
        self.ema_power = ema_power
        self.bias_power = bias_power
        self.lag = lag
        self.update_after = update_after
        self.multiplier = multiplier
        self.min_ema_multiplier = min_ema_multiplier
        self.device = torch.device(device)
        self.save_dir = save_dir
        self.save = save
        self.merge_adapters = merge_adapters
        self.evaluate_with_bema = evaluate_with_bema
        self.beta = None if beta is None else float(beta)
        self.names: list[str] = []
        self.theta0: list[Tensor] = []
        self.ema: list[Tensor] = []
        self.bema: list[Tensor] = []
        self._last_step = -1
        self._swapped_out: list[Tensor] | None = None

    @property
    def state_key(self) -> str:
        # beta joins the key only when set, so checkpoints written before it existed still resume
        extra = {} if self.beta is None else {"beta": self.beta}
        return self._generate_state_key(update_freq=self.update_freq, ema_power=self.ema_power,
                                        bias_power=self.bias_power, lag=self.lag, update_after=self.update_after,
                                        **extra)

    # ------------------------------------------------------------------------------------------------ schedule
    def ema_beta(self, step: int) -> float:
        """EMA weight ``β_t = max((ρ + γ·t)^(−κ), min_ema_multiplier)``, or ``1 − beta`` with a constant decay."""
        if self.beta is not None:
            return 1.0 - self.beta
        return max((self.lag + self.multiplier * step) ** (-self.ema_power), self.min_ema_multiplier)

    def bema_alpha(self, step: int) -> float:
        """Bias-correction weight ``α_t = (ρ + γ·t)^(−η)``."""
        return (self.lag + self.multiplier * step) ** (-self.bias_power)

    # ---------------------------------------------------------------------------------------------- parameters
    @staticmethod
    def _trainable(pl_module: L.LightningModule) -> list[tuple[str, nn.Parameter]]:
        policy = getattr(pl_module, "model", None)
        if not isinstance(policy, nn.Module):
            raise ValueError(f"BEMACallback needs the policy in {type(pl_module).__name__}.model, found {policy!r}")
        params = named_parameters(policy, trainable_only=True)
        if not params:
            raise ValueError("BEMACallback: the policy has no trainable parameters to average")
        return params

    def _read_trainable(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[tuple[str, Tensor]]:
        """Full values of the trainable parameters, copied onto ``device``."""
        params = self._trainable(pl_module)
        with full_parameters([pl_module.model], root=fsdp1_root(trainer)):
            return [(name, read_full(param).to(self.device, copy=True)) for name, param in params]

    def _write_trainable(self, trainer: L.Trainer, pl_module: L.LightningModule, values: list[Tensor]) -> None:
        params = self._trainable(pl_module)
        with full_parameters([pl_module.model], root=fsdp1_root(trainer), writeback=True):
            for (_, param), value in zip(params, values):
                write_full(param, value)

    @property
    def initialized(self) -> bool:
        return bool(self.names)

    @torch.no_grad()
    def snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take ``θ_0`` (and start the EMA and BEMA there) from the current weights."""
        current = self._read_trainable(trainer, pl_module)
        self.names = [name for name, _ in current]
        self.theta0 = [value for _, value in current]
        self.ema = [value.clone() for value in self.theta0]
        self.bema = [value.clone() for value in self.theta0]

    @torch.no_grad()
    def update(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """One BEMA update at optimizer step ``step`` from the current weights."""
        beta, alpha = self.ema_beta(step), self.bema_alpha(step)
        current = self._read_trainable(trainer, pl_module)
        self._check_names([name for name, _ in current])
        for (_, theta), theta0, ema, bema in zip(current, self.theta0, self.ema, self.bema):
            ema.mul_(1.0 - beta).add_(theta, alpha=beta)
            torch.add(ema, theta - theta0, alpha=alpha, out=bema)

    def _check_names(self, names: list[str]) -> None:
        if names != self.names:
            raise ValueError(
                "BEMACallback: the policy's trainable parameters changed since the average started "
                f"({len(self.names)} tracked, {len(names)} now)"
            )

    # --------------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run restored its buffers in load_state_dict; a fresh one snapshots the starting weights (θ_0
        # for update_after=0; a placeholder until step update_after otherwise).
        if not self.initialized:
            self.snapshot(trainer, pl_module)
        self._check_names([name for name, _ in self._trainable(pl_module)])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs on every micro-batch; act once per optimizer step.
        if step == self._last_step:
            return
        self._last_step = step
        if step < self.update_after:
            return
        if step == self.update_after:
            if step > 0:  # the step-0 snapshot was taken when training started
                self.snapshot(trainer, pl_module)
        elif (step - self.update_after) % self.update_freq == 0:
            self.update(trainer, pl_module, step)
            log.debug("BEMA updated at step %d", step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.evaluate_with_bema or trainer.sanity_checking or not self.initialized:
            return
        with torch.no_grad():
            self._swapped_out = [value for _, value in self._read_trainable(trainer, pl_module)]
            self._write_trainable(trainer, pl_module, self.bema)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped_out is None:
            return
        with torch.no_grad():
            self._write_trainable(trainer, pl_module, self._swapped_out)
        self._swapped_out = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Never leave the BEMA weights in the policy if validation was interrupted.
        self.on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save and self.initialized:
            self.save_bema(trainer, pl_module, self.save_dir or os.path.join(trainer.default_root_dir, "bema"))

    # ---------------------------------------------------------------------------------------------------- save
    def save_bema(self, trainer: L.Trainer, pl_module: L.LightningModule, directory: str | os.PathLike) -> Path:
        """Write the policy with its trainable weights replaced by the BEMA weights (rank 0; all ranks call)."""
        state = policy_state_dict(trainer, pl_module)
        directory = Path(directory)
        if trainer.is_global_zero:
            averaged = dict(zip(self.names, self.bema))
            missing = [name for name in self.names if name not in state]
            if missing:
                raise ValueError(f"BEMACallback: parameters {missing[:5]} are not in the policy's state_dict")
            # A tied parameter (e.g. embeddings shared with the LM head) appears under several state_dict names.
            for name, canonical in _parameter_aliases(pl_module.model).items():
                if canonical in averaged:
                    state[name] = averaged[canonical].to("cpu", state[name].dtype, copy=True)
            export_like_module(pl_module, build_replica(pl_module.model, state), directory, self.merge_adapters)
            log.info("Saved the BEMA model to %s", directory)
        if trainer.world_size > 1:
            trainer.strategy.barrier("bema_save")
        return directory

    # ---------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "theta0": self.theta0, "ema": self.ema, "bema": self.bema,
                "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.names = list(state_dict["names"])
        self.theta0 = [t.to(self.device) for t in state_dict["theta0"]]
        self.ema = [t.to(self.device) for t in state_dict["ema"]]
        self.bema = [t.to(self.device) for t in state_dict["bema"]]
        self._last_step = int(state_dict.get("last_step", -1))


def _parameter_aliases(module: nn.Module) -> dict[str, str]:
    """Every parameter name of ``module`` (tied ones included) → the first name of the same parameter."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in named_parameters(module, remove_duplicate=False):
        aliases[name] = first.setdefault(id(param), name)
    return aliases
