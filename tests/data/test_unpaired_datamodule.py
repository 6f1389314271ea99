"""UnpairedPreferenceDataModule: unpairing order (all chosen, then all rejected), the KL completions rotated by one
within blocks of the batch size in dataset order, batches token by token, truncation and overflow policies, and
malformed rows raising a ValueError that names the row and the column. (Token-for-token identity with TRL's
KTOTrainer is in ``tests/parity/test_trl_kto.py``; the class-imbalance warning in ``tests/modules/test_kto.py``.)"""

from __future__ import annotations

import pytest
import torch
from helpers import sample_rows

from lightning_llm.data.unpaired import UnpairedPreferenceDataModule, unpair_rows
from lightning_llm.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def prepared(tok, rows, **kwargs) -> UnpairedPreferenceDataModule:
    dm = UnpairedPreferenceDataModule(rows, tokenizer=tok, **kwargs)
    dm.setup("fit")
    return dm


def ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def standard_rows(n: int) -> list[dict]:
    return [{"prompt": f"Question: what is {i} plus {i}?\nAnswer:", "completion": f" {2 * i} is the answer.",
             "label": i % 3 != 0} for i in range(n)]


# ------------------------------------------------------------------------------------------------------ unpairing
def test_unpairing_puts_every_chosen_row_first():
    rows = [{"prompt": f"p{i}", "chosen": f" good {i}", "rejected": f" bad {i}", "source": f"s{i}"}
            for i in range(3)]
    assert unpair_rows(rows) == [
        {"prompt": "p0", "completion": " good 0", "label": True, "source": "s0"},
        {"prompt": "p1", "completion": " good 1", "label": True, "source": "s1"},
        {"prompt": "p2", "completion": " good 2", "label": True, "source": "s2"},
        {"prompt": "p0", "completion": " bad 0", "label": False, "source": "s0"},
        {"prompt": "p1", "completion": " bad 1", "label": False, "source": "s1"},
        {"prompt": "p2", "completion": " bad 2", "label": False, "source": "s2"},
    ]


def test_paired_data_is_unpaired_and_tokenized(tok):
    """Standard pairs: examples 0..n-1 are the chosen completions, n..2n-1 the rejected ones, each prompt + completion
    + EOS tokenized as one text and split where the prompt's tokens end."""
    rows = sample_rows("preference_standard", 4)
    examples = prepared(tok, rows).train_dataset.to_list()
    assert [ex["label"] for ex in examples] == [True] * 4 + [False] * 4
    for k, ex in enumerate(examples):
        row = rows[k % 4]
        completion = row["chosen"] if k < 4 else row["rejected"]
        assert ex["prompt_ids"] == ids(tok, row["prompt"])
        assert ex["prompt_ids"] + ex["completion_ids"] == ids(tok, row["prompt"] + completion + tok.eos_token)
        assert tok.decode(ex["completion_ids"]) == completion + tok.eos_token


def test_implicit_prompt_pairs_are_unpaired(tok):
    """Conversations without a prompt column: the shared turns are the prompt; the completion is the assistant turn,
    rendered by the chat template."""
    rows = sample_rows("preference_implicit", 3)
    examples = prepared(tok, rows).train_dataset.to_list()
    assert [ex["label"] for ex in examples] == [True] * 3 + [False] * 3
    for k, ex in enumerate(examples):
        side = "chosen" if k < 3 else "rejected"
        answer = rows[k % 3][side][-1]["content"]
        assert tok.decode(ex["prompt_ids"]).endswith("<|im_start|>assistant\n")
        assert tok.decode(ex["completion_ids"]) == f"{answer}<|im_end|>\n"


# ----------------------------------------------------------------------------------------------------- KL pairs
def test_kl_completions_rotate_by_one_within_blocks(tok):
    """7 examples in blocks of 3: (x1,y3) (x2,y1) (x3,y2) | (x4,y6) (x5,y4) (x6,y5) | (x7,y7) — a last block of one
    keeps its own completion, as TRL's batched map does."""
    examples = prepared(tok, standard_rows(7), batch_size=3).train_dataset.to_list()
    completions = [ex["completion_ids"] for ex in examples]
    assert len(set(map(tuple, completions))) == 7
    expected = [2, 0, 1, 5, 3, 4, 6]
    assert [ex["kl_completion_ids"] for ex in examples] == [completions[j] for j in expected]


def test_validation_blocks_follow_the_validation_batch_size(tok):
    dm = UnpairedPreferenceDataModule(standard_rows(4), standard_rows(4), tokenizer=tok, batch_size=4,
                                      val_batch_size=2)
    dm.setup("fit")
    train = [ex["completion_ids"] for ex in dm.train_dataset.to_list()]
    val = [ex["completion_ids"] for ex in dm.val_dataset.to_list()]
    assert [ex["kl_completion_ids"] for ex in dm.train_dataset.to_list()] == [train[3], train[0], train[1], train[2]]
    assert [ex["kl_completion_ids"] for ex in dm.val_dataset.to_list()] == [val[1], val[0], val[3], val[2]]


def test_sequential_batches_hold_their_own_completions(tok):
    """With shuffle=False each batch's mismatched completions are that batch's completions (TRL's construction)."""
    dm = prepared(tok, standard_rows(6), batch_size=3, shuffle=False)
    for batch in dm.train_dataloader():
        own, kl = ({tuple(row[m.bool()].tolist()) for row, m in zip(seqs.input_ids, seqs.completion_mask)}
                   for seqs in (batch.sequences, batch.kl_sequences))
        assert own == kl


