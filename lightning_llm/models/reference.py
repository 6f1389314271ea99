"""TR-DPO reference syncing (Gorbatovski et al., 2024, arXiv:2404.09656): the reference policy trails the policy.

Every ``sync_steps`` optimizer steps the reference moves towards the policy,
``θ_ref ← (1 − α)·θ_ref + α·θ``. ``α = 1`` is a hard update (the reference becomes a copy of the policy).
:class:`ReferenceSync` is the schedule, used by the preference modules (``sync_ref_model=True``) and by
:class:`~lightning_llm.callbacks.SyncRefModelCallback` alike; :func:`sync_reference` is one mix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_llm.models.sharding import full_parameters, is_dtensor, local_shard, named_parameters, read_full


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return float(alpha)


def _paired_parameters(ref_model: nn.Module, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``(reference, policy)`` parameter pairs, matched by name; raises unless both have the same parameters."""
    ref_params = named_parameters(ref_model)
    policy_params = dict(named_parameters(model))
    ref_names = [name for name, _ in ref_params]
    if set(ref_names) != set(policy_params):
        missing = sorted(set(ref_names) ^ set(policy_params))[:5]
        raise ValueError(
            "ref_model and model must have the same parameters (a frozen copy of the policy; a PEFT-wrapped policy "
            f"has no separate reference); names differing include {missing}"
        )
    pairs = []
    for name, ref_param in ref_params:
        policy_param = policy_params[name]
        if ref_param.shape != policy_param.shape:
            raise ValueError(f"ref_model.{name} has shape {tuple(ref_param.shape)} but model.{name} has shape "
                             f"{tuple(policy_param.shape)}")
        pairs.append((ref_param, policy_param))
    return pairs


def _mix(ref_param: Tensor, policy_param: Tensor, alpha: float) -> None:
    """``ref_param ← (1 − alpha)·ref_param + alpha·policy_param`` in place, on local shards where possible."""
    if is_dtensor(ref_param):
        ref_local = ref_param.to_local()
        same_layout = (is_dtensor(policy_param) and policy_param.device_mesh == ref_param.device_mesh
                       and policy_param.placements == ref_param.placements)
        # Identically sharded models mix shard by shard, with no communication.
        source = policy_param.to_local() if same_layout else local_shard(read_full(policy_param), ref_param)
    else:
        ref_local = ref_param.data
        source = read_full(policy_param)
    ref_local.mul_(1.0 - alpha).add_(source.to(ref_local.device, ref_local.dtype), alpha=alpha)


@torch.no_grad()
def sync_reference(ref_model: nn.Module, model: nn.Module, alpha: float, *, root: nn.Module | None = None) -> None:
    """Move ``ref_model`` towards ``model`` in place: ``θ_ref ← (1 − alpha)·θ_ref + alpha·θ`` (TR-DPO).

    Parameters are matched by name (wrapper prefixes ignored). Works on one device and under DDP (every rank mixes
    its identical replicas), FSDP2 (``DTensor``s: shard by shard when both models are sharded alike, else through the
    full policy tensor), FSDP1 (full parameters summoned, through ``root`` when given) and DeepSpeed ZeRO-3
    (parameters gathered). Every rank must call it.

    Args:
        ref_model: the reference model (updated).
        model: the policy (read only).
        alpha: mixing weight of the policy, in [0, 1].
        root: under Lightning's ``FSDPStrategy``, the FSDP module wrapping both models (``trainer.strategy.model``).
    """
    alpha = _check_alpha(alpha)
    if ref_model is None:
        raise ValueError("ref_model is None: there is no separate reference model to sync")
    pairs = _paired_parameters(ref_model, model)
    with full_parameters([ref_model, model], root=root, writeback=True):
        for ref_param, policy_param in pairs:
            _mix(ref_param, policy_param, alpha)


class ReferenceSync:
    """When to mix: after every ``sync_steps``-th optimizer step, once (gradient accumulation runs the batch-end hook
    on every micro-batch). Its state (the last step synced) is saved with the run so a resumed run syncs at the
    same steps.

    Args:
        sync_steps: optimizer steps between syncs (TR-DPO's τ).
        alpha: weight of the policy in the mix (TR-DPO's α); 1 copies the policy into the reference.
    """

    def __init__(self, sync_steps: int = 512, alpha: float = 0.6) -> None:
        if sync_steps < 1:
            raise ValueError(f"sync_steps must be >= 1, got {sync_steps}")
        self.sync_steps = sync_steps
        self.alpha = _check_alpha(alpha)
        self.last_step = -1

    def maybe_sync(self, step: int, ref_model: nn.Module, model: nn.Module, *, root: nn.Module | None = None) -> bool:
        """Mix ``model`` into ``ref_model`` if optimizer step ``step`` is a sync step not yet synced; every rank must
        call it. Returns whether it mixed."""
        if step == self.last_step or step == 0 or step % self.sync_steps != 0:
            return False
        self.last_step = step
        sync_reference(ref_model, model, self.alpha, root=root)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state.get("last_step", -1))


# ------------------------------------------------------------------------------------------ the frozen reference
#: where a module keeps its reference model, so its weights sit under this prefix in a state dict
REF_PREFIX = "ref_model."


def frozen_reference(source: Any, *, task: str = "causal_lm", load_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A frozen reference model: a copy of ``source`` (a model object), or loaded from it (an id, a directory, a
    preset); no gradient, eval mode, dropout off."""
    import copy

    from lightning_llm.models.loading import load_model
    from lightning_llm.utils.model import disable_dropout_in_model

    ref = copy.deepcopy(source) if isinstance(source, nn.Module) else load_model(source, task=task,
                                                                                 **(load_kwargs or {}))
    ref.requires_grad_(False)
    ref.eval()
    disable_dropout_in_model(ref)
    return ref


def drop_reference_weights(checkpoint: dict[str, Any]) -> None:
    """Leave a frozen reference's weights out of ``checkpoint`` (it is rebuilt from its source when loaded)."""
    state = checkpoint.get("state_dict", {})
    for key in [k for k in state if k.startswith(REF_PREFIX)]:
        del state[key]


def restore_reference_weights(checkpoint: dict[str, Any], ref_model: nn.Module | None) -> None:
    """Put the rebuilt reference's own weights into a ``checkpoint`` saved without them, so that a strict
    ``load_state_dict`` finds every key."""
    state = checkpoint.get("state_dict", {})
    if ref_model is not None and not any(k.startswith(REF_PREFIX) for k in state):
        for key, value in ref_model.state_dict().items():
            state[REF_PREFIX + key] = value
