"""Reading and writing whole parameter values under every strategy Lightning offers.

Code that averages or mixes weights (BEMA, TR-DPO reference syncing, merging) needs each parameter's full value.
Under DDP and on one device a parameter *is* its full value. Under sharding it is not:

- FSDP2 (``ModelParallelStrategy``): parameters are ``DTensor``s; ``full_tensor()`` gathers one, and a full value is
  written back by keeping only this rank's shard of it;
- FSDP1 (``FSDPStrategy``): parameters are views of this rank's slice of a flat buffer; inside
  ``FullyShardedDataParallel.summon_full_params`` they hold full values (and with ``writeback`` the changes persist);
- DeepSpeed ZeRO-3: parameters are empty placeholders; inside ``deepspeed.zero.GatheredParameters`` they hold full
  values (with a ``modifier_rank``, that rank's changes are broadcast on exit).

Every rank must run these helpers together, in the same order: each gather is a collective.
"""

from __future__ import annotations

import types
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

# Wrapper prefixes that FSDP1 auto-wrapping, activation checkpointing and torch.compile insert into parameter names.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """``name`` without the segments that wrappers insert, i.e. the name in the unwrapped model's ``state_dict``."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor parallel)."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "placements")


def read_full(tensor: Tensor) -> Tensor:
    """The full value of a parameter or buffer (a collective for a ``DTensor``); detached, on its own device."""
    tensor = tensor.detach()
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local_shard(full: Tensor, like: Tensor) -> Tensor:
    """This rank's piece of ``full`` laid out as the ``DTensor`` ``like`` is (``full`` is identical on all ranks)."""
    from torch.distributed.tensor import distribute_tensor

    local = like.to_local()
    return distribute_tensor(full.to(local.device, local.dtype), like.device_mesh, like.placements).to_local()


@torch.no_grad()
def write_full(param: Tensor, value: Tensor) -> None:
    """Set ``param`` to the full ``value`` (for a ``DTensor``, to this rank's shard of it)."""
    if is_dtensor(param):
        param.to_local().copy_(local_shard(value, param))
    else:
        param.data.copy_(value.to(param.device, param.dtype))


#: what :func:`strategy_kind` returns for the strategies that shard or own the parameters
SHARDING_KINDS = ("fsdp1", "fsdp2", "deepspeed")


