"""Scoring a generation step with every reward source: :func:`compute_rewards` -> ``[N, num_sources]`` rewards.

Sources run as TRL's ``GRPOTrainer._calculate_rewards`` runs them: reward models and sync functions one after the
other in the calling thread, then every async function at once (``asyncio.gather``) on one event loop that lives in
a daemon thread for the whole process, so async clients (HTTP sessions, API clients) created by a reward function
keep working from one step to the next. What each source answers is checked before it becomes a tensor: a source
that raises, answers the wrong number of rewards, or answers something that is not a number stops the step with a
:class:`~lightning_llm.rewards.sources.RewardError` (a ``ValueError``) naming the source and the row.

The weighted sum of the sources and the advantages are the online module's business, not this one's.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import math
import numbers
import os
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import torch

from lightning_llm.rewards._text import is_conversation
from lightning_llm.rewards.sources import (
    STANDARD_ARGUMENTS,
    FunctionReward,
    RewardBatch,
    RewardError,
    RewardSource,
    resolve_reward_source,
)
from lightning_llm.rewards.state import RewardState

log = logging.getLogger(__name__)

#: dataset columns that are not handed to reward functions as columns: they are the prompts and completions
#: themselves (TRL leaves the same three out)
NOT_COLUMNS = ("prompt", "completion", "completion_ids")


def compute_rewards(
    sources: Sequence[RewardSource | Callable],
    *,
    prompts: Sequence,
    completions: Sequence,
    completion_ids: Sequence[Sequence[int]],
    columns: Mapping[str, Sequence] | None = None,
    trainer_state: Any = None,
    log_metric: Callable[[str, float], None] | None = None,
    log_extra: Callable[[str, list], None] | None = None,
    row_ids: Sequence | None = None,
    device: str | torch.device | None = None,
    allow_infinite: bool = False,
) -> torch.Tensor:
    """Score every completion with every source.

    Args:
        sources: reward sources (see :func:`~lightning_llm.rewards.resolve_reward_source`); a plain function or a
            binary judge is accepted as is, anything that would need loading must be resolved first.
        prompts: ``[N]`` prompts, all strings or all conversations.
        completions: ``[N]`` completions; for conversational prompts a plain string is wrapped as TRL shapes a
            decoded completion, ``[{"role": "assistant", "content": text}]``.
        completion_ids: ``[N]`` token ids of the completions.
        columns: the other dataset columns of the rows (``{column: [N values]}``, aligned with the completions);
            ``prompt``, ``completion`` and ``completion_ids`` columns are left out, as TRL does.
        trainer_state: passed to reward functions as ``trainer_state``; default ``RewardState()`` (step 0).
        log_metric: ``log_metric(name, value)`` for the functions; default one that discards.
        log_extra: ``log_extra(column, values)`` for the functions; default one that discards.
        row_ids: how error messages name the rows (e.g. dataset indices); default their positions ``0..N-1``.
        device: where the returned tensor lives (default CPU).
        allow_infinite: keep ±inf rewards as TRL does. Off by default: one infinite reward turns its whole group's
            advantages into NaN, which the advantage computation then silently zeroes, so it is refused instead.

    Returns:
        ``[N, len(sources)]`` float32 rewards; NaN where a source answered ``None`` (or NaN: TRL treats both as
        "does not apply", and so do the NaN-aware means downstream) or a judge could not decide.

    Raises:
        ValueError: inputs of different lengths, mixed prompt shapes, or a column named like a standard argument;
            a source that raises (the error chained), answers a number of rewards other than ``N``, or answers a
            value that is not a real number or ``None`` (naming the source, the row, its prompt and completion).
    """
    sources = [_as_source(source, index) for index, source in enumerate(sources)]
    batch = _batch(prompts, completions, completion_ids, columns, trainer_state, log_metric, log_extra)
    rows = _row_names(row_ids, len(batch))
    checked: list[list[float] | None] = [None] * len(sources)
    for index, source in enumerate(sources):
        if not source.is_async:
            checked[index] = _check(source, _run_sync(source, batch, rows), batch, rows, allow_infinite)
    pending = [(index, source) for index, source in enumerate(sources) if source.is_async]
    if pending:
        answers = run_on_event_loop(_gather([source.ascore(batch) for _, source in pending]))
        for (index, source), answer in zip(pending, answers):
            checked[index] = _check(source, _unless_failed(source, answer, rows), batch, rows, allow_infinite)
    rewards = torch.tensor(checked, dtype=torch.float32).reshape(len(sources), len(batch)).T.contiguous()
    _warn_unscored_rows(rewards, rows)
    return rewards.to(device) if device is not None else rewards


# -- inputs ---------------------------------------------------------------------------------------------------------


def _as_source(source: Any, index: int) -> RewardSource:
    """A RewardSource for ``sources[index]``: functions and judges are wrapped; strings and models, which load
    weights, must go through resolve_reward_source once rather than at every step."""
    if isinstance(source, RewardSource):
        return source
    if isinstance(source, (str, os.PathLike, torch.nn.Module)):
        raise ValueError(f"sources[{index}] is {source!r}; resolve it once with resolve_reward_source(...) and pass "
                         f"the RewardSource")
    return resolve_reward_source(source)


def shape_completions(prompts: Sequence, completions: Sequence) -> list:
    """Completions in TRL's shape for their prompts: strings for string prompts; for conversational prompts a list
    of messages, a plain string being wrapped as ``[{"role": "assistant", "content": text}]``.

    Raises:
        ValueError: prompts that mix strings and conversations, or a completion that does not fit its prompt,
            naming the row.
    """
    conversational = bool(prompts) and is_conversation(prompts[0])
    shaped = []
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        if is_conversation(prompt) != conversational:
            raise ValueError(f"prompts[{row}] is {'a string' if conversational else 'a conversation'} but prompts[0] "
                             f"is {'a conversation' if conversational else 'a string'}; a batch holds one kind")
        if conversational and isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        elif conversational and not is_conversation(completion):
            raise ValueError(f"completions[{row}] must be a string or a list of messages for a conversational "
                             f"prompt, got {completion!r}")
        elif not conversational and not isinstance(completion, str):
            raise ValueError(f"completions[{row}] must be a string for a string prompt, got {completion!r}")
        shaped.append(completion)
    return shaped


def columns_from_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """The reward-function columns of dataset rows: every key of the first row except ``prompt``, ``completion``
    and ``completion_ids`` (TRL's rule), as lists aligned with the rows.

    Raises:
        ValueError: a row without one of the first row's keys, naming the row and the column.
    """
    if not rows:
        return {}
    names = [name for name in rows[0] if name not in NOT_COLUMNS]
    columns: dict[str, list] = {name: [] for name in names}
    for index, row in enumerate(rows):
        for name in names:
            if name not in row:
                raise ValueError(f"row {index} has no column {name!r}, which row 0 has; reward functions get every "
                                 f"column for every row")
            columns[name].append(row[name])
    return columns


def _discard_metric(name: str, value: float) -> None:
    """The default ``log_metric``: reward functions may always call it."""


def _discard_extra(column: str, values: list) -> None:
    """The default ``log_extra``: reward functions may always call it."""


def _batch(prompts: Sequence, completions: Sequence, completion_ids: Sequence, columns: Mapping | None,
           trainer_state: Any, log_metric: Callable | None, log_extra: Callable | None) -> RewardBatch:
    count = len(prompts)
    for what, values in (("completions", completions), ("completion_ids", completion_ids)):
        if len(values) != count:
            raise ValueError(f"{len(values)} {what} for {count} prompts; there is one of each per completion")
    kept: dict[str, list] = {}
    for name, values in (columns or {}).items():
        if name in NOT_COLUMNS:
            continue
        if name in STANDARD_ARGUMENTS:
            raise ValueError(f"column {name!r} has the name of an argument every reward function gets "
                             f"{list(STANDARD_ARGUMENTS)}; rename the column")
        if isinstance(values, (str, bytes)) or len(values) != count:
            size = "a string" if isinstance(values, (str, bytes)) else f"{len(values)} values"
            raise ValueError(f"column {name!r} holds {size}; expected a list of {count} values, one per completion")
        kept[name] = list(values)
    ids = [row.tolist() if isinstance(row, torch.Tensor) else list(row) for row in completion_ids]
    return RewardBatch(
        prompts=list(prompts), completions=shape_completions(prompts, completions), completion_ids=ids, columns=kept,
        trainer_state=trainer_state if trainer_state is not None else RewardState(),
        log_metric=log_metric if log_metric is not None else _discard_metric,
        log_extra=log_extra if log_extra is not None else _discard_extra,
    )


def _row_names(row_ids: Sequence | None, count: int) -> list[str]:
    if row_ids is None:
        return [str(row) for row in range(count)]
    if len(row_ids) != count:
        raise ValueError(f"{len(row_ids)} row_ids for {count} completions")
    return [f"{row} (id {row_id!r})" for row, row_id in enumerate(row_ids)]


# -- running the sources --------------------------------------------------------------------------------------------


def _run_sync(source: RewardSource, batch: RewardBatch, rows: list[str]) -> Any:
    try:
        answer = source.score(batch)
        if isinstance(source, FunctionReward) and inspect.isawaitable(answer):
            answer = run_on_event_loop(_awaited(answer))
    except RewardError:
        raise
    except Exception as error:
        if not source.wrap_errors:
            raise
        raise _failure(source, error, rows) from error
    return answer


def _unless_failed(source: RewardSource, answer: Any, rows: list[str]) -> Any:
    """An async source's answer, or its exception raised: named as the source's failure unless it already is a
    RewardError, or is an interrupt or a cancellation (which is not the function's error)."""
    if isinstance(answer, RewardError) or isinstance(answer, BaseException) and not isinstance(answer, Exception):
        raise answer
    if isinstance(answer, Exception):
        raise _failure(source, answer, rows) from answer
    return answer


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


async def _gather(coroutines: list[Coroutine]) -> list[Any]:
    # Every source finishes (or fails) before the first failure is reported, so none is left running.
    return await asyncio.gather(*coroutines, return_exceptions=True)


def _failure(source: RewardSource, error: BaseException, rows: list[str]) -> RewardError:
    shown = ", ".join(rows) if len(rows) <= 4 else f"{rows[0]}, {rows[1]}, ..., {rows[-1]}"
    return RewardError(f"{source.describe()} raised {type(error).__name__}: {error} (scoring the batch of "
                       f"{len(rows)} completions, rows {shown})")


_LOOP_LOCK = threading.Lock()
_LOOP: dict[str, Any] = {}  # the process's event loop, its thread and the pid that started it


def _event_loop() -> asyncio.AbstractEventLoop:
    """The event loop async reward functions run on, started on first use in a daemon thread. A forked child
    (a data-loader worker, a spawned rank) starts its own: the parent's thread does not exist there."""
    with _LOOP_LOCK:
        if _LOOP.get("pid") != os.getpid() or _LOOP["loop"].is_closed():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=run, name="lightning_llm-rewards", daemon=True)
            thread.start()
            ready.wait()
            _LOOP.update(loop=loop, thread=thread, pid=os.getpid())
            atexit.register(_stop_event_loop, loop, thread)
        return _LOOP["loop"]


def _stop_event_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


def run_on_event_loop(coroutine: Coroutine) -> Any:
    """Run ``coroutine`` on the reward functions' event loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, _event_loop()).result()


# -- checking the answers -------------------------------------------------------------------------------------------


def _check(source: RewardSource, answer: Any, batch: RewardBatch, rows: list[str], allow_infinite: bool) -> list[float]:
    """``answer`` as ``N`` floats (None -> NaN), or a RewardError saying what is wrong with it."""
    expected = f"expected a list of {len(batch)} rewards, one float (or None) per completion"
    if isinstance(answer, (str, bytes, Mapping, set, frozenset)) or not hasattr(answer, "__iter__"):
        raise RewardError(f"{source.describe()} returned {_short(answer)} ({type(answer).__name__}); {expected}")
    if hasattr(answer, "tolist") and not isinstance(answer, (list, tuple)):  # a tensor or an array
        if getattr(answer, "ndim", 1) != 1:
            raise RewardError(f"{source.describe()} returned an array of shape {tuple(answer.shape)}; {expected}")
        answer = answer.tolist()
    values = list(answer)
    if len(values) != len(batch):
        raise RewardError(f"{source.describe()} returned {len(values)} rewards for {len(batch)} completions; "
                          f"{expected}")
    return [_as_float(source, value, row, batch, rows, allow_infinite) for row, value in enumerate(values)]


def _as_float(source: RewardSource, value: Any, row: int, batch: RewardBatch, rows: list[str],
              allow_infinite: bool) -> float:
    if value is None:
        return math.nan
    if not isinstance(value, (bool, numbers.Real)) and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d tensor or a numpy scalar
    if not isinstance(value, (bool, numbers.Real)):
        raise RewardError(f"{source.describe()} returned {_short(value)} ({type(value).__name__}) for row "
                          f"{_describe_row(row, batch, rows)}; expected a float or None")
    number = float(value)
    if math.isinf(number) and not allow_infinite:
        raise RewardError(f"{source.describe()} returned {number} for row {_describe_row(row, batch, rows)}; "
                          f"rewards must be finite (compute_rewards(allow_infinite=True) keeps them, as TRL does)")
    return number


def _describe_row(row: int, batch: RewardBatch, rows: list[str]) -> str:
    return f"{rows[row]} (prompt {_short(batch.prompts[row])}, completion {_short(batch.completions[row])})"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _warn_unscored_rows(rewards: torch.Tensor, rows: list[str]) -> None:
    """Warn (as TRL does) when some row got no reward from any source: it cannot contribute to training."""
    if rewards.shape[1] == 0:
        return
    unscored = torch.isnan(rewards).all(dim=1).nonzero().flatten().tolist()
    if unscored:
        shown = ", ".join(rows[row] for row in unscored[:5]) + (", ..." if len(unscored) > 5 else "")
        log.warning("%d of %d completions got no reward from any source (every source returned None): rows %s",
                    len(unscored), len(rows), shown)


# -- metrics --------------------------------------------------------------------------------------------------------


def reward_names(sources: Sequence[RewardSource]) -> list[str]:
    """The sources' names, made unique by a ``_2``, ``_3``... suffix on repeats (two reward models exported to
    directories with the same last component would otherwise share their metrics)."""
    seen: dict[str, int] = {}
    names = []
    for source in sources:
        seen[source.name] = seen.get(source.name, 0) + 1
        names.append(source.name if seen[source.name] == 1 else f"{source.name}_{seen[source.name]}")
    return names


def reward_metrics(sources: Sequence[RewardSource], rewards: torch.Tensor) -> dict[str, float]:
    """TRL's per-source metrics of a ``[N, len(sources)]`` reward tensor: ``rewards/<name>/mean`` and
    ``rewards/<name>/std`` over the rows the source scored (NaN left out; the std with Bessel's correction, NaN
    below two values)."""
    if rewards.dim() != 2 or rewards.shape[1] != len(sources):
        raise ValueError(f"rewards must have shape [N, {len(sources)}], got {tuple(rewards.shape)}")
    metrics = {}
    for column, name in enumerate(reward_names(sources)):
        values = rewards[:, column].double()
        values = values[~torch.isnan(values)]
        count = values.numel()
        mean = values.mean().item() if count else math.nan
        std = ((values - mean).pow(2).sum() / (count - 1)).sqrt().item() if count > 1 else math.nan
        metrics[f"rewards/{name}/mean"] = mean
        metrics[f"rewards/{name}/std"] = std
    return metrics
