"""PEFT (LoRA and friends) for the policy: wrapping, detection, adapter switching, merging."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from torch import nn


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def to_peft_config(peft_config: Any, task_type: str = "CAUSAL_LM"):
    """A ``peft.PeftConfig`` from a config object or a plain dict (LoRA unless ``peft_type`` says otherwise).

    The dict form is what YAML configs give: ``{"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}``.
    """
    from peft import LoraConfig, PeftConfig, get_peft_config

    if isinstance(peft_config, PeftConfig):
        return peft_config
    if not isinstance(peft_config, dict):
        raise ValueError(f"peft_config must be a peft.PeftConfig or a dict, got {type(peft_config).__name__}")
    config = dict(peft_config)
    config.setdefault("task_type", task_type)
    if config["task_type"] in ("SEQ_CLS", "TOKEN_CLS"):
        # PEFT trains the fresh classification head in full (modules_to_save); "all-linear" must not also put LoRA
        # on it, which PEFT refuses.
        config.setdefault("exclude_modules", ["score", "classifier"])
    if "peft_type" in config:
        return get_peft_config(config)
    return LoraConfig(**config)


def check_peft_config(peft_config: Any, task_type: str = "CAUSAL_LM") -> None:
    """Build the ``peft.PeftConfig`` of ``peft_config`` once, to refuse a wrong field by name (with the nearest field
    names) when the module is made, not when training starts."""
    import dataclasses
    import difflib

    from peft import LoraConfig

    if isinstance(peft_config, dict):
        known = {f.name for f in dataclasses.fields(LoraConfig)} if "peft_type" not in peft_config else None
        unknown = sorted(set(peft_config) - known) if known is not None else []
        if unknown:
            aliases = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "modules": "target_modules"}
            hints = {name: [aliases[name]] if name in aliases else difflib.get_close_matches(name, sorted(known), n=2)
                     for name in unknown}
            text = "; ".join(f"{name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
                             for name, close in hints.items())
            raise ValueError(f"peft_config: unknown LoraConfig field {text}")
    try:
        to_peft_config(peft_config, task_type)
    except (TypeError, ValueError) as err:
        raise ValueError(f"peft_config: {err}") from err


def peft_config_dict(peft_config: Any) -> dict[str, Any]:
    """The fields of a ``peft.PeftConfig`` as plain data (what hyperparameters and YAML hold); ``to_peft_config``
    turns them back into the config."""
    import json

    if isinstance(peft_config, dict):
        return dict(peft_config)
    fields = peft_config.to_dict()
    return json.loads(json.dumps(fields, default=lambda value: sorted(value) if isinstance(value, (set, frozenset))
                                 else str(value)))


def apply_peft(model: nn.Module, peft_config: Any, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap ``model`` with fresh adapters from ``peft_config``; only the adapter weights stay trainable."""
    from peft import get_peft_model

    return get_peft_model(model, to_peft_config(peft_config, task_type))


def disabled_adapters(model: nn.Module):
    """Context manager running ``model`` without its adapters (the reference policy under PEFT); no-op otherwise."""
    if is_peft_model(model):
        return model.disable_adapter()
    return nullcontext()


@contextmanager
def merged_copy_state(model: nn.Module) -> Iterator[nn.Module]:
    """Yield the plain ``transformers`` model with adapters merged, restoring the adapters afterwards."""
    if not is_peft_model(model):
        yield model
        return
    model.merge_adapter()
    try:
        yield model.get_base_model()
    finally:
        model.unmerge_adapter()
