"""Writing the trained policy as a plain Hugging Face model: LoRA merged, optionally weight-merged with a target.

Weight merging (model soups / model merging) interpolates every floating-point tensor of the trained model ``θ``
with the same tensor of a target model ``θ'`` of the same architecture, with weight ``t``:

- ``linear``: ``(1 − t)·θ + t·θ'``;
- ``slerp``: spherical interpolation of the flattened tensors, ``sin((1 − t)Ω)/sin Ω · θ + sin(tΩ)/sin Ω · θ'``
  with ``Ω`` the angle between them; near-parallel (or anti-parallel) and zero tensors, where the angle is
  ill-conditioned, fall back to ``linear`` (as mergekit does, which TRL's callback calls; the maths here is ours).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from lightning_llm.models.export import build_replica, plain_model, policy_state_dict, save_hf

log = logging.getLogger(__name__)

MERGE_METHODS = ("linear", "slerp")
MERGE_AT = ("end", "every_checkpoint")


def linear_merge(tensor: Tensor, target: Tensor, weight: float) -> Tensor:
    """``(1 − weight)·tensor + weight·target``, in ``tensor``'s dtype (computed in float32 at least)."""
    compute = torch.promote_types(tensor.dtype, torch.float32)
    merged = torch.lerp(tensor.to(compute), target.to(compute), weight)
    return merged.to(tensor.dtype)