def test_no_kl_pairs(tok):
    dm = prepared(tok, standard_rows(4), kl_pairs=False)
    assert "kl_completion_ids" not in dm.train_dataset.to_list()[0]
    assert dm.collate(dm.train_dataset.to_list()).kl_sequences is None


# ------------------------------------------------------------------------------------------------------- batches
def test_collate_token_by_token(tok):
    dm = prepared(tok, standard_rows(3), batch_size=3, pad_to_multiple_of=8)
    examples = dm.train_dataset.to_list()
    for ex, value in zip(examples, (-1.5, -2.0, -3.25)):
        ex["ref_logps"], ex["ref_kl_logps"] = value, 2 * value
    batch = dm.collate(examples)
    width = batch.sequences.input_ids.shape[1]
    assert width % 8 == 0
    for prefix, key in (("", "completion_ids"), ("kl_", "kl_completion_ids")):
        for i, ex in enumerate(examples):
            seq = ex["prompt_ids"] + ex[key]
            pad = width - len(seq) if prefix == "" else batch.kl_sequences.input_ids.shape[1] - len(seq)
            seqs = batch.sequences if prefix == "" else batch.kl_sequences
            assert seqs.input_ids[i].tolist() == seq + [tok.pad_token_id] * pad
            assert seqs.attention_mask[i].tolist() == [1] * len(seq) + [0] * pad
            assert seqs.completion_mask[i].tolist() == \
                [0] * len(ex["prompt_ids"]) + [1] * len(ex[key]) + [0] * pad
    assert batch.label.dtype == torch.bool
    assert batch.label.tolist() == [ex["label"] for ex in examples]
    assert batch.ref_logps.tolist() == [-1.5, -2.0, -3.25]
    assert batch.ref_kl_logps.tolist() == [-3.0, -4.0, -6.5]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation(tok, mode):
    rows = standard_rows(2)
    full = prepared(tok, rows, max_length=None).train_dataset.to_list()
    dm = prepared(tok, rows, max_length=14, truncation_mode=mode)
    batch = dm.collate(dm.train_dataset.to_list())
    for i, ex in enumerate(full):
        seq = ex["prompt_ids"] + ex["completion_ids"]
        mask = [0] * len(ex["prompt_ids"]) + [1] * len(ex["completion_ids"])
        assert len(seq) > 14
        cut = slice(None, 14) if mode == "keep_start" else slice(-14, None)
        assert batch.sequences.input_ids[i].tolist() == seq[cut]
        assert batch.sequences.completion_mask[i].tolist() == mask[cut]


def test_overflow_policies(tok):
    rows = standard_rows(3)
    rows[1]["completion"] = " a much longer completion than any other row in this small dataset, on purpose."
    dm = prepared(tok, rows, max_length=24, on_overflow="drop")
    assert len(dm.train_dataset) == 2
    assert dm.reports["train_data"].dropped == {"longer than max_length": [1]}
    with pytest.raises(ValueError, match=r"train_data: row 1, column 'completion'.*max_length=24"):
        prepared(tok, rows, max_length=24, on_overflow="error")
    # keep_start: a prompt that fills max_length leaves no completion token; the row is dropped and counted, the
    # others are truncated
    rows[2]["prompt"] = "Question: " + "what is two plus two, once more? " * 3 + "\nAnswer:"
    prompt_len = len(ids(tok, rows[2]["prompt"]))
    dm = prepared(tok, rows, max_length=prompt_len)
    assert dm.reports["train_data"].dropped == {"prompt alone fills max_length": [2]}
    assert len(dm.train_dataset) == 2
    assert dm.collate(dm.train_dataset.to_list()).sequences.input_ids.shape[1] <= prompt_len


# ------------------------------------------------------------------------------------------------- malformed rows
def bad_unpaired(index: int, **changes) -> list[dict]:
    rows = standard_rows(4)
    rows[index].update(changes)
    return rows


@pytest.mark.parametrize("rows, where", [
    (bad_unpaired(2, label=1), r"row 2, column 'label'.*bool"),
    (bad_unpaired(1, label="true"), r"row 1, column 'label'.*bool"),
    (bad_unpaired(3, label=None), r"row 3, column 'label'"),
    (bad_unpaired(2, completion=""), r"row 2, column 'completion'.*empty"),
    (bad_unpaired(1, prompt=""), r"row 1, column 'prompt'.*empty"),
    (bad_unpaired(1, completion=["not", "a", "string"]), r"row 1, column 'completion'"),
    ([{k: v for k, v in row.items() if (i, k) != (2, "label")} for i, row in enumerate(standard_rows(4))],
     r"row 2, column 'label'.*missing"),
    ([{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}],
       "label": True},
      {"prompt": [{"role": "user", "content": "hi"}], "completion": [], "label": False}],
     r"row 1, column 'completion'"),
    ([{"prompt": "p", "chosen": " a", "rejected": " b"}, {"prompt": "q", "chosen": " a", "rejected": ""}],
     r"row 1, column 'rejected'.*empty"),
    ([{"chosen": "Same text.", "rejected": "Same text."}], r"row 0, column 'chosen'.*identical"),
    ([{"chosen": "Q: x? A: yes", "rejected": "Q: x? A: yes"[:9] + "no"},
      {"chosen": "Q: y? A:", "rejected": "Q: y? A: no"}], r"row 1, column 'chosen'.*empty"),
])
def test_malformed_rows_name_row_and_column(tok, rows, where):
    with pytest.raises(ValueError, match=where):
        prepared(tok, rows)
