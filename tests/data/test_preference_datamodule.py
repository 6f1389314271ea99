"""PreferenceDataModule: tokenization identical to TRL 1.16's DPOTrainer (explicit, standard and implicit prompts),
batches identical to TRL's DataCollatorForPreference (with both truncation modes), the margin column, every malformed
row named, pairs that cannot fit counted and logged, and padded vs padding-free batches holding the same sequences."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers import sample_rows

from lightning_llm import PreferenceDataModule
from lightning_llm.data.preference import split_implicit_prompt
from lightning_llm.models import tiny_model, tiny_tokenizer

N_ROWS = 24


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def implicit_standard_rows(n: int) -> list[dict]:
    """Standard rows with the prompt left inside chosen and rejected (what TRL's ``extract_prompt`` splits)."""
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in sample_rows("preference_standard", n)]


ROWS = {
    "conversational": lambda n: sample_rows("preference", n),
    "standard": lambda n: sample_rows("preference_standard", n),
    "implicit_conversational": lambda n: sample_rows("preference_implicit", n),
    "implicit_standard": implicit_standard_rows,
}


def examples_of(rows, tokenizer, **kwargs) -> list[dict]:
    data = PreferenceDataModule(rows, tokenizer=tokenizer, shuffle=False, **kwargs)
    data.setup("fit")
    return data.train_dataset.to_list()


def trl_prepared(rows, tokenizer, tmp_path, **config) -> list[dict]:
    """TRL's prepared training set (prompt extraction, EOS, tokenization, the keep_start filter)."""
    pytest.importorskip("trl")
    from parity._trl_helpers import build_trl_trainer, trl_examples
    from trl import DPOConfig, DPOTrainer

    trainer = build_trl_trainer(DPOTrainer, DPOConfig, tiny_model("tiny-llama"), tokenizer, rows, tmp_path,
                                ref_model=tiny_model("tiny-llama"), **config)
    return trl_examples(trainer)


@pytest.mark.parametrize("kind", list(ROWS))
def test_tokenization_matches_trl(kind, tok, tmp_path):
    rows = ROWS[kind](N_ROWS)
    ours = examples_of(rows, tok, max_length=None)
    theirs = trl_prepared(rows, tok, tmp_path, max_length=None)
    assert len(ours) == len(theirs) == N_ROWS
    for i, (a, b) in enumerate(zip(ours, theirs)):
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert a[column] == b[column], f"row {i}, {column}"


def test_standard_completions_end_with_eos_and_conversational_with_end_of_turn(tok):
    for kind in ("standard", "implicit_standard"):
        for ex in examples_of(ROWS[kind](6), tok):
            assert ex["chosen_ids"][-1] == tok.eos_token_id and ex["rejected_ids"][-1] == tok.eos_token_id
            assert tok.eos_token_id not in ex["chosen_ids"][:-1]  # appended once, not doubled
    rows = [{"prompt": "Q: a?\nA:", "chosen": " yes" + tok.eos_token, "rejected": " no"}]
    ex = examples_of(rows, tok)[0]
    assert ex["chosen_ids"].count(tok.eos_token_id) == 1 and ex["rejected_ids"].count(tok.eos_token_id) == 1
    # ChatML: the assistant turn ends with <|im_end|> (the EOS) and the template's newline
    ex = examples_of(ROWS["conversational"](1), tok)[0]
    assert tok.decode(ex["chosen_ids"]).endswith("<|im_end|>\n")


def test_implicit_prompt_split_by_hand():
    assert split_implicit_prompt("Q: sky?\nA: blue", "Q: sky?\nA: green") == ("Q: sky?\nA:", " blue", " green")
    user, a, b = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}, \
        {"role": "assistant", "content": "B"}
    assert split_implicit_prompt([user, a], [user, b]) == ([user], [a], [b])
    with pytest.raises(ValueError, match="identical"):
        split_implicit_prompt("same", "same")


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncated_batches_match_trl_collator(mode, tok):
    """Each sequence cut to max_length at batching time, as TRL's DataCollatorForPreference does."""
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = examples_of(ROWS["conversational"](6), tok, max_length=None)
    data = PreferenceDataModule(tokenizer=tok, max_length=18, truncation_mode=mode, pad_to_multiple_of=4)
    ours = data.collate(examples)
    theirs = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=18, truncation_mode=mode,
                                       pad_to_multiple_of=4)([dict(e) for e in examples])
    assert ours.sequences.input_ids.shape[1] == 20  # longest is cut to 18, padded to a multiple of 4
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(ours.sequences, key), theirs[key]), key


