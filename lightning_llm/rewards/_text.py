"""What the rule rewards read of prompts and completions: conversations told apart from strings, and the text of a
completion in either shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def is_conversation(value: Any) -> bool:
    """Whether ``value`` is a conversation: a non-empty list of messages (mappings with a ``"role"``), as in TRL's
    ``is_conversational``."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(message, Mapping) and "role" in message for message in value))


def message_text(message: Mapping) -> str:
    """The text of one message: its ``content`` string, or the concatenated ``text`` parts of a multimodal content
    list (other parts, e.g. images, have no text)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text")


def completion_text(completion: str | Sequence[Mapping]) -> str:
    """The text of a completion: a string as it is; for a conversational completion (TRL's
    ``[{"role": "assistant", "content": text}]``, possibly with tool turns), the contents of its assistant messages
    joined by newlines."""
    if isinstance(completion, str):
        return completion
    return "\n".join(message_text(message) for message in completion if message.get("role") == "assistant")


def conversation_plain_text(messages: Sequence[Mapping]) -> str:
    """A conversation as plain text for judges that read strings: ``"User: ...\\n\\n"`` per message (the simple chat
    template TRL's online trainers rendered conversations with for judges), then ``"Assistant:"``."""
    turns = "".join(f"{str(message['role']).capitalize()}: {message_text(message)}\n\n" for message in messages)
    return turns + "Assistant:"
