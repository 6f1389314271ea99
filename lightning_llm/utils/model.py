"""Model surgery helpers: dropout off, PEFT dtype casting, parameter counting under sharding, layer freezing."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

# Attribute names of the ModuleList holding a decoder's blocks across transformers architectures:
# `layers` (Llama, Qwen, Mistral, Gemma, OPT's decoder, GPT-NeoX), `h` (GPT-2, GPT-J, Falcon, BLOOM), `blocks`
# (MPT and several vision towers), `layer` (BERT-style encoders).
LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")

# TRL's names of the input/output embedding modules cast to bf16 by `peft_module_casting_to_bf16`.
BF16_MODULE_PATTERNS = ("lm_head", "embed_tokens", "wte", "wpe")


def disable_dropout_in_model(model: nn.Module, functional: bool = True) -> None:
    """Set every dropout probability of ``model`` to zero, in place.

    TRL zeroes the ``p`` of each ``torch.nn.Dropout`` module only. Many ``transformers`` attention layers (Llama,
    Qwen2, Mistral, ...) instead pass a float attribute such as ``attention_dropout`` to the functional dropout at
    forward time, so with ``functional=True`` (the default) those float attributes, any module attribute whose name
    ends in ``dropout``, are zeroed as well. ``functional=False`` restores TRL's behaviour.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if functional:
            rates = [name for name, value in vars(module).items() if name.endswith("dropout") and type(value) is float]
            for name in rates:
                setattr(module, name, 0.0)


