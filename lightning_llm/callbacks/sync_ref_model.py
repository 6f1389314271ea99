"""TR-DPO reference syncing as a callback, for modules that do not do it themselves (``sync_ref_model=True`` does
it inside the preference modules); see :mod:`lightning_llm.models.reference`."""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_llm.models.reference import ReferenceSync, sync_reference
from lightning_llm.models.sharding import fsdp1_root

__all__ = ["SyncRefModelCallback", "sync_reference"]


class SyncRefModelCallback(L.Callback):
    """TR-DPO: every ``sync_steps`` optimizer steps, ``θ_ref ← (1 − alpha)·θ_ref + alpha·θ`` (arXiv:2404.09656).

    Needs a module with a separate frozen reference model in ``ref_model`` (e.g. ``DPOModule`` without PEFT). Under
    PEFT the reference is the policy with its adapters disabled, and reference-free losses have none; there is then
    nothing to sync and fitting raises a ``ValueError``. Defaults are TRL's ``ref_model_sync_steps`` and
    ``ref_model_mixup_alpha``.

    Args:
        sync_steps: optimizer steps between syncs (TR-DPO's τ).
        alpha: weight of the policy in the mix (TR-DPO's α); 1 copies the policy into the reference.
    """

    def __init__(self, sync_steps: int = 512, alpha: float = 0.6) -> None:
        self.schedule = ReferenceSync(sync_steps, alpha)
        self._module: L.LightningModule | None = None
        self._pending_reference: dict[str, Any] | None = None

    @property
    def sync_steps(self) -> int:
        return self.schedule.sync_steps

    @property
    def alpha(self) -> float:
        return self.schedule.alpha

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "ref_model", None) is None:
            raise ValueError(
                f"SyncRefModelCallback needs a separate reference model, but {type(pl_module).__name__}.ref_model is "
                "missing or None (a PEFT policy uses itself with adapters disabled as reference, and reference-free "
                "losses have none)"
            )
        self._module = pl_module
        if self._pending_reference is not None:
            # the module leaves its reference out of checkpoints (it rebuilds it from its source); the mixed one is here
            pl_module.ref_model.load_state_dict(self._pending_reference)
            self._pending_reference = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.schedule.maybe_sync(trainer.global_step, pl_module.ref_model, pl_module.model, root=fsdp1_root(trainer))

    def state_dict(self) -> dict[str, Any]:
        """When the reference has been mixed, its weights too: a resumed run continues from the mixed reference."""
        state = self.schedule.state_dict()
        ref_model = getattr(self._module, "ref_model", None)
        if ref_model is not None and self.schedule.last_step > 0:
            state["reference"] = {name: value.detach().clone() for name, value in ref_model.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)
        self._pending_reference = state_dict.get("reference")
