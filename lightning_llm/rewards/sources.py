"""Reward sources: what turns a batch of completions into one reward each.

Three kinds, each a :class:`RewardSource` with a ``name`` (the metric name ``rewards/<name>/mean``):

- :class:`FunctionReward`: a reward function with TRL 1.16's calling convention (sync or ``async``);
- :class:`RewardModelReward`: a sequence classifier with one output (a hub id, a local directory such as a
  ``RewardModule`` export, or a model object), scored as TRL's ``GRPOTrainer`` scores reward models;
- :class:`JudgeReward`: a binary judge of :mod:`lightning_llm.judges` (1 -> 1.0, 0 -> 0.0, -1 -> NaN).

:func:`resolve_reward_source` builds the right one from what a user or a YAML config names.
"""

from __future__ import annotations

import abc
import functools
import importlib
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_llm.judges.base import FAILED, BaseBinaryJudge, BasePairwiseJudge, BaseRankJudge
from lightning_llm.rewards._text import completion_text, conversation_plain_text, is_conversation

#: the keyword arguments every reward function is called with, besides the dataset columns
STANDARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")


class RewardError(ValueError):
    """A reward source failed or answered something that is not one reward per completion; the message names the
    source, the row where there is one, and what was expected."""


@dataclass(frozen=True)
class RewardBatch:
    """One generation step's completions with everything a reward source may read.

    Attributes:
        prompts: ``[N]`` prompts, strings or conversations (lists of messages), repeated per generation.
        completions: ``[N]`` completions: strings for string prompts, ``[{"role": "assistant", "content": text}]``
            for conversational prompts (TRL's shapes).
        completion_ids: ``[N]`` token ids of each completion (the policy's tokenizer).
        columns: every other dataset column of the rows, each a list of ``N`` values aligned with the completions.
        trainer_state: the training progress (a :class:`~lightning_llm.rewards.RewardState` or TRL-like object).
        log_metric: ``log_metric(name, value)`` records a scalar metric.
        log_extra: ``log_extra(column, values)`` adds a column (one value per completion) to the completions table.
    """

    prompts: list
    completions: list
    completion_ids: list
    columns: dict[str, list]
    trainer_state: Any
    log_metric: Callable[[str, float], None]
    log_extra: Callable[[str, list], None]

    def __len__(self) -> int:
        return len(self.completions)

    def call_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a reward function call; each column is a fresh list, so a function that
        changes its arguments does not change what the next function sees."""
        kwargs: dict[str, Any] = {
            "prompts": list(self.prompts), "completions": list(self.completions),
            "completion_ids": list(self.completion_ids), "trainer_state": self.trainer_state,
            "log_metric": self.log_metric, "log_extra": self.log_extra,
        }
        kwargs.update({column: list(values) for column, values in self.columns.items()})
        return kwargs


class RewardSource(abc.ABC):
    """Something that scores each completion of a :class:`RewardBatch`.

    Attributes:
        name: the source's name in metrics (``rewards/<name>/mean``) and messages.
        kind: what it is, for messages (``"reward function"``, ``"reward model"``, ``"judge"``).
        wrap_errors: whether an exception of the source becomes a RewardError naming it (user code: functions,
            judges) or passes through as it is (reward models: an out-of-memory error stays one).
    """

    name: str
    kind: str = "reward source"
    wrap_errors: bool = True

    @property
    def is_async(self) -> bool:
        """Whether the source is scored with :meth:`ascore` on the shared event loop (concurrently with the other
        async sources) instead of :meth:`score`."""
        return False

    @abc.abstractmethod
    def score(self, batch: RewardBatch) -> Sequence[Any]:
        """One reward per completion (a float, or ``None``/NaN where the source does not apply)."""

    async def ascore(self, batch: RewardBatch) -> Sequence[Any]:
        """The async counterpart of :meth:`score`, which sources with ``is_async`` override; a synchronous source
        scores as :meth:`score` does."""
        return self.score(batch)

    def describe(self) -> str:
        """How messages name the source: ``reward function 'accuracy_reward'``."""
        return f"{self.kind} {self.name!r}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# -- reward functions -----------------------------------------------------------------------------------------------


def callable_name(func: Callable) -> str:
    """TRL's name of a reward function: its ``__name__`` (through ``functools.partial``), else its class name (a
    callable object without ``__name__``)."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def is_async_callable(func: Callable) -> bool:
    """Whether calling ``func`` returns a coroutine: an ``async def`` function, a partial of one, or an object whose
    ``__call__`` is ``async``."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


def _signature(func: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):  # some builtins and C callables have none: they are called unchecked
        return None


class FunctionReward(RewardSource):
    """A reward function, called as TRL 1.16 calls it::

        func(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_metric=..., log_extra=...,
             **columns)

    and answering one float per completion, or ``None`` where it does not apply (NaN in the rewards). ``async def``
    functions (and objects with an async ``__call__``) are awaited concurrently with the other async sources.

    Args:
        func: the function (or callable object, or ``functools.partial``).
        name: the metric name; default TRL's (:func:`callable_name`).

    Raises:
        ValueError: ``func`` is not callable, or cannot be a reward function (it takes none of the standard
            arguments and no ``**kwargs``: typically a factory such as ``get_soft_overlong_punishment`` that was not
            called).
    """

    kind = "reward function"

    def __init__(self, func: Callable, name: str | None = None) -> None:
        if not callable(func):
            raise ValueError(f"a reward function must be callable, got {func!r} ({type(func).__name__})")
        self.func = func
        self.name = name if name is not None else callable_name(func)
        self.signature = _signature(func)
        self._async = is_async_callable(func)
        if self.signature is not None and not self._accepts_any_keyword():
            accepted = set(self.signature.parameters)
            if not accepted & {"prompts", "completions", "completion_ids"}:
                raise ValueError(
                    f"{self.describe()} cannot be a reward function: its signature {self.signature} takes none of "
                    f"{list(STANDARD_ARGUMENTS)} and no **kwargs. If it makes reward functions (like "
                    f"get_soft_overlong_punishment), call it and pass what it returns."
                )

    @property
    def is_async(self) -> bool:
        return self._async

    def _accepts_any_keyword(self) -> bool:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self.signature.parameters.values())

    def _arguments(self, batch: RewardBatch) -> dict[str, Any]:
        """The call's keyword arguments, checked against the function's signature so that a function that cannot
        take them fails naming the argument, before it runs."""
        kwargs = batch.call_kwargs()
        if self.signature is not None:
            try:
                self.signature.bind(**kwargs)
            except TypeError as error:
                raise RewardError(
                    f"{self.describe()} cannot be called with the arguments reward functions get ({error}). It is "
                    f"called with {list(STANDARD_ARGUMENTS)} and the dataset columns {sorted(batch.columns)}; give it "
                    f"a **kwargs parameter to accept the ones it does not read."
                ) from error
        return kwargs

    def score(self, batch: RewardBatch) -> Any:
        # A sync-looking callable may still return an awaitable; compute_rewards awaits it on the event loop.
        return self.func(**self._arguments(batch))

    async def ascore(self, batch: RewardBatch) -> Sequence[Any]:
        return await self.func(**self._arguments(batch))


# -- reward models --------------------------------------------------------------------------------------------------


def model_source_name(model: nn.Module) -> str:
    """TRL's name of a reward model: the last ``/``-component of the id or path it was loaded from
    (``config._name_or_path``; a trailing slash ignored), else its class name."""
    name_or_path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return name_or_path.rstrip("/").split("/")[-1] or type(model).__name__


class RewardModelReward(RewardSource):
    """A sequence classifier with one output as a reward source, scored as TRL's ``GRPOTrainer`` scores reward
    models: each prompt + completion is rendered with the reward model's own tokenizer (string prompts: the plain
    concatenation ``prompt + completion``; conversations: ``tokenizer.apply_chat_template(prompt + completion,
    tokenize=False)``), tokenized without adding special tokens, right-padded, and the reward is ``logits[:, 0]``
    (which the classifier reads at the last non-padding token).

    The model is put in eval mode with its parameters frozen (it is never trained through its rewards), and its
    config's pad token is set to the tokenizer's, as TRL does, so the classifier finds each sequence's last token.
    Inputs go to wherever the model's parameters are, so moving the model (or letting Lightning move it as a
    submodule) moves the scoring.

    Args:
        model: the reward model; its output must have ``logits`` of shape ``[batch, num_labels]``.
        tokenizer: the reward model's tokenizer (TRL's ``reward_processing_class``); one without a pad token gets
            its EOS token as pad (on a copy).
        name: the metric name; default TRL's (:func:`model_source_name`).
        batch_size: sequences per forward pass.
        chat_template_kwargs: extra keywords of ``apply_chat_template`` (e.g. ``{"enable_thinking": False}``).
    """

    kind = "reward model"
    wrap_errors = False

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str | None = None,
        batch_size: int = 32,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        from lightning_llm.models.loading import load_tokenizer

        if not isinstance(model, nn.Module):
            raise ValueError(f"a reward model must be a torch.nn.Module, got {type(model).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name if name is not None else model_source_name(model)
        self._check_classifier(model)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(tokenizer)
        config = getattr(model, "config", None)
        if config is not None:
            text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
            text_config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def _check_classifier(self, model: nn.Module) -> None:
        """Refuse, before any scoring, what the model's class or config says is no one-output classifier."""
        if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
            raise ValueError(f"{self.describe()} is a {type(model).__name__}, a language model; a reward model is a "
                             f"sequence classifier with one output (pass the path or hub id instead, and it is "
                             f"loaded with a one-output score head)")
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"{self.describe()} must be a sequence classifier with one output (num_labels=1), got "
                             f"num_labels={num_labels}")

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> RewardModelReward:
        """Load a reward model from a hub id, a local ``save_pretrained`` directory (e.g. a ``RewardModule``
        export) or a tiny preset, as a one-output sequence classifier, with its own tokenizer unless ``tokenizer``
        is given. ``model_kwargs`` go to :func:`~lightning_llm.models.load_model` (``trust_remote_code``,
        ``revision``, ...); ``kwargs`` to the constructor."""
        from lightning_llm.models.loading import load_model, load_tokenizer

        loaded = load_model(model, task="sequence_classification", num_labels=1, dtype=dtype,
                            **dict(model_kwargs or {}))
        if device is not None:
            loaded = loaded.to(device)
        return cls(loaded, tokenizer if tokenizer is not None else load_tokenizer(None, str(model)), **kwargs)

    def texts(self, prompts: Sequence, completions: Sequence) -> list[str]:
        """The strings the reward model reads, one per completion (TRL's rendering, see the class docstring)."""
        if prompts and is_conversation(prompts[0]):
            if not getattr(self.tokenizer, "chat_template", None):
                raise RewardError(f"{self.describe()}: its tokenizer has no chat template, so conversational prompts "
                                  f"cannot be rendered for it; pass a tokenizer with the template it was trained with")
            return [self.tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False,
                                                       **self.chat_template_kwargs)
                    for prompt, completion in zip(prompts, completions)]
        return [prompt + completion for prompt, completion in zip(prompts, completions)]

    def _device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @torch.no_grad()
    def score(self, batch: RewardBatch) -> list[float]:
        texts = self.texts(batch.prompts, batch.completions)
        device = self._device()
        rewards: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(text=texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                    padding_side="right", add_special_tokens=False).to(device)
            logits = self.model(**inputs).logits
            if logits.dim() != 2:
                raise RewardError(f"{self.describe()} must be a sequence classifier: its logits have shape "
                                  f"{tuple(logits.shape)}, expected [batch, 1]")
            rewards += logits[:, 0].float().tolist()
        return rewards


