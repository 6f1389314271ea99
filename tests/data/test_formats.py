"""Format detection on every shipped sample and every kind, and every validation error (row index + column named)."""

from __future__ import annotations

import re

import pytest
from helpers import sample_rows

from lightning_llm.assets import sample_names
from lightning_llm.data.formats import (
    KINDS,
    DataFormat,
    detect_format,
    sharegpt_to_messages,
    validate_row,
    validate_rows,
)

# What each shipped sample is, written down by hand from the files' contents.
EXPECTED_FORMATS = {
    "messages": ("language_modeling", True),
    "sharegpt": ("language_modeling", True),
    "text": ("language_modeling", False),
    "prompt_completion": ("prompt_completion", False),
    "prompt_completion_conversational": ("prompt_completion", True),
    "preference": ("preference", True),
    "preference_implicit": ("preference", True),
    "preference_standard": ("preference", False),
    "unpaired_preference": ("unpaired_preference", True),
    "prompt_only": ("prompt_only", True),
    "stepwise": ("stepwise_supervision", False),
}


@pytest.mark.parametrize("name", sample_names())
def test_every_shipped_sample_is_detected_and_valid(name):
    assert name in EXPECTED_FORMATS, f"new sample {name!r}: add its expected format to this test"
    rows = sample_rows(name)
    assert len(rows) >= 8
    columns = set().union(*(row.keys() for row in rows))
    fmt = detect_format(columns, rows[0])
    assert (fmt.kind, fmt.conversational) == EXPECTED_FORMATS[name]
    validate_rows(rows, fmt, name)  # every shipped row is valid


def test_every_kind_has_a_shipped_sample():
    assert {kind for kind, _ in EXPECTED_FORMATS.values()} == set(KINDS)
    assert set(EXPECTED_FORMATS) == set(sample_names())


CONV = [{"role": "user", "content": "Hi"}]
ANSWER = [{"role": "assistant", "content": "Hello."}]


@pytest.mark.parametrize(
    "columns, first_row, expected",
    [
        (["text"], {"text": "a b"}, ("language_modeling", False)),
        (["text", "id"], {"text": "a b", "id": 3}, ("language_modeling", False)),
        (["messages"], {"messages": CONV + ANSWER}, ("language_modeling", True)),
        (["conversations"], {"conversations": [{"from": "human", "value": "x"}]}, ("language_modeling", True)),
        (["prompt", "completion"], {"prompt": "a", "completion": "b"}, ("prompt_completion", False)),
        (["prompt", "completion"], {"prompt": CONV, "completion": ANSWER}, ("prompt_completion", True)),
        (["prompt", "chosen", "rejected"], {"prompt": "a", "chosen": "b", "rejected": "c"}, ("preference", False)),
        (["chosen", "rejected"], {"chosen": CONV + ANSWER, "rejected": CONV + ANSWER}, ("preference", True)),
        (["prompt", "completion", "label"], {"prompt": "a", "completion": "b", "label": True},
         ("unpaired_preference", False)),
        (["prompt"], {"prompt": CONV}, ("prompt_only", True)),
        (["prompt"], {"prompt": "a"}, ("prompt_only", False)),
        (["prompt", "completions", "labels"], {"prompt": "a", "completions": ["b"], "labels": [True]},
         ("stepwise_supervision", False)),
    ],
)
def test_detect_format_by_columns(columns, first_row, expected):
    fmt = detect_format(columns, first_row)
    assert (fmt.kind, fmt.conversational) == expected


def test_detect_format_unknown_columns_lists_the_supported_sets():
    with pytest.raises(ValueError, match=r"Cannot tell the dataset format.*\['answer', 'question'\].*'messages'"):
        detect_format(["question", "answer"], {"question": "q", "answer": "a"})


def test_sharegpt_conversion_maps_speakers_to_roles():
    turns = [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
             {"from": "observation", "value": "O"}]
    assert sharegpt_to_messages(turns) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
        {"role": "tool", "content": "O"},
    ]


# ------------------------------------------------------------------------------------------------ validation errors
LM_STD = DataFormat("language_modeling", False)
LM_CONV = DataFormat("language_modeling", True)
PC_STD = DataFormat("prompt_completion", False)
PC_CONV = DataFormat("prompt_completion", True)
PREF_STD = DataFormat("preference", False)
PREF_CONV = DataFormat("preference", True)
UNPAIRED = DataFormat("unpaired_preference", True)
PROMPT_ONLY = DataFormat("prompt_only", True)
STEPWISE = DataFormat("stepwise_supervision", False)

GOOD_ROWS = {
    LM_STD: {"text": "Some text."},
    LM_CONV: {"messages": CONV + ANSWER},
    PC_STD: {"prompt": "Q:", "completion": " A."},
    PC_CONV: {"prompt": CONV, "completion": ANSWER},
    PREF_STD: {"prompt": "Q:", "chosen": " good", "rejected": " bad"},
    PREF_CONV: {"prompt": CONV, "chosen": ANSWER, "rejected": ANSWER},
    UNPAIRED: {"prompt": CONV, "completion": ANSWER, "label": True},
    PROMPT_ONLY: {"prompt": CONV},
    STEPWISE: {"prompt": "Q", "completions": ["s1", "s2"], "labels": [True, False]},
}

