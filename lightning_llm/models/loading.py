"""Loading models and tokenizers from a hub id, a local directory, a tiny preset name, or an object."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_llm.models.presets import is_preset, tiny_model, tiny_tokenizer

log = logging.getLogger(__name__)

#: the architecture of a model object, as plain data: ``{"config": model.config.to_dict()}`` (see :func:`model_spec`)
ModelSpec = dict
ModelLike = str | os.PathLike | PreTrainedModel | ModelSpec
TokenizerLike = str | os.PathLike | PreTrainedTokenizerBase

_AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def auto_class(task: str) -> type:
    """The ``transformers`` auto class for ``task`` (causal_lm | sequence_classification | token_classification)."""
    if task not in _AUTO_CLASSES:
        raise ValueError(f"task must be one of {sorted(_AUTO_CLASSES)}, got {task!r}")
    return _AUTO_CLASSES[task]


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / ``"auto"`` / ``None`` to what ``from_pretrained`` takes."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


def model_name(model: ModelLike) -> str:
    """A printable name for ``model``: the id/path it came from, or its class name."""
    if isinstance(model, PreTrainedModel):
        return getattr(model.config, "_name_or_path", "") or type(model).__name__
    if isinstance(model, dict):
        return f"a {model.get('config', {}).get('model_type', 'model')} rebuilt from its config"
    return str(model)


def check_model_name(name: str, what: str = "model") -> str:
    """``name`` if it can name a model: an existing directory, a preset, or a hub id (``name`` or ``org/name``).

    Raises ``ValueError`` for a path that does not exist (naming it), and for a misspelled preset (with the nearest
    preset names), before anything tries the hub.
    """
    import difflib

    from lightning_llm.models.presets import PRESETS

    path = Path(name).expanduser()
    if path.is_dir() or is_preset(name):
        return name
    if path.exists():
        raise ValueError(f"{what}: {name!r} is a file; expected a directory written by save_pretrained, a preset "
                         f"({', '.join(sorted(PRESETS))}) or a hub id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ValueError(f"{what}: no such directory: {path.resolve()}")
    close = difflib.get_close_matches(name, sorted(PRESETS), n=3, cutoff=0.75)
    if close:
        raise ValueError(f"{what}: unknown preset {name!r}; did you mean {' or '.join(map(repr, close))}? The presets "
                         f"are {sorted(PRESETS)}")
    return name


def _from_hub(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    """``loader(name, **kwargs)``, an ``OSError`` from the hub turned into a ``ValueError`` naming ``name``."""
    try:
        return loader(name, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ValueError(f"{what}: {name!r} is not a local directory or preset, and could not be loaded from the "
                         f"Hugging Face Hub{offline}: {first}") from err


def model_spec(model: PreTrainedModel) -> ModelSpec:
    """What rebuilds ``model``'s architecture (with fresh weights): ``{"config": its config as JSON data}``.

    A module built from a model object stores this in its hyperparameters; ``load_from_checkpoint`` then rebuilds the
    architecture and loads the trained weights from the checkpoint.
    """
    return {"config": json.loads(model.config.to_json_string(use_diff=False))}


def _from_spec(spec: ModelSpec, task: str, dtype: torch.dtype | None, num_labels: int | None) -> PreTrainedModel:
    from transformers import AutoConfig

    if not isinstance(spec.get("config"), dict) or "model_type" not in spec["config"]:
        raise ValueError("a model given as a dict must be a model spec {'config': {... 'model_type': ...}} (what "
                         "lightning_llm.models.model_spec writes into checkpoints)")
    fields = dict(spec["config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if num_labels is not None:
        config.num_labels = num_labels
    model = auto_class(task).from_config(config)
    return model.to(dtype) if dtype is not None else model


def load_model(
    model: ModelLike,
    *,
    task: str = "causal_lm",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    num_labels: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Return a ``PreTrainedModel`` for ``model``.

    ``model`` is a ``PreTrainedModel`` (returned as is, cast to ``dtype`` if given), a local directory written by
    ``save_pretrained``, a tiny preset name (``tiny-llama``, ``tiny-qwen2``, ``tiny-gpt2``; offline, random init) or a
    hub id. For ``task="sequence_classification"`` a causal-LM checkpoint gets a freshly initialised score head with
    ``num_labels`` outputs (1 for reward models).

    Args:
        model: what to load.
        task: ``causal_lm``, ``sequence_classification`` or ``token_classification``.
        dtype: parameter dtype (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"``); default float32, which is
            what Lightning's mixed precision expects of the master weights.
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ...
        trust_remote_code: allow custom modelling code from the checkpoint (off by default).
        revision: hub revision.
        num_labels: number of classifier outputs for the classification tasks.
        model_kwargs: any other ``from_pretrained`` keyword.
    """
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if isinstance(model, PreTrainedModel):
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
        return model
    if isinstance(model, dict):
        return _from_spec(model, task, torch_dtype if isinstance(torch_dtype, torch.dtype) else None, num_labels)
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a hub id, a local path, a preset name or a PreTrainedModel, got {type(model)}")
    name = check_model_name(str(model))
    if not Path(name).is_dir() and is_preset(name):
        overrides = dict(kwargs)
        if attn_implementation is not None:
            overrides["_attn_implementation"] = attn_implementation
        return tiny_model(name, task=task, dtype=torch_dtype if isinstance(torch_dtype, torch.dtype) else None,
                          **overrides)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if revision is not None:
        kwargs["revision"] = revision
    return _from_hub(auto_class(task).from_pretrained, name, "model",
                     dtype=torch.float32 if torch_dtype is None else torch_dtype, trust_remote_code=trust_remote_code,
                     **kwargs)