# -- judges ---------------------------------------------------------------------------------------------------------


class JudgeReward(RewardSource):
    """A binary judge as a 0/1 reward: ``judge.judge(prompts, completions)`` answers 1 (the completion meets the
    judge's constraint) -> 1.0, 0 -> 0.0, -1 (the judge could not decide) -> NaN, i.e. "no reward".

    Judges read strings: a conversational prompt is given as ``"User: ...\\n\\nAssistant:"`` (see
    :func:`~lightning_llm.rewards._text.conversation_plain_text`), a conversational completion as its text.

    Args:
        judge: a :class:`~lightning_llm.judges.BaseBinaryJudge`.
        name: the metric name; default the judge's class name (TRL's name of a callable object).
        gold_completions_column: a dataset column with reference completions to pass as ``gold_completions``.
    """

    kind = "judge"

    def __init__(self, judge: BaseBinaryJudge, name: str | None = None,
                 gold_completions_column: str | None = None) -> None:
        if not isinstance(judge, BaseBinaryJudge):
            raise ValueError(f"JudgeReward needs a BaseBinaryJudge, got {type(judge).__name__}")
        self.judge = judge
        self.name = name if name is not None else type(judge).__name__
        self.gold_completions_column = gold_completions_column

    def score(self, batch: RewardBatch) -> list[float]:
        prompts = [conversation_plain_text(p) if is_conversation(p) else p for p in batch.prompts]
        completions = [completion_text(c) for c in batch.completions]
        kwargs: dict[str, Any] = {}
        if self.gold_completions_column is not None:
            if self.gold_completions_column not in batch.columns:
                raise RewardError(f"{self.describe()} reads gold completions from the column "
                                  f"{self.gold_completions_column!r}, which the rows do not have (columns: "
                                  f"{sorted(batch.columns)})")
            kwargs["gold_completions"] = list(batch.columns[self.gold_completions_column])
        decisions = self.judge.judge(prompts, completions, **kwargs)
        return [self._reward(decision, row) for row, decision in enumerate(decisions)]

    def _reward(self, decision: Any, row: int) -> float:
        if isinstance(decision, (int, float)) and decision in (0, 1, FAILED):
            return math.nan if decision == FAILED else float(decision)
        raise RewardError(f"{self.describe()} answered {decision!r} for row {row}; a binary judge answers 1, 0 or -1")


