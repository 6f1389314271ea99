"""Dataset formats: detection (which kind of dataset, standard or conversational) and row-by-row validation.

The kinds are TRL's:

=====================  ==========================================  =============================================
kind                   columns                                     used by
=====================  ==========================================  =============================================
language_modeling      ``text`` or ``messages`` (or ShareGPT        SFT
                       ``conversations``)
prompt_completion      ``prompt``, ``completion``                  SFT
preference             ``chosen``, ``rejected`` (+ ``prompt``;      Reward, DPO, ORPO, CPO, (KTO/BCO, unpaired)
                       without it the prompt is implicit)
unpaired_preference    ``prompt``, ``completion``, ``label``       KTO, BCO
prompt_only            ``prompt``                                  online algorithms
stepwise_supervision   ``prompt``, ``completions``, ``labels``     PRM
=====================  ==========================================  =============================================

Each text column holds either a string (standard) or a list of ``{"role", "content"}`` messages (conversational).
Validation raises a ``ValueError`` that names the dataset, the row index, the column and what was expected, before
any training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "bot": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool", "function": "tool",
    "observation": "tool", "function_call": "assistant",
}

#: roles a conversational prompt to complete may end on
PROMPT_END_ROLES = ("user", "tool")

KINDS = (
    "language_modeling", "prompt_completion", "preference", "unpaired_preference", "prompt_only",
    "stepwise_supervision",
)


@dataclass(frozen=True)
class DataFormat:
    """What a dataset holds: its ``kind`` (see the module docstring) and whether its texts are conversations."""

    kind: str
    conversational: bool


def _where(name: str, row: int, column: str) -> str:
    return f"{name}: row {row}, column {column!r}"


def is_conversation(value: Any) -> bool:
    """Whether ``value`` looks like a list of chat messages (dicts with a ``role``)."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], Mapping) and "role" in value[0]