# (format, bad row, column the message must name, what the message must say)
BAD_ROWS = [
    # missing column / missing value
    (LM_STD, {"other": "x"}, "text", "missing value"),
    (LM_CONV, {"other": "x"}, "messages", "missing value"),
    (LM_CONV, {"messages": None}, "messages", "missing value"),
    (PC_STD, {"prompt": "Q:"}, "completion", "missing value"),
    (PC_STD, {"prompt": None, "completion": "A"}, "prompt", "missing value"),
    (PREF_STD, {"prompt": "Q", "chosen": "a"}, "rejected", "missing value"),
    (UNPAIRED, {"prompt": CONV, "completion": ANSWER}, "label", "missing value"),
    (PROMPT_ONLY, {"text": "x"}, "prompt", "missing value"),
    (STEPWISE, {"prompt": "Q", "completions": ["s"]}, "labels", "missing value"),
    # wrong type
    (LM_STD, {"text": ["not", "a", "string"]}, "text", "expected a string, got list"),
    (LM_STD, {"text": ""}, "text", "the text is empty"),
    (PC_STD, {"prompt": "Q:", "completion": 5}, "completion", "expected a string, got int"),
    (PC_STD, {"prompt": CONV, "completion": "A"}, "prompt", "expected a string"),
    (PC_CONV, {"prompt": CONV, "completion": "A."}, "completion", "expected a list of messages, got str"),
    (PREF_CONV, {"prompt": CONV, "chosen": ANSWER, "rejected": {"role": "assistant"}}, "rejected",
     "expected a list of messages, got dict"),
    (PREF_STD, {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a number"),
    (LM_CONV, {"messages": ["just a string"]}, "messages", "message 0: expected a dict"),
    (LM_CONV, {"conversations": "not a list"}, "conversations", "expected a non-empty list of turns"),
    # unknown role / speaker, missing role
    (LM_CONV, {"messages": [{"role": "user", "content": "Q"}, {"role": "robot", "content": "A"}]}, "messages",
     "message 1: unknown role 'robot'"),
    (LM_CONV, {"messages": [{"content": "Q"}]}, "messages", "message 0: missing key 'role'"),
    (LM_CONV, {"conversations": [{"from": "human", "value": "Q"}, {"from": "alien", "value": "A"}]},
     "conversations", "turn 1: unknown speaker 'alien'"),
    (LM_CONV, {"conversations": [{"speaker": "human"}]}, "conversations", "turn 0: expected a dict with 'from'"),
    # empty conversation
    (LM_CONV, {"messages": []}, "messages", "the conversation is empty"),
    (PC_CONV, {"prompt": [], "completion": ANSWER}, "prompt", "the conversation is empty"),
    # non-string content
    (LM_CONV, {"messages": [{"role": "user", "content": 42}]}, "messages",
     "message 0: 'content' must be a string, got int"),
    (LM_CONV, {"messages": [{"role": "user", "content": None}]}, "messages",
     "message 0: 'content' must be a string, got NoneType"),
    (LM_CONV, {"conversations": [{"from": "human", "value": ["x"]}]}, "conversations",
     "'content' must be a string, got list"),
    # unpaired label
    (UNPAIRED, {"prompt": CONV, "completion": ANSWER, "label": 1}, "label", "expected a bool"),
    # stepwise supervision
    (STEPWISE, {"prompt": "Q", "completions": ["s1", "s2", "s3"], "labels": [True, False]}, "labels",
     "2 labels for 3 steps"),
    (STEPWISE, {"prompt": "Q", "completions": ["s1", "s2"], "labels": [1, 0]}, "labels", "expected a list of bools"),
    (STEPWISE, {"prompt": "Q", "completions": [], "labels": []}, "completions", "non-empty list of step strings"),
    (STEPWISE, {"prompt": "Q", "completions": ["s1", 7], "labels": [True, True]}, "completions",
     "step 1: expected a non-empty string"),
]


@pytest.mark.parametrize("fmt, bad, column, what", BAD_ROWS)
def test_validation_error_names_row_and_column(fmt, bad, column, what):
    bad_index = 3
    rows = [GOOD_ROWS[fmt]] * bad_index + [bad] + [GOOD_ROWS[fmt]]
    validate_rows(rows[:bad_index], fmt, "train_data")  # the good rows alone pass
    with pytest.raises(ValueError) as err:
        validate_rows(rows, fmt, "train_data")
    message = str(err.value)
    assert message.startswith(f"train_data: row {bad_index}, column {column!r}"), message
    assert what in message, message


def test_assistant_message_with_tool_calls_may_have_no_content():
    row = {"messages": CONV + [{"role": "assistant", "content": None,
                                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
                               {"role": "tool", "content": "42"}]}
    validate_row(row, LM_CONV, "train_data", 0)


def test_row_that_is_not_a_dict():
    with pytest.raises(ValueError, match=re.escape("val_data: row 5: expected a dict of columns, got list")):
        validate_row(["text"], LM_STD, "val_data", 5)


def test_unknown_kind():
    with pytest.raises(ValueError, match="Unknown dataset kind 'chat'"):
        validate_row({"text": "x"}, DataFormat("chat", False), "train_data", 0)
