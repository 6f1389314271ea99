"""StepwiseDataModule: tokenization written out by hand (TRL's ``PRMTrainer.tokenize_row`` convention; TRL 1.16 ships
no PRMTrainer to compare with), truncation, batching, and bad rows."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_llm.data.stepwise import StepwiseDataModule
from lightning_llm.models import tiny_tokenizer

ROW = {"prompt": "What is 2 plus 3?", "completions": ["2 plus 3 is 5.", "The answer is 5."], "labels": [True, False]}
# The tiny tokenizer's pieces of ROW, read off the vocabulary: prompt, step 1, step 2, and "\n" (Ċ).
PROMPT_TOKENS = ["What", "Ġis", "Ġ2", "Ġplus", "Ġ3", "?"]
STEP1_TOKENS = ["2", "Ġplus", "Ġ3", "Ġis", "Ġ5", "."]
STEP2_TOKENS = ["The", "Ġanswer", "Ġis", "Ġ5", "."]
N = -100


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """The tiny tokenizer with a BOS token, to exercise the BOS branch (it has none of its own)."""
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.bos_token = "<|im_start|>"
    assert tokenizer.bos_token_id is not None
    return tokenizer


def prepare(rows, tokenizer, split="train", **kwargs):
    """Encoded examples of ``rows`` as the training (or validation) split."""
    kwargs.setdefault("drop_unlabelled", False)
    data = {"train_data": rows} if split == "train" else {"val_data": rows}
    dm = StepwiseDataModule(**data, tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    dataset = dm.train_dataset if split == "train" else dm.val_dataset
    return dm, dataset.to_list()


def tokens(tokenizer, example):
    return tokenizer.convert_ids_to_tokens(example["input_ids"])


# ------------------------------------------------------------------------------------------------ by hand
def test_labels_on_each_steps_separator(tok):
    _, (example,) = prepare([ROW], tok)
    assert tokens(tok, example) == PROMPT_TOKENS + STEP1_TOKENS + ["Ċ"] + STEP2_TOKENS + ["Ċ"]
    assert example["labels"] == [N] * 6 + [N] * 6 + [1] + [N] * 5 + [0]


def test_empty_and_multi_token_separators(tok):
    _, (plain,) = prepare([ROW], tok, step_separator="")
    assert tokens(tok, plain) == PROMPT_TOKENS + STEP1_TOKENS + STEP2_TOKENS
    assert plain["labels"] == [N] * 6 + [N] * 5 + [1] + [N] * 4 + [0]
    _, (double,) = prepare([ROW], tok, step_separator="\n\n")
    assert tokens(tok, double) == PROMPT_TOKENS + STEP1_TOKENS + ["Ċ", "Ċ"] + STEP2_TOKENS + ["Ċ", "Ċ"]
    assert double["labels"] == [N] * 6 + [N] * 7 + [1] + [N] * 6 + [0]


def test_bos_goes_before_the_prompt(bos_tok):
    _, (example,) = prepare([ROW], bos_tok)
    assert tokens(bos_tok, example) == ["<|im_start|>"] + PROMPT_TOKENS + STEP1_TOKENS + ["Ċ"] + STEP2_TOKENS + ["Ċ"]
    assert example["labels"][:7] == [N] * 7 and example["labels"][13] == 1 and example["labels"][-1] == 0


def test_truncation_rules(tok, bos_tok):
    # max_completion_length keeps the first completion tokens: step 1 + "\n" + "The" -> one label left.
    _, (completion_cut,) = prepare([ROW], tok, max_completion_length=8)
    assert tokens(tok, completion_cut) == PROMPT_TOKENS + STEP1_TOKENS + ["Ċ", "The"]
    assert completion_cut["labels"] == [N] * 12 + [1, N]
    # max_prompt_length keeps the end of the prompt, BOS included in the count (so BOS is the first to go).
    _, (prompt_cut,) = prepare([ROW], bos_tok, max_prompt_length=3)
    assert tokens(bos_tok, prompt_cut)[:4] == ["Ġplus", "Ġ3", "?", "2"]
    assert prompt_cut["labels"] == [N] * 3 + [N] * 6 + [1] + [N] * 5 + [0]
    # max_length cuts the end of the whole sequence.
    _, (length_cut,) = prepare([ROW], tok, max_length=10)
    assert tokens(tok, length_cut) == PROMPT_TOKENS + STEP1_TOKENS[:4] and length_cut["labels"] == [N] * 10


def test_train_on_last_step_only_applies_to_training_rows_only(tok):
    _, (train,) = prepare([ROW], tok, train_on_last_step_only=True)
    assert train["labels"] == [N] * 18 + [0]
    _, (val,) = prepare([ROW], tok, split="val", train_on_last_step_only=True)
    assert val["labels"][12] == 1 and val["labels"][-1] == 0


def test_unlabelled_examples_are_dropped_and_reported(tok):
    rows = [ROW, dict(ROW, prompt="What is 2 plus 3? " * 4)]  # the second prompt alone fills max_length
    dm, examples = prepare(rows, tok, max_length=16, drop_unlabelled=True)
    assert len(examples) == 1 and examples[0]["labels"][12] == 1
    assert dm.reports["train_data"].dropped == {"no labelled step left after truncation": [1]}
    _, kept = prepare(rows, tok, max_length=16, drop_unlabelled=False)
    assert len(kept) == 2 and set(kept[1]["labels"]) == {N}


def test_overflow_error_and_drop(tok):
    with pytest.raises(ValueError, match=r"train_data: row 0, column 'completions': 19 tokens .* max_length=10"):
        prepare([ROW], tok, max_length=10, on_overflow="error")
    dm, examples = prepare([ROW, dict(ROW, completions=["Yes."], labels=[True])], tok, max_length=10,
                           on_overflow="drop")
    assert len(examples) == 1 and dm.reports["train_data"].dropped == {"longer than max_length": [0]}


def test_collate_pads_right(tok):
    short = {"prompt": "Hi?", "completions": ["Yes."], "labels": [True]}
    dm, examples = prepare([ROW, short], tok, pad_to_multiple_of=8)
    batch = dm.collate(examples)
    n0, n1 = len(examples[0]["input_ids"]), len(examples[1]["input_ids"])
    assert batch.input_ids.shape == (2, 24)  # 19 tokens, padded to a multiple of 8
    assert batch.input_ids[1, n1:].eq(tok.pad_token_id).all()
    assert batch.attention_mask.sum(1).tolist() == [n0, n1]
    assert batch.labels[0, n0:].eq(N).all() and batch.labels[1, :n1].tolist() == examples[1]["labels"]
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long


# --------------------------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": [True]}, r"row 1, column 'labels': 1 labels for 2 steps"),
        ({"labels": [1, 0]}, r"row 1, column 'labels': expected a list of bools"),
        ({"completions": ["2 plus 3 is 5.", ""]}, r"row 1, column 'completions', step 1: expected a non-empty"),
        ({"completions": []}, r"row 1, column 'completions': expected a non-empty list"),
        ({"prompt": None}, r"row 1, column 'prompt': missing value"),
        ({"prompt": [{"role": "user", "content": "Hi"}]}, r"row 1, column 'prompt': expected a string"),
    ],
)
def test_bad_rows_name_row_and_column(tok, change, message):
    with pytest.raises(ValueError, match=message):
        prepare([ROW, dict(ROW, **change)], tok)


def test_wrong_dataset_kind_and_arguments(tok):
    with pytest.raises(ValueError, match="needs a dataset of kind stepwise_supervision"):
        prepare([{"prompt": "Hi", "chosen": "a", "rejected": "b"}], tok)
    with pytest.raises(ValueError, match="max_prompt_length must be >= 1"):
        StepwiseDataModule(max_prompt_length=0)
    with pytest.raises(ValueError, match="step_separator must be a string"):
        StepwiseDataModule(step_separator=None)


def test_tokenizer_taken_from_the_module(tok):
    class FakeModule:
        tokenizer = tok

    dm = StepwiseDataModule([ROW])
    dm.trainer = type("FakeTrainer", (), {"lightning_module": FakeModule()})()
    dm.setup("fit")
    assert dm.train_dataset.to_list()[0]["labels"][-1] == 0