def is_sharegpt(value: Any) -> bool:
    """Whether ``value`` looks like a ShareGPT conversation (dicts with ``from``/``value``)."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], Mapping) and "from" in value[0]


def detect_format(columns: Iterable[str], first_row: Mapping[str, Any]) -> DataFormat:
    """Detect the dataset kind from its column names, and standard vs conversational from its first row.

    Raises ``ValueError`` listing the supported column sets when none matches.
    """
    cols = set(columns)
    if {"prompt", "completions", "labels"} <= cols:
        kind, text_col = "stepwise_supervision", "prompt"
    elif {"chosen", "rejected"} <= cols:
        kind, text_col = "preference", "chosen"
    elif {"prompt", "completion", "label"} <= cols:
        kind, text_col = "unpaired_preference", "completion"
    elif {"prompt", "completion"} <= cols:
        kind, text_col = "prompt_completion", "prompt"
    elif "messages" in cols:
        kind, text_col = "language_modeling", "messages"
    elif "conversations" in cols:
        kind, text_col = "language_modeling", "conversations"
    elif "text" in cols:
        kind, text_col = "language_modeling", "text"
    elif "prompt" in cols:
        kind, text_col = "prompt_only", "prompt"
    else:
        raise ValueError(
            f"Cannot tell the dataset format from its columns {sorted(cols)}. Expected one of: 'text'; 'messages'; "
            "'conversations' (ShareGPT); 'prompt'+'completion'; 'chosen'+'rejected' (+'prompt'); "
            "'prompt'+'completion'+'label'; 'prompt'; 'prompt'+'completions'+'labels'."
        )
    value = first_row.get(text_col)
    conversational = is_conversation(value) or is_sharegpt(value)
    return DataFormat(kind=kind, conversational=conversational)


def sharegpt_to_messages(conversation: list[Mapping[str, Any]], name: str = "data", row: int = 0) -> list[dict]:
    """Convert a ShareGPT ``[{"from": "human", "value": ...}, ...]`` conversation to role/content messages."""
    messages = []
    for j, turn in enumerate(conversation):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{_where(name, row, 'conversations')}, turn {j}: expected a dict with 'from' and 'value'")
        speaker = str(turn["from"]).lower()
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(
                f"{_where(name, row, 'conversations')}, turn {j}: unknown speaker {turn['from']!r}; expected one of "
                f"{sorted(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


def validate_messages(value: Any, name: str, row: int, column: str, *, allow_empty: bool = False) -> None:
    """Check a conversation: a non-empty list of dicts, known roles, string contents."""
    where = _where(name, row, column)
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of messages, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{where}: the conversation is empty")
    for j, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}, message {j}: expected a dict with 'role' and 'content', got "
                             f"{type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"{where}, message {j}: missing key 'role'")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}, message {j}: unknown role {message['role']!r}; expected one of {list(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            if content is None and message.get("tool_calls"):
                continue
            raise ValueError(
                f"{where}, message {j}: 'content' must be a string, got {type(content).__name__}"
            )


def validate_text(value: Any, name: str, row: int, column: str, conversational: bool) -> None:
    """Check one text cell: a non-empty string (standard) or a valid conversation (conversational)."""
    if conversational:
        validate_messages(value, name, row, column)
        return
    if not isinstance(value, str):
        expected = "a string" if not is_conversation(value) else "a string (the dataset's first row is standard)"
        raise ValueError(f"{_where(name, row, column)}: expected {expected}, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{_where(name, row, column)}: the text is empty" + (" (only whitespace)" if value else ""))


def _require(row_data: Mapping[str, Any], columns: Iterable[str], name: str, row: int) -> None:
    for column in columns:
        if column not in row_data or row_data[column] is None:
            raise ValueError(f"{_where(name, row, column)}: missing value")


def validate_row(row_data: Mapping[str, Any], fmt: DataFormat, name: str, row: int) -> None:
    """Validate one row of a dataset of format ``fmt``; raises ``ValueError`` naming ``row`` and the column."""
    conv = fmt.conversational
    if not isinstance(row_data, Mapping):
        raise ValueError(f"{name}: row {row}: expected a dict of columns, got {type(row_data).__name__}")
    if fmt.kind == "language_modeling":
        if "messages" in row_data:
            _require(row_data, ["messages"], name, row)
            validate_messages(row_data["messages"], name, row, "messages")
        elif "conversations" in row_data:
            _require(row_data, ["conversations"], name, row)
            if not isinstance(row_data["conversations"], list) or not row_data["conversations"]:
                raise ValueError(f"{_where(name, row, 'conversations')}: expected a non-empty list of turns")
            validate_messages(sharegpt_to_messages(row_data["conversations"], name, row), name, row, "conversations")
        elif conv:
            raise ValueError(
                f"{_where(name, row, 'messages')}: missing value (a conversational dataset needs 'messages' or "
                "ShareGPT 'conversations' in every row)"
            )
        else:
            _require(row_data, ["text"], name, row)
            validate_text(row_data["text"], name, row, "text", False)
    elif fmt.kind == "prompt_completion":
        _require(row_data, ["prompt", "completion"], name, row)
        validate_text(row_data["prompt"], name, row, "prompt", conv)
        validate_text(row_data["completion"], name, row, "completion", conv)
    elif fmt.kind == "preference":
        _require(row_data, ["chosen", "rejected"], name, row)
        if "prompt" in row_data and row_data["prompt"] is not None:
            validate_text(row_data["prompt"], name, row, "prompt", conv)
        for column in ("chosen", "rejected"):
            validate_text(row_data[column], name, row, column, conv)
        if "margin" in row_data and row_data["margin"] is not None:
            if not isinstance(row_data["margin"], (int, float)) or isinstance(row_data["margin"], bool):
                raise ValueError(f"{_where(name, row, 'margin')}: expected a number, got "
                                 f"{type(row_data['margin']).__name__}")
            if not math.isfinite(row_data["margin"]):
                raise ValueError(f"{_where(name, row, 'margin')}: expected a finite number, got {row_data['margin']}")
    elif fmt.kind == "unpaired_preference":
        _require(row_data, ["prompt", "completion", "label"], name, row)
        validate_text(row_data["prompt"], name, row, "prompt", conv)
        validate_text(row_data["completion"], name, row, "completion", conv)
        if not isinstance(row_data["label"], bool):
            raise ValueError(f"{_where(name, row, 'label')}: expected a bool (True = desirable), got "
                             f"{row_data['label']!r}")
    elif fmt.kind == "prompt_only":
        _require(row_data, ["prompt"], name, row)
        validate_text(row_data["prompt"], name, row, "prompt", conv)
        if conv and row_data["prompt"][-1]["role"] not in PROMPT_END_ROLES:
            raise ValueError(
                f"{_where(name, row, 'prompt')}: the conversation ends on a {row_data['prompt'][-1]['role']!r} turn; a "
                "prompt to complete must end on a user (or tool) turn, the assistant's answer being what is generated"
            )
    elif fmt.kind == "stepwise_supervision":
        _require(row_data, ["prompt", "completions", "labels"], name, row)
        validate_text(row_data["prompt"], name, row, "prompt", False)
        steps, labels = row_data["completions"], row_data["labels"]
        if not isinstance(steps, list) or not steps:
            raise ValueError(f"{_where(name, row, 'completions')}: expected a non-empty list of step strings")
        for j, step in enumerate(steps):
            if not isinstance(step, str) or not step:
                raise ValueError(f"{_where(name, row, 'completions')}, step {j}: expected a non-empty string")
        if not isinstance(labels, list) or any(not isinstance(label, bool) for label in labels):
            raise ValueError(f"{_where(name, row, 'labels')}: expected a list of bools, got {labels!r}")
        if len(labels) != len(steps):
            raise ValueError(
                f"{_where(name, row, 'labels')}: {len(labels)} labels for {len(steps)} steps in 'completions'"
            )
    else:
        raise ValueError(f"Unknown dataset kind {fmt.kind!r}; expected one of {KINDS}")


def validate_rows(rows: Iterable[Mapping[str, Any]], fmt: DataFormat, name: str) -> None:
    """Validate every row; the first bad one raises ``ValueError`` naming it."""
    for i, row_data in enumerate(rows):
        validate_row(row_data, fmt, name, i)