# -- resolution -----------------------------------------------------------------------------------------------------


def resolve_reward_source(
    spec: Any,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> RewardSource:
    """The reward source ``spec`` names.

    ``spec`` may be:

    - a :class:`RewardSource`: returned as it is;
    - a binary judge (:class:`~lightning_llm.judges.BaseBinaryJudge`): a :class:`JudgeReward`;
    - a ``torch.nn.Module`` (a one-output sequence classifier): a :class:`RewardModelReward` with ``tokenizer``
      (default: loaded from the model's ``_name_or_path``), moved to ``device`` / cast to ``dtype`` when given;
    - a callable: a :class:`FunctionReward`;
    - a string, read in this order:

      1. an existing directory: a reward model saved there (``save_pretrained``, e.g. a ``RewardModule`` export);
      2. ``"package.module:function"``: the function (any attribute path after the colon) of that module;
      3. ``"package.module.function"`` (dotted Python identifiers): the same, split at the last dot, so YAML
         configs can name reward functions (``lightning_llm.rewards.accuracy_reward``);
      4. anything else: a reward model by hub id or tiny preset name (``"org/name"``, ``"tiny-llama"``).

      An imported object is resolved again (it may be a function, a judge, a model or a source).

    ``tokenizer`` is the reward *model's* tokenizer (TRL's ``reward_processing_class``); it is not used for
    functions and judges. ``device`` and ``dtype`` apply to reward models only.

    Raises:
        ValueError: ``spec`` is none of these, naming it; or an import path that does not import.
    """
    if isinstance(spec, RewardSource):
        return spec
    if isinstance(spec, BaseBinaryJudge):
        return JudgeReward(spec)
    if isinstance(spec, (BasePairwiseJudge, BaseRankJudge)):
        raise ValueError(f"{type(spec).__name__} compares several completions of a prompt; a reward source needs "
                         f"one score per completion (a BaseBinaryJudge, a reward model or a reward function)")
    if isinstance(spec, nn.Module):
        return _model_object(spec, tokenizer, device, dtype)
    if isinstance(spec, (str, os.PathLike)):
        return _from_string(os.fspath(spec), tokenizer, device, dtype)
    if isinstance(spec, Mapping):
        return _from_mapping(spec, tokenizer, device, dtype)
    if isinstance(spec, type):
        raise ValueError(f"reward source {spec.__module__}.{spec.__qualname__} is a class; pass an instance of it "
                         f"or a function")
    if callable(spec):
        return FunctionReward(spec)
    raise ValueError(
        f"cannot make a reward source of {spec!r} ({type(spec).__name__}): expected a reward function, an import "
        f"path of one ('package.module:function' or 'package.module.function'), a reward model (hub id, local "
        f"directory or torch.nn.Module), a BaseBinaryJudge, or a RewardSource"
    )


def _model_object(model: nn.Module, tokenizer: Any, device: Any, dtype: Any) -> RewardModelReward:
    from lightning_llm.models.loading import load_tokenizer, resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    if isinstance(torch_dtype, torch.dtype) or device is not None:
        model = model.to(device=device, dtype=torch_dtype if isinstance(torch_dtype, torch.dtype) else None)
    return RewardModelReward(model, tokenizer if tokenizer is not None else load_tokenizer(None, model))


def _from_string(spec: str, tokenizer: Any, device: Any, dtype: Any) -> RewardSource:
    if Path(spec).expanduser().is_dir():
        return RewardModelReward.from_pretrained(str(Path(spec).expanduser()), tokenizer=tokenizer, device=device,
                                                 dtype=dtype)
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        return _resolve_imported(spec, _import_attribute(spec, module_name, attribute), tokenizer, device, dtype)
    parts = spec.split(".")
    if len(parts) > 1 and all(part.isidentifier() for part in parts):
        module_name, _, attribute = spec.rpartition(".")
        return _resolve_imported(spec, _import_attribute(spec, module_name, attribute), tokenizer, device, dtype)
    return RewardModelReward.from_pretrained(spec, tokenizer=tokenizer, device=device, dtype=dtype)


def _from_mapping(spec: Mapping, tokenizer: Any, device: Any, dtype: Any) -> RewardSource:
    """``{"class_path": "pkg.mod.Name", "init_args": {...}}`` (YAML's way of building an object): the class or
    factory at ``class_path`` called with ``init_args``, e.g. ``lightning_llm.rewards.ContainsReward`` with
    ``{"target": "2"}`` or ``lightning_llm.rewards.get_soft_overlong_punishment`` with its two lengths."""
    unknown = sorted(set(spec) - {"class_path", "init_args"})
    if "class_path" not in spec or unknown:
        raise ValueError(f"reward source {dict(spec)!r}: a mapping needs 'class_path' (and optionally 'init_args'), "
                         f"got keys {sorted(spec)}")
    path = str(spec["class_path"])
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    factory = _import_attribute(path, module_name, attribute)
    if not callable(factory):
        raise ValueError(f"reward source {path!r} is not a class or a function to call with init_args")
    init_args = dict(spec.get("init_args") or {})
    try:
        made = factory(**init_args)
    except TypeError as error:
        raise ValueError(f"reward source {path!r}: cannot be built with init_args {init_args} ({error})") from error
    return _resolve_imported(path, made, tokenizer, device, dtype)


def _import_attribute(spec: str, module_name: str, attribute: str) -> Any:
    """The object ``attribute`` (possibly dotted) of module ``module_name``, or a ValueError naming ``spec``."""
    if not module_name or not attribute:
        raise ValueError(f"reward source {spec!r}: an import path is 'package.module:function' or "
                         f"'package.module.function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward source {spec!r}: cannot import module {module_name!r} ({error}); a string names "
                         f"an importable function, a local directory or a hub id") from error
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward source {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj


def _resolve_imported(spec: str, obj: Any, tokenizer: Any, device: Any, dtype: Any) -> RewardSource:
    # Only objects are resolved again: a string constant could name itself and resolve forever.
    if isinstance(obj, (str, os.PathLike, type)) or not callable(obj) and not isinstance(obj, BaseBinaryJudge):
        raise ValueError(f"reward source {spec!r} names {obj!r} ({type(obj).__name__}), which is not a reward "
                         f"function, a reward model or a judge")
    return resolve_reward_source(obj, tokenizer=tokenizer, device=device, dtype=dtype)
