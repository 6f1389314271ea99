"""Writing a policy, or weights derived from it, in Hugging Face format (the module's export, and callbacks').

The live policy may be sharded, wrapped and on an accelerator, and must not be disturbed (merging LoRA in place and
back out is not exact in floating point). So the writers gather a full CPU ``state_dict`` (:func:`full_state_dict`),
edit it, and load it into a CPU *replica*: the same architecture (and adapters) built on the meta device, whose
tensors become the state's own (``assign=True``): no random initialisation, no second copy.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_llm.models.parts import unwrap_model
from lightning_llm.models.peft import is_peft_model
from lightning_llm.models.sharding import clean_name, fsdp1_root, full_state_dict

log = logging.getLogger(__name__)


def policy_state_dict(trainer: Any, pl_module: Any) -> dict[str, Tensor]:
    """Full CPU ``state_dict`` of ``pl_module.model`` (adapters included) on global rank 0; empty on other ranks.

    All ranks must call it (under sharding it gathers).
    """
    return full_state_dict(pl_module.model, root=fsdp1_root(trainer), keep=trainer.is_global_zero)


def build_replica(policy: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A CPU model with ``policy``'s architecture and PEFT adapters, holding the tensors of ``state``.

    ``state`` must have exactly ``policy``'s ``state_dict`` keys. Non-persistent buffers (rotary frequencies and
    the like) are copied from ``policy``.
    """
    base = unwrap_model(policy)
    with torch.device("meta"):
        replica: nn.Module = type(base)(copy.deepcopy(base.config))
    if is_peft_model(policy):
        from peft import get_peft_model

        adapter = policy.active_adapter
        replica = get_peft_model(replica, copy.deepcopy(policy.peft_config[adapter]), adapter_name=adapter)
    replica.load_state_dict(state, strict=True, assign=True)
    if hasattr(replica, "tie_weights"):
        replica.tie_weights()
    _fill_meta_buffers(replica, policy)
    return replica.eval()


def _fill_meta_buffers(replica: nn.Module, policy: nn.Module) -> None:
    sources = {clean_name(name): buffer for name, buffer in policy.named_buffers()}
    for module_name, module in replica.named_modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is None or not buffer.is_meta:
                continue
            full_name = f"{module_name}.{name}" if module_name else name
            source = sources.get(full_name)
            if source is None:
                raise ValueError(f"Cannot rebuild buffer {full_name!r} of the exported model: the policy has none")
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, source.detach().to("cpu", copy=True), persistent=persistent)


def plain_model(replica: nn.Module) -> nn.Module:
    """``replica`` with its PEFT adapters merged into the base weights (the replica itself when it has none)."""
    return replica.merge_and_unload() if is_peft_model(replica) else replica


def save_hf(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """``save_pretrained`` of ``model`` (and ``tokenizer``) into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    log.info("Wrote %s to %s", type(model).__name__, directory)
    return directory


def export_like_module(pl_module: Any, replica: nn.Module, directory: str | Path,
                       merge_adapters: bool | None = None) -> Path:
    """Write ``replica`` the way ``pl_module.export_hf`` writes the policy: merged LoRA, or the adapters alone when
    ``merge_adapters`` (default: the module's ``merge_adapters`` setting) is false."""
    merge = getattr(pl_module, "merge_adapters", True) if merge_adapters is None else merge_adapters
    model = plain_model(replica) if merge else replica
    return save_hf(model, directory, getattr(pl_module, "tokenizer", None))
