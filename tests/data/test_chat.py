"""Chat templates and token masks, checked token by token against masks built from character offsets."""

from __future__ import annotations

import copy
import logging

import pytest
from helpers import char_span_mask

from lightning_llm.data.chat import (
    FALLBACK_CHAT_TEMPLATE,
    has_generation_markers,
    tokenize_conversation,
    tokenize_prompt_completion,
    with_chat_template,
)
from lightning_llm.models import tiny_tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

SINGLE = [{"role": "user", "content": "What is 6 plus 9?"}, {"role": "assistant", "content": "6 plus 9 is 15."}]
MULTI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Grass is green."},
    {"role": "system", "content": "Answer tersely."},
    {"role": "user", "content": "Snow?"},
    {"role": "assistant", "content": "White."},
]
CONVERSATIONS = [SINGLE, MULTI, MULTI[1:5]]


@pytest.fixture
def tok():
    return tiny_tokenizer()


def without_markers(tokenizer):
    """A copy of ``tokenizer`` whose template renders the same text without ``{% generation %}`` markers."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = (tokenizer.chat_template.replace("{%- generation %}", "")
                           .replace("{%- endgeneration %}", ""))
    assert not has_generation_markers(plain) and has_generation_markers(tokenizer)
    return plain


def expected_assistant_mask(tokenizer, messages):
    """Reference mask: tokens lying inside each assistant message's content + ``<|im_end|>`` in the rendered text,
    located by plain string search; also returns the ids from tokenizing that text."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for message in messages:
        header = f"{IM_START}{message['role']}\n"
        start = text.index(header + message["content"], cursor) + len(header)
        end = start + len(message["content"]) + len(IM_END)
        assert text[end - len(IM_END): end] == IM_END
        if message["role"] == "assistant":
            spans.append((start, end))
        cursor = end
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return list(enc["input_ids"]), char_span_mask(enc["offset_mapping"], spans)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["single", "multi_turn_two_systems", "multi_no_system"])
def test_generation_marker_mask_token_by_token(tok, messages):
    ids, mask = tokenize_conversation(tok, messages, with_assistant_mask=True)
    ref_ids, ref_mask = expected_assistant_mask(tok, messages)
    assert ids == ref_ids
    assert mask == ref_mask
    # every assistant turn's <|im_end|> is trained; the newline after it and every other <|im_end|> are not
    im_end = tok.convert_tokens_to_ids(IM_END)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    assert sum(1 for t, m in zip(ids, mask) if t == im_end and m) == n_assistant
    assert sum(1 for t, m in zip(ids, mask) if t == im_end and not m) == len(messages) - n_assistant
    for k, (t, m) in enumerate(zip(ids, mask)):
        if t == im_end and m:
            assert mask[k + 1] == 0 and tok.decode([ids[k + 1]]) == "\n"
    # the masked tokens decode to exactly the assistant contents, each followed by <|im_end|>
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["single", "multi_turn_two_systems", "multi_no_system"])
def test_rendering_fallback_gives_the_marker_mask(tok, messages):
    plain = without_markers(tok)
    marked = tokenize_conversation(tok, messages, with_assistant_mask=True)
    rendered = tokenize_conversation(plain, messages, with_assistant_mask=True)
    assert rendered == marked
    assert rendered == expected_assistant_mask(tok, messages)


def test_rendering_fallback_with_a_default_system_prompt(tok):
    # a Qwen-style template that adds a system turn when the conversation has none
    plain = without_markers(tok)
    plain.chat_template = ("{%- if messages[0]['role'] != 'system' %}"
                           "{{- '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}"
                           "{%- endif %}" + plain.chat_template)
    messages = MULTI[1:5]
    ids, mask = tokenize_conversation(plain, messages, with_assistant_mask=True)
    ref_ids, ref_mask = expected_assistant_mask(plain, [{"role": "system", "content": "Be kind."}] + messages)
    assert ids == ref_ids and mask == ref_mask


def test_rendering_fallback_refuses_templates_that_rewrite_history(tok):
    plain = without_markers(tok)
    # the last message is rendered differently from the same message followed by others
    plain.chat_template = plain.chat_template.replace(
        "{{- message['content'] + '<|im_end|>' }}",
        "{{- message['content'] + ('' if loop.last else ' (earlier)') + '<|im_end|>' }}",
    )
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        tokenize_conversation(plain, MULTI, with_assistant_mask=True)


def test_no_assistant_turn_is_an_error(tok):
    with pytest.raises(ValueError, match="no assistant tokens"):
        tokenize_conversation(tok, SINGLE[:1], with_assistant_mask=True)
    with pytest.raises(ValueError, match="no assistant tokens"):
        tokenize_conversation(without_markers(tok), SINGLE[:1], with_assistant_mask=True)