def strategy_kind(trainer: Any) -> str:
    """``"fsdp1"`` (Lightning's ``FSDPStrategy``), ``"fsdp2"`` (``ModelParallelStrategy``), ``"deepspeed"``
    (``DeepSpeedStrategy``), or ``""`` for any other strategy or no trainer; subclasses count as their base."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return ""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    for kind, cls in (("fsdp1", FSDPStrategy), ("fsdp2", ModelParallelStrategy), ("deepspeed", DeepSpeedStrategy)):
        if isinstance(strategy, cls):
            return kind
    return ""


def fsdp1_root(trainer: Any) -> nn.Module | None:
    """The FSDP1 module that Lightning's ``FSDPStrategy`` wrapped around the LightningModule, else ``None``.

    Parameters held by the root's own flat buffer (typically embeddings, final norm) are gathered only through the
    root, so weight-level callbacks pass it to :func:`full_parameters`.
    """
    wrapped = getattr(getattr(trainer, "strategy", None), "model", None)
    return wrapped if _is_fsdp1(wrapped) else None


def fsdp1_generation_context(root: nn.Module | None) -> AbstractContextManager[Any]:
    """The context in which a model inside the FSDP1 ``root`` can run ``generate`` (``synced_gpus`` on).

    ``generate`` calls the inner model, never the root's forward, so the root unit's own parameters (typically
    embeddings, final norm, head) must be full, while each nested unit (a decoder layer) gathers its own in its
    forward. Inside the root's forward (a ``training_step`` or ``validation_step`` under Lightning's
    ``FSDPStrategy``, which runs in the wrapped module's forward) the root's parameters are already full, and FSDP
    forbids summoning there: nothing to do. Outside it (a callback, a script) they are summoned, the root unit's only,
    as TRL does for FSDP1; summoning every unit (``recurse=True``) breaks, since the nested units' forwards reshard
    inside the summon. ``root=None``: nothing to do.
    """
    if root is None:
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._common_utils import TrainingState

    if getattr(root, "training_state", TrainingState.IDLE) != TrainingState.IDLE:
        return nullcontext()  # inside the root's forward: its parameters are unsharded already
    return FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False)


def _is_fsdp1(module: Any) -> bool:
    if not isinstance(module, nn.Module):
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def _contains_fsdp1(module: nn.Module) -> bool:
    return any(_is_fsdp1(child) for child in module.modules())


def _is_zero3(param: Tensor) -> bool:
    # DeepSpeed tags every ZeRO-3 partitioned parameter with an id.
    return hasattr(param, "ds_id")


@contextmanager
def full_parameters(modules: Sequence[nn.Module], *, root: nn.Module | None = None,
                    writeback: bool = False) -> Iterator[None]:
    """Inside, the FSDP1 and ZeRO-3 parameters of ``modules`` hold their full values.

    ``DTensor`` parameters are untouched: read them with :func:`read_full`, write with :func:`write_full`.

    Args:
        modules: the modules whose parameters are read or written.
        root: the FSDP1 root wrapping them (see :func:`fsdp1_root`); when given, gathering goes through it.
        writeback: keep changes made to the gathered parameters (every rank must make the same changes).
    """
    with ExitStack() as stack:
        fsdp_targets = [root] if root is not None else [m for m in modules if _contains_fsdp1(m)]
        if fsdp_targets:
            from torch.distributed.fsdp import FullyShardedDataParallel

            for target in fsdp_targets:
                stack.enter_context(FullyShardedDataParallel.summon_full_params(target, writeback=writeback))
        zero3 = [p for m in modules for p in m.parameters() if _is_zero3(p)]
        if zero3:
            import deepspeed

            # Every rank computes the same values; rank 0's are broadcast when the context closes.
            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if writeback else None))
        yield


def named_parameters(module: nn.Module, *, trainable_only: bool = False,
                     remove_duplicate: bool = True) -> list[tuple[str, nn.Parameter]]:
    """``(clean name, parameter)`` pairs of ``module`` in registration order, optionally only trainable ones."""
    return [
        (clean_name(name), param)
        for name, param in module.named_parameters(remove_duplicate=remove_duplicate)
        if param.requires_grad or not trainable_only
    ]


def full_state_dict(module: nn.Module, *, root: nn.Module | None = None, keep: bool = True) -> dict[str, Tensor]:
    """The ``state_dict`` of ``module`` with full values, as fresh CPU tensors, under any strategy.

    Gathers parameters one at a time (collectives: all ranks call this together). Tied parameters appear under every
    name, as in ``state_dict``. With ``keep=False`` the rank takes part in the gathers but keeps nothing (use on
    ranks that will not write anything, to spare their memory).
    """
    state: dict[str, Tensor] = {}
    with full_parameters([module], root=root):
        for name, tensor in _state_items(module):
            value = read_full(tensor)
            if keep:
                state[clean_name(name)] = value.to("cpu", copy=True)
    return state


def _state_items(module: nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters (tied ones under each name) and persistent buffers of ``module``: what ``state_dict`` holds.

    Listed by hand rather than through ``state_dict()`` because FSDP1 rewrites ``state_dict`` keys and values with
    its own hooks, which do not apply inside ``summon_full_params``.
    """
    items: list[tuple[str, Tensor]] = list(module.named_parameters(remove_duplicate=False))
    for prefix, submodule in module.named_modules(remove_duplicate=False):
        skip = getattr(submodule, "_non_persistent_buffers_set", set())
        for name, buffer in submodule.named_buffers(recurse=False):
            if buffer is not None and name not in skip:
                items.append((f"{prefix}.{name}" if prefix else name, buffer))
    return items


#: the method FSDP2 treats as a forward of a sharded model (see :func:`run_in_forward`)
_FORWARD_METHOD = "_lightning_llm_forward"


def shard_fsdp2(model: nn.Module, mesh: Any, **fully_shard_kwargs: Any) -> nn.Module:
    """``fully_shard`` (FSDP2) each transformer block of ``model`` (the classes its ``_no_split_modules`` names), then
    the whole model, over ``mesh``; ``model`` can then run code with its parameters gathered through
    :func:`run_in_forward`. Returns ``model`` (sharded in place)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from lightning_llm.models.parts import unwrap_model

    block_names = set(getattr(unwrap_model(model), "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"{type(unwrap_model(model)).__name__} names no transformer block to shard "
                         "(its _no_split_modules is empty)")
    for block in blocks:
        fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    object.__setattr__(model, _FORWARD_METHOD, types.MethodType(_call, model))
    register_fsdp_forward_method(model, _FORWARD_METHOD)
    return model


def _call(module: nn.Module, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return function(module, *args, **kwargs)


def run_in_forward(model: nn.Module, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(model, *args, **kwargs)``, as a forward of ``model`` when it is sharded with :func:`shard_fsdp2`.

    Code that uses the model's parts rather than its ``forward`` (the log-prob path runs the backbone, then the
    head on its own) needs this under FSDP2: the parameters of the model's own unit (the head, the embeddings) are
    gathered before and released after, and their gradients are reduced with the blocks' like in a forward.
    """
    method = getattr(model, _FORWARD_METHOD, None)
    if method is None:
        return function(model, *args, **kwargs)
    return method(function, *args, **kwargs)


def is_sharded_fsdp2(model: nn.Module) -> bool:
    return getattr(model, _FORWARD_METHOD, None) is not None