def test_keep_start_drops_what_trl_drops(tok, tmp_path, caplog):
    """A pair whose prompt alone fills max_length keeps no completion token: dropped, counted, logged."""
    rows = ROWS["conversational"](N_ROWS)
    lengths = [len(e["prompt_ids"]) for e in examples_of(rows, tok, max_length=None)]
    limit = sorted(lengths)[N_ROWS // 2]  # about half the prompts fill it
    expected = [i for i, n in enumerate(lengths) if n >= limit]
    assert 0 < len(expected) < N_ROWS
    data = PreferenceDataModule(rows, tokenizer=tok, max_length=limit, truncation_mode="keep_start")
    with caplog.at_level(logging.WARNING, logger="lightning_llm"):
        data.setup("fit")
    assert data.reports["train_data"].dropped == {"prompt alone fills max_length": expected}
    assert data.reports["train_data"].examples == N_ROWS - len(expected)
    assert f"dropped {len(expected)} (prompt alone fills max_length" in caplog.text
    theirs = trl_prepared(rows, tok, tmp_path, max_length=limit, truncation_mode="keep_start")
    assert [e["prompt_ids"] for e in data.train_dataset.to_list()] == [e["prompt_ids"] for e in theirs]
    # keep_end keeps each completion's end: nothing is dropped
    data = PreferenceDataModule(rows, tokenizer=tok, max_length=limit, truncation_mode="keep_end")
    data.setup("fit")
    assert data.reports["train_data"].num_dropped == 0


def test_overflow_drop_and_error(tok, caplog):
    rows = ROWS["standard"](N_ROWS)
    full = examples_of(rows, tok, max_length=None)
    longest = [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in full]
    limit = sorted(longest)[N_ROWS // 2]
    too_long = [i for i, n in enumerate(longest) if n > limit]
    assert 0 < len(too_long) < N_ROWS
    data = PreferenceDataModule(rows, tokenizer=tok, max_length=limit, on_overflow="drop")
    with caplog.at_level(logging.WARNING, logger="lightning_llm"):
        data.setup("fit")
    assert data.reports["train_data"].dropped == {"longer than max_length": too_long}
    assert len(data.train_dataset) == N_ROWS - len(too_long)
    assert f"dropped {len(too_long)} (longer than max_length" in caplog.text
    kept = [e for i, e in enumerate(full) if i not in too_long]
    assert [e["chosen_ids"] for e in data.train_dataset.to_list()] == [e["chosen_ids"] for e in kept]
    with pytest.raises(ValueError, match=rf"train_data: row {too_long[0]}, column 'chosen'/'rejected'.*max_length"):
        PreferenceDataModule(rows, tokenizer=tok, max_length=limit, on_overflow="error").setup("fit")


def test_margin_is_carried(tok):
    rows = ROWS["standard"](5)
    for i, row in enumerate(rows):
        row["margin"] = [0.5, 2, -1.25, 0, 3.0][i]
    data = PreferenceDataModule(rows, tokenizer=tok, batch_size=5, shuffle=False)
    data.setup("fit")
    assert [e["margin"] for e in data.train_dataset.to_list()] == [0.5, 2.0, -1.25, 0.0, 3.0]
    batch = next(iter(data.train_dataloader()))
    assert batch.margin.dtype == torch.float32
    assert batch.margin.tolist() == [0.5, 2.0, -1.25, 0.0, 3.0]
    assert data.collate(examples_of(ROWS["standard"](2), tok)).margin is None


def _bad(kind: str, edit) -> list[dict]:
    rows = copy.deepcopy(ROWS[kind](5))
    edit(rows)
    return rows


def _set(index: int, column: str, value):
    return lambda rows: rows[index].__setitem__(column, value)


def _margins(bad_index: int, bad_value):
    def edit(rows):
        for row in rows:
            row["margin"] = 1.0
        rows[bad_index]["margin"] = bad_value
    return edit


MALFORMED = {
    "missing rejected": ("conversational", lambda rows: rows[2].pop("rejected"), 2, "rejected", "missing"),
    "missing prompt in one row": ("standard", _set(3, "prompt", None), 3, "prompt", "missing"),
    "rejected string vs chosen conversation": ("conversational", _set(1, "rejected", "1 plus 8 is 10."), 1,
                                               "rejected", "expected a list of messages"),
    "chosen conversation in a standard dataset": ("standard", _set(4, "chosen", [{"role": "assistant",
                                                                                  "content": "x"}]),
                                                  4, "chosen", "expected a string"),
    "identical (explicit prompt)": ("conversational", lambda rows: rows[3].__setitem__("rejected", rows[3]["chosen"]),
                                    3, "rejected", "identical"),
    "identical (standard)": ("standard", lambda rows: rows[0].__setitem__("rejected", rows[0]["chosen"]),
                             0, "rejected", "identical"),
    "identical (implicit prompt)": ("implicit_conversational",
                                    lambda rows: rows[2].__setitem__("rejected", rows[2]["chosen"]),
                                    2, "chosen", "identical"),
    "empty chosen string": ("standard", _set(1, "chosen", ""), 1, "chosen", "empty"),
    "empty rejected conversation": ("conversational", _set(4, "rejected", []), 4, "rejected", "empty"),
    "nothing left after the implicit prompt": ("implicit_standard",
                                               lambda rows: rows[2].__setitem__("rejected", rows[2]["chosen"] + "!"),
                                               2, "chosen", "empty"),
    "non-numeric margin": ("standard", _margins(2, "high"), 2, "margin", "expected a number"),
    "boolean margin": ("standard", _margins(1, True), 1, "margin", "expected a number"),
    "missing margin in one row": ("standard", _margins(4, None), 4, "margin", "missing"),
    "NaN margin": ("standard", _margins(3, float("nan")), 3, "margin", "finite number, got nan"),
    "infinite margin": ("standard", _margins(0, float("-inf")), 0, "margin", "finite number, got -inf"),
    "whitespace-only rejected": ("standard", _set(2, "rejected", "  \n "), 2, "rejected", "empty .only whitespace"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_rows_raise_naming_row_and_column(case, tok):
    kind, edit, row, column, words = MALFORMED[case]
    data = PreferenceDataModule(_bad(kind, edit), tokenizer=tok)
    with pytest.raises(ValueError, match=rf"train_data: row {row}, column '{column}'.*{words}"):
        data.setup("fit")


def test_validation_rows_are_named_as_such(tok):
    bad = _bad("standard", _set(2, "rejected", ""))
    data = PreferenceDataModule(ROWS["standard"](4), val_data=bad, tokenizer=tok)
    with pytest.raises(ValueError, match=r"val_data: row 2, column 'rejected'"):
        data.setup("fit")


@pytest.mark.parametrize("kind", ["conversational", "standard"])
def test_padded_and_padding_free_batches_hold_the_same_sequences(kind, tok):
    examples = examples_of(ROWS[kind](5), tok)
    B = len(examples)
    padded = PreferenceDataModule(tokenizer=tok).collate(examples)
    flat = PreferenceDataModule(tokenizer=tok, padding_free=True, pad_to_multiple_of=16).collate(examples)

    # chosen first: row i is pair i's prompt + chosen, row B + i its prompt + rejected
    expected = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + \
               [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    expected_masks = [[0] * len(e["prompt_ids"]) + [1] * len(e["chosen_ids"]) for e in examples] + \
                     [[0] * len(e["prompt_ids"]) + [1] * len(e["rejected_ids"]) for e in examples]
    real = padded.sequences.attention_mask.bool()
    assert padded.sequences.input_ids.shape[0] == 2 * B
    assert [padded.sequences.input_ids[r][real[r]].tolist() for r in range(2 * B)] == expected
    assert [padded.sequences.completion_mask[r][real[r]].tolist() for r in range(2 * B)] == expected_masks
    assert (padded.sequences.input_ids[~real] == tok.pad_token_id).all()
    assert (padded.sequences.completion_mask[~real] == 0).all()

    # padding-free: one row, sequences back to back, positions restarting, seq_index naming the sequence
    assert flat.sequences.padding_free and flat.sequences.attention_mask is None
    seq, pos = flat.sequences.seq_index[0], flat.sequences.position_ids[0]
    total = sum(len(s) for s in expected)
    assert flat.sequences.input_ids.shape == (1, -(-total // 16) * 16)
    assert (seq[total:] == -1).all() and (flat.sequences.input_ids[0, total:] == tok.pad_token_id).all()
    for r in range(2 * B):
        here = seq == r
        assert flat.sequences.input_ids[0][here].tolist() == expected[r]
        assert pos[here].tolist() == list(range(len(expected[r])))
        # the first token of a sequence is predicted by nothing of its own: never a completion token
        assert flat.sequences.completion_mask[0][here].tolist() == [0] + expected_masks[r][1:]


def test_precomputed_reference_logps_ride_along(tok):
    examples = examples_of(ROWS["standard"](3), tok)
    for i, e in enumerate(examples):
        e["ref_chosen_logps"], e["ref_rejected_logps"] = -1.5 * (i + 1), -2.5 * (i + 1)
    for padding_free in (False, True):
        batch = PreferenceDataModule(tokenizer=tok, padding_free=padding_free).collate(examples)
        assert batch.ref_chosen_logps.tolist() == [-1.5, -3.0, -4.5]
        assert batch.ref_rejected_logps.tolist() == [-2.5, -5.0, -7.5]