def test_without_mask_returns_the_rendered_ids(tok):
    ids, mask = tokenize_conversation(tok, MULTI)
    assert mask is None
    assert ids == expected_assistant_mask(tok, MULTI)[0]


def test_tokenizer_without_template_gets_the_fallback(tok, caplog):
    original = copy.deepcopy(tok)
    original.chat_template = None
    with caplog.at_level(logging.WARNING, logger="lightning_llm.data.chat"):
        bare = with_chat_template(original)
    assert bare.chat_template == FALLBACK_CHAT_TEMPLATE
    assert original.chat_template is None  # the tokenizer handed in is not changed: a copy gets the template
    assert "no chat template" in caplog.text
    # the fallback is ChatML with generation markers: masks work and match the reference
    assert has_generation_markers(bare)
    assert tokenize_conversation(bare, MULTI, with_assistant_mask=True) == expected_assistant_mask(bare, MULTI)
    # a tokenizer that has a template keeps it, silently
    caplog.clear()
    custom = copy.deepcopy(tok)
    custom.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert with_chat_template(custom) is custom
    assert custom.chat_template.startswith("{% for m in messages %}") and not caplog.records


def test_standard_prompt_completion_mask(tok):
    prompt, completion = "Question: What is 1 plus 8?\nAnswer:", " 1 plus 8 is 9." + tok.eos_token
    ids, completion_mask, assistant_mask = tokenize_prompt_completion(tok, prompt, completion)
    assert assistant_mask is None
    enc = tok(prompt + completion, return_offsets_mapping=True)
    assert ids == list(enc["input_ids"])
    # the completion tokens are those starting at or after the prompt's last character
    ref = [int(start >= len(prompt)) for start, _ in enc["offset_mapping"]]
    assert completion_mask == ref
    assert tok.decode([t for t, m in zip(ids, completion_mask) if m]) == completion


def test_prompt_completion_token_merging_across_the_boundary(tok):
    # the prompt ends inside a word: " c" "lo" alone, but " closed" once the completion follows
    prompt, completion = "The opposite of open is clo", "sed."
    prompt_ids = tok(prompt)["input_ids"]
    ids, completion_mask, _ = tokenize_prompt_completion(tok, prompt, completion)
    assert ids == tok(prompt + completion)["input_ids"]
    assert [tok.decode([t]) for t in ids[-2:]] == [" closed", "."]
    assert prompt_ids[:-2] == ids[:-2] and prompt_ids[-2:] != ids[-2:]
    # the completion starts where the tokenizations diverge, so the merged token " closed" is trained
    assert completion_mask == [0] * (len(ids) - 2) + [1, 1]


def test_conversational_prompt_completion_masks(tok):
    prompt = MULTI[:4]
    completion = [MULTI[4]]
    ids, completion_mask, assistant_mask = tokenize_prompt_completion(
        tok, prompt, completion, with_assistant_mask=True)
    full_ids, full_assistant = expected_assistant_mask(tok, prompt + completion)
    assert ids == full_ids
    assert assistant_mask == full_assistant
    # the completion is what follows the rendered prompt with its generation prompt
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(prompt + completion, tokenize=False)
    assert full_text.startswith(prompt_text)
    enc = tok(full_text, return_offsets_mapping=True, add_special_tokens=False)
    assert completion_mask == [int(start >= len(prompt_text)) for start, _ in enc["offset_mapping"]]
    # the completion mask covers the last assistant turn (content, <|im_end|>, then the template's newline)
    assert tok.decode([t for t, m in zip(ids, completion_mask) if m]) == "Grass is green." + IM_END + "\n"


def test_prompt_and_completion_must_have_the_same_type(tok):
    with pytest.raises(ValueError, match="both be strings or both be conversations"):
        tokenize_prompt_completion(tok, "Q:", [{"role": "assistant", "content": "A"}])


def test_sequence_ids_equal_the_one_at_a_time_tokenization(tok):
    from lightning_llm.data.chat import render_ids, sequence_ids, text_ids

    items = [("Blood is red.", False, None), (MULTI, False, None), (MULTI[:1], True, None),
             ("<|im_start|>user\nHi<|im_end|>", False, None)]
    expected = [text_ids(tok, items[0][0]), render_ids(tok, MULTI),
                render_ids(tok, MULTI[:1], add_generation_prompt=True), text_ids(tok, items[3][0])]
    assert sequence_ids(tok, items) == expected
    # a tokenizer whose backend truncates goes through the tokenizer's own call, which does not truncate here
    truncating = copy.deepcopy(tok)
    truncating.backend_tokenizer.enable_truncation(3)
    assert sequence_ids(truncating, items) == expected
