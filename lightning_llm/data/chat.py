"""Chat templates and token masks.

Conversations are rendered with the tokenizer's own chat template. A tokenizer without one gets
:data:`FALLBACK_CHAT_TEMPLATE` (ChatML, with ``{% generation %}`` markers around assistant turns), and a log line says
so. Assistant-token masks come from the template's generation markers when it has them; otherwise they are derived
by rendering the conversation up to each assistant turn, with the generation prompt and then with the turn, and
taking the difference, cut after the turn's end-of-turn (EOS) token. Either way the end-of-turn token is inside the
mask, so the model learns to stop.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Sequence

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: ChatML, used when a tokenizer has no chat template of its own. Assistant turns (content and ``<|im_end|>``) are
#: wrapped in ``{% generation %}`` so that ``return_assistant_tokens_mask`` works.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def with_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """``tokenizer`` itself when it has a chat template, else a copy with the fallback ChatML template (the
    tokenizer handed in is never changed)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    log.warning("The tokenizer has no chat template; using lightning_llm's ChatML fallback template.")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template marks assistant turns with ``{% generation %}``."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is used
        template = template.get("default", "")
    return bool(template) and bool(_GENERATION_MARKER.search(template))


def render_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list | None = None,
    **template_kwargs: Any,
) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template."""
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt, tools=tools,
        **template_kwargs,
    )
    return list(out["input_ids"])


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a plain string (special tokens added as the tokenizer does by default, like TRL)."""
    return list(tokenizer(text=text)["input_ids"])


def sequence_ids(tokenizer: PreTrainedTokenizerBase, items: Sequence[tuple[Any, bool, list | None]]) -> list[list[int]]:
    """Token ids of many sequences in one tokenizer call (the tokenizer's batch encoding, much cheaper per sequence).

    Each item is ``(text or messages, add_generation_prompt, tools)``: a string is tokenized like :func:`text_ids`, a
    conversation like :func:`render_ids` (rendered with the template, then tokenized without special tokens, which is
    what ``apply_chat_template(tokenize=True)`` does).
    """
    texts: list[str] = []
    special: list[bool] = []
    for value, add_generation_prompt, tools in items:
        if isinstance(value, str):
            texts.append(value)
            special.append(True)
        else:
            texts.append(tokenizer.apply_chat_template(list(value), tokenize=False, tools=tools,
                                                       add_generation_prompt=add_generation_prompt))
            special.append(False)
    out: list[list[int] | None] = [None] * len(texts)
    for flag in (True, False):
        where = [i for i, s in enumerate(special) if s is flag]
        if where:
            for i, ids in zip(where, _batch_ids(tokenizer, [texts[i] for i in where], flag)):
                out[i] = ids
    return out  # type: ignore[return-value]


def _batch_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Ids of ``texts``: straight from the Rust tokenizer when it truncates and pads nothing (what the tokenizer's
    own call does then, without building the per-text dicts and masks), else through the tokenizer's call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _cut_after_eos(start: int, end: int, ids: Sequence[int], eos_id: int | None) -> int:
    """End of an assistant span: just after its last EOS token when it has one (drops the template's trailing
    newline, which is never generated), else unchanged."""
    if eos_id is None:
        return end
    for k in range(end - 1, start - 1, -1):
        if ids[k] == eos_id:
            return k + 1
    return end


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    *,
    with_assistant_mask: bool = False,
    tools: list | None = None,
    **template_kwargs: Any,
) -> tuple[list[int], list[int] | None]:
    """Tokenize a conversation; with ``with_assistant_mask``, also return a 0/1 mask of the assistant tokens.

    Raises ``ValueError`` when the conversation has no assistant turn to mask.
    """
    if not with_assistant_mask:
        return render_ids(tokenizer, messages, tools=tools, **template_kwargs), None
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True, tools=tools,
            **template_kwargs,
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = _mask_by_rendering(tokenizer, messages, tools=tools, **template_kwargs)
    if 1 not in mask:
        raise ValueError("the conversation has no assistant tokens to train on (assistant_only_loss=True)")
    return ids, mask


def _mask_by_rendering(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], **kwargs: Any
) -> tuple[list[int], list[int]]:
    ids = render_ids(tokenizer, messages, **kwargs)
    mask = [0] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_ids(tokenizer, messages[:k], add_generation_prompt=True, **kwargs) if k else []
        through = render_ids(tokenizer, messages[: k + 1], **kwargs)
        if ids[: len(through)] != through:
            raise ValueError(
                "the chat template renders earlier turns differently once later turns follow, so assistant tokens "
                "cannot be located; use a template with {% generation %} markers"
            )
        start = common_prefix_length(before, through)
        end = _cut_after_eos(start, len(through), through, tokenizer.eos_token_id)
        for i in range(start, end):
            mask[i] = 1
    return ids, mask


def tokenize_prompt_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[dict],
    completion: str | Sequence[dict],
    *,
    with_assistant_mask: bool = False,
    tools: list | None = None,
    **template_kwargs: Any,
) -> tuple[list[int], list[int], list[int] | None]:
    """Tokenize prompt + completion; return ``(ids, completion_mask, assistant_mask)``.

    The completion starts where the tokenized prompt (rendered with the generation prompt, for conversations) and the
    tokenized prompt+completion diverge, so tokens merging across the boundary are handled.
    """
    if isinstance(prompt, str) != isinstance(completion, str):
        raise ValueError("prompt and completion must both be strings or both be conversations")
    assistant_mask = None
    if isinstance(prompt, str):
        prompt_ids = text_ids(tokenizer, prompt)
        ids = text_ids(tokenizer, prompt + completion)
    else:
        prompt_ids = render_ids(tokenizer, prompt, add_generation_prompt=True, tools=tools, **template_kwargs)
        ids, assistant_mask = tokenize_conversation(
            tokenizer, list(prompt) + list(completion), with_assistant_mask=with_assistant_mask, tools=tools,
            **template_kwargs,
        )
    start = common_prefix_length(prompt_ids, ids)
    completion_mask = [0] * start + [1] * (len(ids) - start)
    return ids, completion_mask, assistant_mask


def conversation_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], **kwargs: Any) -> str:
    """The rendered string of a conversation (for display and for generation prompts)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)