def slerp(tensor: Tensor, target: Tensor, weight: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical linear interpolation from ``tensor`` (``weight`` 0) to ``target`` (``weight`` 1), flattened.

    Falls back to :func:`linear_merge` where ``|cos Ω| > dot_threshold`` (near-parallel vectors: ``sin Ω ≈ 0``) or
    either tensor has norm below ``eps``.
    """
    compute = torch.promote_types(tensor.dtype, torch.float32)
    v0, v1 = tensor.to(compute), target.to(compute)
    # The angle is taken in float64: its cosine is close to 1 for the similar tensors merging is used on.
    norm0, norm1 = v0.double().norm().item(), v1.double().norm().item()
    if norm0 < eps or norm1 < eps:
        return linear_merge(tensor, target, weight)
    cos_omega = (v0.double().flatten() @ v1.double().flatten()).item() / (norm0 * norm1)
    cos_omega = max(-1.0, min(1.0, cos_omega))
    if abs(cos_omega) > dot_threshold:
        return linear_merge(tensor, target, weight)
    omega = math.acos(cos_omega)
    sin_omega = math.sin(omega)
    scale0 = math.sin((1.0 - weight) * omega) / sin_omega
    scale1 = math.sin(weight * omega) / sin_omega
    return (scale0 * v0 + scale1 * v1).to(tensor.dtype)


def merge_state_dicts(state: dict[str, Tensor], target: dict[str, Tensor], method: str = "linear",
                      weight: float = 0.5, dot_threshold: float = 0.9995) -> dict[str, Tensor]:
    """Merge every floating-point tensor of ``state`` with the same-named tensor of ``target``.

    Non-floating tensors (integer buffers) are kept from ``state``. Raises a ``ValueError`` naming
    ``target_model`` when the two do not have the same tensor names and shapes.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {MERGE_METHODS}, got {method!r}")
    if set(state) != set(target):
        differing = sorted(set(state) ^ set(target))[:5]
        raise ValueError(f"target_model does not have the trained model's architecture: tensors {differing} are in "
                         "one but not the other")
    merged = {}
    for name, tensor in state.items():
        other = target[name]
        if other.shape != tensor.shape:
            raise ValueError(f"target_model's {name} has shape {tuple(other.shape)}, the trained model's "
                             f"{tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            merged[name] = tensor
        elif method == "linear":
            merged[name] = linear_merge(tensor, other, weight)
        else:
            merged[name] = slerp(tensor, other, weight, dot_threshold)
    return merged


class MergeModelCallback(L.Callback):
    """Write the trained policy as a plain Hugging Face model: PEFT adapters merged into the base, and optionally
    weight-merged with a target model (see the module docstring for ``linear`` and ``slerp``).

    Writes ``output_dir`` when training ends (``merge_at="end"``), or ``output_dir/checkpoint-<step>`` at every
    ``every_n_checkpoints``-th checkpoint Lightning saves (``merge_at="every_checkpoint"``). Sharded policies are
    gathered first; global rank 0 writes.

    Args:
        output_dir: directory of the merged model.
        merge_at: ``end`` or ``every_checkpoint``.
        every_n_checkpoints: with ``every_checkpoint``, write at every n-th checkpoint.
        method: weight-merging method with ``target_model``: ``linear`` or ``slerp``.
        target_model: hub id, local directory or ``PreTrainedModel`` with the policy's architecture to merge the
            trained weights with; ``None`` writes the trained weights (LoRA merged) alone.
        weight: interpolation weight of ``target_model`` (0 keeps the trained weights, 1 gives the target's).
        dot_threshold: ``slerp`` falls back to linear interpolation where ``|cos Ω|`` exceeds this.
    """

    def __init__(
        self,
        output_dir: str,
        merge_at: str = "end",
        every_n_checkpoints: int = 1,
        method: str = "linear",
        target_model: str | PreTrainedModel | None = None,
        weight: float = 0.5,
        dot_threshold: float = 0.9995,
    ) -> None:
        if not output_dir:
            raise ValueError("output_dir must be a directory path")
        if merge_at not in MERGE_AT:
            raise ValueError(f"merge_at must be one of {MERGE_AT}, got {merge_at!r}")
        if every_n_checkpoints < 1:
            raise ValueError(f"every_n_checkpoints must be >= 1, got {every_n_checkpoints}")
        if method not in MERGE_METHODS:
            raise ValueError(f"method must be one of {MERGE_METHODS}, got {method!r}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        if not 0.0 < dot_threshold <= 1.0:
            raise ValueError(f"dot_threshold must be in (0, 1], got {dot_threshold}")
        if target_model is not None and not isinstance(target_model, (str, os.PathLike, PreTrainedModel)):
            raise ValueError(f"target_model must be a hub id, a path or a PreTrainedModel, got {type(target_model)}")
        self.output_dir = output_dir
        self.merge_at = merge_at
        self.every_n_checkpoints = every_n_checkpoints
        self.method = method
        self.target_model = target_model
        self.weight = weight
        self.dot_threshold = dot_threshold
        self._target_state: dict[str, Tensor] | None = None
        self._checkpoints_seen = 0
        self._last_checkpoint_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(output_dir=str(self.output_dir), merge_at=self.merge_at)

    def target_state(self) -> dict[str, Tensor]:
        """The target model's ``state_dict`` on CPU (loaded once)."""
        if self._target_state is None:
            if isinstance(self.target_model, nn.Module):
                model = self.target_model
            else:
                from lightning_llm.models.loading import load_model

                model = load_model(self.target_model)
            self._target_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return self._target_state

    def merge_and_save(self, trainer: L.Trainer, pl_module: L.LightningModule, directory: str | os.PathLike) -> Path:
        """Gather the policy, merge it, and write it to ``directory`` (all ranks call; rank 0 writes)."""
        state = policy_state_dict(trainer, pl_module)
        directory = Path(directory)
        if trainer.is_global_zero:
            model = plain_model(build_replica(pl_module.model, state))
            if self.target_model is not None:
                merged = merge_state_dicts(model.state_dict(), self.target_state(), self.method, self.weight,
                                           self.dot_threshold)
                model.load_state_dict(merged, strict=True)
            save_hf(model, directory, getattr(pl_module, "tokenizer", None))
            log.info("Wrote the merged model to %s", directory)
        if trainer.world_size > 1:
            trainer.strategy.barrier("merge_model")
        return directory

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.merge_at == "end":
            self.merge_and_save(trainer, pl_module, self.output_dir)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        step = trainer.global_step
        # Several checkpoint callbacks may save at the same step; that is one checkpoint here.
        if self.merge_at != "every_checkpoint" or step == self._last_checkpoint_step:
            return
        self._last_checkpoint_step = step
        self._checkpoints_seen += 1
        if self._checkpoints_seen % self.every_n_checkpoints == 0:
            self.merge_and_save(trainer, pl_module, Path(self.output_dir) / f"checkpoint-{step}")

    def state_dict(self) -> dict[str, Any]:
        return {"checkpoints_seen": self._checkpoints_seen, "last_checkpoint_step": self._last_checkpoint_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._checkpoints_seen = int(state_dict.get("checkpoints_seen", 0))
        self._last_checkpoint_step = int(state_dict.get("last_checkpoint_step", -1))