def peft_module_casting_to_bf16(
    model: nn.Module, module_patterns: Sequence[str] = BF16_MODULE_PATTERNS
) -> dict[str, torch.dtype]:
    """Cast the modules of a (PEFT) model the way TRL does before bf16 training of adapters on a quantised base.

    Normalisation layers (``nn.LayerNorm`` instances and every module whose qualified name contains ``norm``) go to
    float32, for a stable normalisation; modules whose name contains one of ``module_patterns`` (TRL's
    ``lm_head``, ``embed_tokens``, ``wte``, ``wpe``) go to bfloat16 when their weight is float32. Add ``"score"`` to
    the patterns to cast a reward model's head too.

    Returns:
        The qualified name of every module that was cast, with its new dtype.
    """
    cast: dict[str, torch.dtype] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or "norm" in name:
            module.to(torch.float32)
            cast[name] = torch.float32
        elif any(pattern in name for pattern in module_patterns):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dtype == torch.float32:
                module.to(torch.bfloat16)
                cast[name] = torch.bfloat16
    return cast


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed`` DTensor (FSDP2, tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def _is_flat_param(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an FSDP1 ``FlatParameter`` (several original parameters flattened into one shard)."""
    return hasattr(tensor, "_numels") and hasattr(tensor, "_fqns")


def _fsdp1_original_numels(model: nn.Module) -> dict[int, int]:
    """``id(original parameter) -> its unsharded numel`` for FSDP1 with ``use_orig_params=True``.

    There every original parameter is a view of this rank's shard of a flat parameter, often with fewer elements
    (or none); the flat parameter, held by its FSDP wrapper, remembers each original numel.
    """
    numels: dict[int, int] = {}
    for module in model.modules():
        flat = getattr(module, "_flat_param", None)
        if flat is None or not _is_flat_param(flat) or getattr(flat, "_params", None) is None:
            continue
        for original, numel in zip(flat._params, flat._numels):
            numels[id(original)] = int(numel)
    return numels


def _global_numel(param: torch.Tensor, fsdp1_numels: dict[int, int]) -> int:
    """The number of elements of the whole (unsharded) parameter, whatever this rank holds of it."""
    if hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3: the local tensor is an empty placeholder
        return int(param.ds_numel)
    if _is_flat_param(param):  # FSDP1, use_orig_params=False: unpadded sum of the flattened originals
        return int(sum(param._numels))
    if id(param) in fsdp1_numels:  # FSDP1, use_orig_params=True: a view of this rank's shard
        return fsdp1_numels[id(param)]
    if _is_dtensor(param):  # FSDP2: the DTensor's shape is the global one
        return math.prod(param.shape)
    return param.numel()


def get_model_param_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those requiring grad with ``trainable_only``), counted unsharded.

    Correct on every rank under DeepSpeed ZeRO-3 (``ds_numel``), FSDP2 / tensor parallelism (DTensor global shape)
    and FSDP1 (flat parameters, with or without ``use_orig_params``). Shared (tied) parameters count once.
    """
    fsdp1_numels = _fsdp1_original_numels(model)
    total = 0
    for param in model.parameters():
        if trainable_only and not param.requires_grad:
            continue
        if _is_flat_param(param) and getattr(param, "_params", None) is not None:
            continue  # use_orig_params=True: the originals are (or will be) counted themselves
        total += _global_numel(param, fsdp1_numels)
    return total


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of the transformer blocks of ``model`` (PEFT wrappers included).

    A ``ModuleList`` attribute named ``layers``, ``h``, ``blocks`` or ``layer``; when there are several (a vision
    tower and a language model), the one beside the input embeddings.
    """
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name.rsplit(".", 1)[-1] in LAYER_LIST_NAMES
    ]
    if not candidates:
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__}: no ModuleList named one of "
            f"{LAYER_LIST_NAMES}. Select the parameters with name_patterns instead."
        )
    if len(candidates) == 1:
        return candidates[0]
    embeddings = _input_embeddings(model)
    if embeddings is not None:
        embedding_names = [name for name, module in model.named_modules() if module is embeddings]
        beside = [c for c in candidates if embedding_names and _parent_name(c[0]) == _parent_name(embedding_names[0])]
        if len(beside) == 1:
            return beside[0]
    raise ValueError(
        f"{type(model).__name__} has several layer lists ({[name for name, _ in candidates]}); "
        "select the parameters with name_patterns instead of layer_range."
    )


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    return getter() if callable(getter) else None


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _selected_layers(layers: nn.ModuleList, layer_range: Sequence[int | None]) -> list[nn.Module]:
    """``layers[start:stop]`` for ``layer_range = (start, stop)``, refusing ranges outside the model."""
    if isinstance(layer_range, range):
        if layer_range.step != 1:
            raise ValueError(f"layer_range must be contiguous, got {layer_range}")
        layer_range = (layer_range.start, layer_range.stop)
    if isinstance(layer_range, (str, bytes)) or not isinstance(layer_range, Sequence) or len(layer_range) != 2:
        raise ValueError(f"layer_range must be a (start, stop) pair, got {layer_range!r}")
    if any(bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)) for bound in layer_range):
        raise ValueError(f"layer_range bounds must be integers or None, got {layer_range!r}")
    start, stop = layer_range
    count = len(layers)
    for bound in (start, stop):
        if bound is not None and not -count <= bound <= count:
            raise ValueError(f"layer_range {tuple(layer_range)} is outside the model's {count} layers")
    selected = list(layers)[slice(start, stop)]
    if not selected:
        raise ValueError(f"layer_range {tuple(layer_range)} selects none of the model's {count} layers")
    return selected


def _compile_patterns(name_patterns: str | Iterable[str]) -> list[re.Pattern[str]]:
    patterns = [name_patterns] if isinstance(name_patterns, str) else list(name_patterns)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"name_patterns: {pattern!r} is not a valid regular expression ({error})") from error
    return compiled


def freeze_model_layers(
    model: nn.Module,
    layer_range: Sequence[int | None] | range | None = None,
    name_patterns: str | Sequence[str] | None = None,
    freeze_embeddings: bool = False,
    freeze_lm_head: bool = False,
) -> list[str]:
    """Set ``requires_grad=False`` on parts of a ``transformers`` model, e.g. to train only its top layers.

    Args:
        model: the model (PEFT / DDP wrappers are fine: the parts are found by module type and name).
        layer_range: ``(start, stop)``: freeze the transformer blocks ``layers[start:stop]`` (Python slice rules:
            ``stop`` excluded, negative counts from the end, ``None`` open). The block list is found generically
            (``model.layers``, ``transformer.h``, ...).
        name_patterns: regular expressions; every parameter whose qualified name matches one (``re.search``) is
            frozen. Each pattern must match at least one parameter.
        freeze_embeddings: freeze the input token embeddings and any other ``nn.Embedding`` outside the blocks
            (GPT-2's learned positions).
        freeze_lm_head: freeze the output head. With tied embeddings this freezes the shared matrix.

    Returns:
        The qualified names (as in ``model.named_parameters()``) of the parameters selected, now all frozen.
    """
    selected: set[int] = set()

    def select(params: Iterable[torch.Tensor]) -> None:
        selected.update(id(param) for param in params)

    if layer_range is not None:
        _, layers = find_decoder_layers(model)
        for block in _selected_layers(layers, layer_range):
            select(block.parameters())
    if name_patterns is not None:
        named = list(model.named_parameters())
        for pattern in _compile_patterns(name_patterns):
            matches = [param for name, param in named if pattern.search(name)]
            if not matches:
                raise ValueError(f"name_patterns: {pattern.pattern!r} matches no parameter of the model")
            select(matches)
    if freeze_embeddings:
        embeddings = _input_embeddings(model)
        if embeddings is not None:
            select(embeddings.parameters())
        try:
            _, layers = find_decoder_layers(model)
            inside_layers = {id(module) for module in layers.modules()}
        except ValueError:
            inside_layers = set()
        for module in model.modules():
            if isinstance(module, nn.Embedding) and id(module) not in inside_layers:
                select(module.parameters())
    if freeze_lm_head:
        head = _output_embeddings(model)
        if head is None:
            raise ValueError(f"freeze_lm_head: {type(model).__name__} has no output embeddings (LM head)")
        select(head.parameters())
        embeddings = _input_embeddings(model)
        tied = embeddings is not None and any(
            head_param is embed_param for head_param in head.parameters() for embed_param in embeddings.parameters()
        )
        if tied and not freeze_embeddings:
            log.warning("The LM head is tied to the input embeddings: freezing the head freezes the embeddings too.")

    frozen = []
    for name, param in model.named_parameters():
        if id(param) in selected:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