def load_tokenizer(
    tokenizer: TokenizerLike | None,
    model: ModelLike | None = None,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    chat_template: str | None = None,
) -> PreTrainedTokenizerBase:
    """Return a tokenizer: ``tokenizer`` itself, or loaded from it, or (when ``None``) the one of ``model``.

    A tokenizer without a pad token gets its EOS token as pad (the TRL convention). ``chat_template`` (a Jinja string
    or a path to a ``.jinja`` file) replaces the tokenizer's own template. A tokenizer object handed in is never
    changed: when it needs either, a copy is returned.
    """
    source = tokenizer if tokenizer is not None else model
    if source is None:
        raise ValueError("Pass a tokenizer, or a model to take the tokenizer from.")
    handed = isinstance(source, PreTrainedTokenizerBase)
    if isinstance(source, dict):
        raise ValueError("The model is rebuilt from its config (it was given as an object) and its tokenizer has no "
                         "name to load it from; pass `tokenizer=` explicitly.")
    if handed:
        tok = source
    elif isinstance(source, PreTrainedModel):
        name = getattr(source.config, "_name_or_path", "")
        if not name:
            raise ValueError(
                "The model object carries no name to load its tokenizer from; pass `tokenizer=` explicitly."
            )
        tok = load_tokenizer(name, trust_remote_code=trust_remote_code, revision=revision)
    else:
        what = "tokenizer" if tokenizer is not None else "model"
        name = check_model_name(str(source), what)
        if not Path(name).is_dir() and is_preset(name):
            tok = tiny_tokenizer()
        else:
            kwargs = {"revision": revision} if revision is not None else {}
            tok = _declared_tokenizers_backend(name, kwargs)
            if tok is None:
                tok = _from_hub(AutoTokenizer.from_pretrained, name, what, trust_remote_code=trust_remote_code,
                                **kwargs)
    template = None
    if chat_template is not None:
        path = Path(chat_template)
        template = path.read_text() if path.suffix == ".jinja" and path.is_file() else chat_template
    needs_pad = tok.pad_token is None
    needs_template = template is not None and tok.chat_template != template
    if needs_pad and tok.eos_token is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set one of them.")
    if handed and (needs_pad or needs_template):
        tok = copy.deepcopy(tok)
    if needs_pad:
        tok.pad_token = tok.eos_token
    if needs_template:
        tok.chat_template = template
    return tok


def _declared_tokenizers_backend(directory: str, kwargs: dict[str, Any]) -> PreTrainedTokenizerBase | None:
    """Load a local directory whose ``tokenizer_config.json`` declares the generic ``TokenizersBackend`` with that
    class, or return ``None``.

    ``AutoTokenizer`` overrides the declared class for some model types (``qwen2``, ...) and rebuilds the tokenizer
    with that family's pre-tokenizer, so a tiny preset saved next to the shipped tokenizer would come back tokenizing
    differently from the way it was trained.
    """
    config_path = Path(directory) / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        declared = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError):
        return None
    backend = getattr(transformers, "TokenizersBackend", None)
    if declared != "TokenizersBackend" or backend is None:
        return None
    return backend.from_pretrained(directory, **kwargs)
