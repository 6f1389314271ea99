"""SFTDataModule: what each kind of row becomes (ids and loss labels), length handling, reports, loaders."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import IGNORE, quiet_trainer, sample_rows

from lightning_llm.data.formats import sharegpt_to_messages
from lightning_llm.data.sft import SFTDataModule
from lightning_llm.models import tiny_tokenizer

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def prepared(rows, tok, **kwargs):
    dm = SFTDataModule(rows, tokenizer=tok, shuffle=False, **kwargs)
    dm.setup("fit")
    return dm


def trained_text(tok, example):
    """The decoded tokens that carry a loss label."""
    return tok.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE])


def test_text_rows_get_eos_and_train_on_everything(tok):
    rows = [{"text": "Blood is red."}, {"text": "Grass is green." + IM_END}]
    dm = prepared(rows, tok)
    first, second = dm.train_dataset
    assert first["input_ids"] == tok("Blood is red.")["input_ids"] + [tok.eos_token_id]
    assert second["input_ids"] == tok("Grass is green.")["input_ids"] + [tok.eos_token_id]  # EOS not doubled
    assert first["labels"] == first["input_ids"] and second["labels"] == second["input_ids"]
    assert dm.format.kind == "language_modeling" and not dm.format.conversational


def test_dataset_text_field(tok):
    dm = prepared([{"content": "Blood is red."}, {"content": "Snow is white."}], tok, dataset_text_field="content")
    assert dm.train_dataset[1]["input_ids"] == tok("Snow is white." + IM_END)["input_ids"]


def test_messages_train_on_the_whole_conversation_by_default(tok):
    rows = sample_rows("messages", 4)
    dm = prepared(rows, tok)
    for row, example in zip(rows, dm.train_dataset):
        ids = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert example["input_ids"] == list(ids)
        assert example["labels"] == example["input_ids"]


def test_messages_assistant_only_loss(tok):
    rows = sample_rows("messages", 12)
    assert any(m["role"] == "system" for row in rows for m in row["messages"])
    dm = prepared(rows, tok, assistant_only_loss=True)
    for row, example in zip(rows, dm.train_dataset):
        expected = "".join(m["content"] + IM_END for m in row["messages"] if m["role"] == "assistant")
        assert trained_text(tok, example) == expected
        # labels are the ids themselves where trained
        assert all(lab in (IGNORE, t) for t, lab in zip(example["input_ids"], example["labels"]))


def test_sharegpt_rows_become_messages(tok):
    sharegpt = sample_rows("sharegpt", 6)
    converted = [{"messages": sharegpt_to_messages(row["conversations"])} for row in sharegpt]
    assert converted[0]["messages"][0]["role"] == "user" and converted[0]["messages"][1]["role"] == "assistant"
    for assistant_only in (False, True):
        a = prepared(sharegpt, tok, assistant_only_loss=assistant_only)
        b = prepared(converted, tok, assistant_only_loss=assistant_only)
        assert list(a.train_dataset) == list(b.train_dataset)
        assert a.format.conversational


@pytest.mark.parametrize("completion_only_loss", [None, True, False])
def test_standard_prompt_completion(tok, completion_only_loss):
    rows = sample_rows("prompt_completion", 5)
    dm = prepared(rows, tok, completion_only_loss=completion_only_loss)
    for row, example in zip(rows, dm.train_dataset):
        assert example["input_ids"] == tok(row["prompt"] + row["completion"] + IM_END)["input_ids"]
        if completion_only_loss is False:
            assert example["labels"] == example["input_ids"]
        else:  # on by default, as in TRL; EOS appended to the completion and trained
            assert trained_text(tok, example) == row["completion"] + IM_END
            assert example["labels"][-1] == tok.eos_token_id


@pytest.mark.parametrize("completion_only_loss, assistant_only_loss", [(None, False), (False, False), (None, True),
                                                                       (False, True)])
def test_conversational_prompt_completion(tok, completion_only_loss, assistant_only_loss):
    rows = sample_rows("prompt_completion_conversational", 5)
    dm = prepared(rows, tok, completion_only_loss=completion_only_loss, assistant_only_loss=assistant_only_loss)
    for row, example in zip(rows, dm.train_dataset):
        full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)
        assert example["input_ids"] == list(full["input_ids"])
        answer = row["completion"][0]["content"]
        if assistant_only_loss:  # the end-of-turn token is trained, the template's newline is not
            assert trained_text(tok, example) == answer + IM_END
        elif completion_only_loss is None:  # what follows the generation prompt
            assert trained_text(tok, example) == answer + IM_END + "\n"
        else:
            assert example["labels"] == example["input_ids"]


def long_rows():
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    long = {"messages": [{"role": "user", "content": "Tell me a long story " * 6},
                         {"role": "assistant", "content": "Once upon a time " * 6}]}
    return [short, long, short, long, short]


def test_overflow_error_names_row_and_column(tok):
    with pytest.raises(ValueError) as err:
        prepared(long_rows(), tok, max_length=32, on_overflow="error")
    message = str(err.value)
    assert message.startswith("train_data: row 1, column 'messages'") and "max_length=32" in message


def test_overflow_drop_is_counted_and_logged(tok, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_llm.data.base"):
        dm = prepared(long_rows(), tok, max_length=32, on_overflow="drop")
    report = dm.reports["train_data"]
    assert report.rows == 5 and report.examples == 3 and len(dm.train_dataset) == 3
    assert report.dropped == {"longer than max_length": [1, 3]}
    assert report.num_dropped == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "dropped 2 (longer than max_length: rows 1, 3)" in warnings[0].getMessage()


def test_nothing_dropped_is_still_reported(tok, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_llm.data.base"):
        dm = prepared(long_rows(), tok, max_length=None)
    assert dm.reports["train_data"].num_dropped == 0
    assert "train_data: 5 rows -> 5 examples" in caplog.text


def test_every_row_dropped_is_an_error(tok):
    rows = [r for r in long_rows() if len(r["messages"][0]["content"]) > 10]
    with pytest.raises(ValueError, match=r"train_data: no example left after preparation.*dropped 2"):
        prepared(rows, tok, max_length=32, on_overflow="drop")


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_modes(tok, mode):
    full = prepared(long_rows(), tok, max_length=None).train_dataset[1]
    cut = prepared(long_rows(), tok, max_length=32, truncation_mode=mode).train_dataset[1]
    assert len(full["input_ids"]) > 32 and len(cut["input_ids"]) == 32
    part = slice(None, 32) if mode == "keep_start" else slice(-32, None)
    assert cut["input_ids"] == full["input_ids"][part] and cut["labels"] == full["labels"][part]


def test_truncation_leaving_no_trainable_token_drops_the_row(tok, caplog):
    rows = [{"prompt": "Question: " + "very " * 20 + "long?\nAnswer:", "completion": " Yes."},
            {"prompt": "Q:", "completion": " No."}]
    with caplog.at_level(logging.WARNING, logger="lightning_llm.data.base"):
        dm = prepared(rows, tok, max_length=16)
    assert dm.reports["train_data"].dropped == {"no trainable token left after truncation": [0]}
    assert len(dm.train_dataset) == 1 and "no trainable token" in caplog.text


def test_invalid_rows_fail_in_setup_naming_them(tok):
    rows = sample_rows("messages", 4)
    rows[2] = {"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]}
    with pytest.raises(ValueError, match=r"train_data: row 2, column 'messages', message 1: unknown role 'bot'"):
        prepared(rows, tok)
    with pytest.raises(ValueError, match=r"val_data: row 0, column 'text': the text is empty"):
        SFTDataModule(val_data=[{"text": ""}], tokenizer=tok).setup("validate")


def test_assistant_only_loss_without_assistant_turn_names_the_row(tok):
    rows = sample_rows("messages", 3) + [{"messages": [{"role": "user", "content": "Anyone?"}]}]
    with pytest.raises(ValueError, match=r"train_data: row 3, column 'messages': .*no assistant tokens"):
        prepared(rows, tok, assistant_only_loss=True)


def test_other_dataset_kinds_are_refused(tok):
    with pytest.raises(ValueError, match=r"train_data: SFTDataModule needs a dataset of kind language_modeling or "
                                         r"prompt_completion, got preference"):
        prepared(sample_rows("preference", 4), tok)


def test_constructor_checks():
    with pytest.raises(ValueError, match="on_overflow"):
        SFTDataModule("sample:text", on_overflow="ignore")
    with pytest.raises(ValueError, match="truncation_mode"):
        SFTDataModule("sample:text", truncation_mode="middle")
    with pytest.raises(ValueError, match="either val_data or val_split"):
        SFTDataModule("sample:text", val_data="sample:text", val_split=0.1)
    with pytest.raises(ValueError, match="packing needs max_length"):
        SFTDataModule("sample:text", packing=True, max_length=None)
    with pytest.raises(ValueError, match="packing_strategy"):
        SFTDataModule("sample:text", packing_strategy="wrapped")


def test_val_split_and_val_data(tok):
    rows = sample_rows("text", 20)
    dm = prepared(rows, tok, val_split=0.2)
    assert len(dm.train_dataset) == 16 and len(dm.val_dataset) == 4
    train_ids = {tuple(e["input_ids"]) for e in dm.train_dataset}
    assert not train_ids & {tuple(e["input_ids"]) for e in dm.val_dataset}
    dm2 = prepared(rows[:10], tok, val_data=rows[10:13])
    assert len(dm2.val_dataset) == 3 and len(dm2.val_dataloader()) == 1
    assert dm2.val_dataset[0]["input_ids"] == tok(rows[10]["text"] + IM_END)["input_ids"]
    assert prepared(rows[:4], tok).val_dataloader() == []


def test_loaders_batch_size_order_and_seed(tok):
    rows = sample_rows("text", 10)
    dm = prepared(rows, tok, batch_size=4)
    batches = list(dm.train_dataloader())
    assert [b.input_ids.shape[0] for b in batches] == [4, 4, 2]
    first = batches[0]
    assert first.input_ids[0, : len(dm.train_dataset[0]["input_ids"])].tolist() == dm.train_dataset[0]["input_ids"]
    assert first.attention_mask is not None and not first.padding_free
    lengths = first.attention_mask.sum(1).tolist()
    assert lengths == [len(dm.train_dataset[i]["input_ids"]) for i in range(4)]

    def order(seed):
        shuffled = SFTDataModule(rows, tokenizer=tok, batch_size=10, shuffle=True, seed=seed)
        shuffled.setup("fit")
        return next(iter(shuffled.train_dataloader())).input_ids

    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))


def test_pad_to_multiple_of_and_padding_free(tok):
    rows = sample_rows("text", 3)
    batch = next(iter(prepared(rows, tok, pad_to_multiple_of=16).train_dataloader()))
    assert batch.input_ids.shape[1] % 16 == 0
    assert (batch.labels[batch.attention_mask == 0] == IGNORE).all()
    flat = next(iter(prepared(rows, tok, padding_free=True).train_dataloader()))
    assert flat.input_ids.shape == (1, sum(len(tok(r["text"] + IM_END)["input_ids"]) for r in rows))
    assert (flat.position_ids == 0).sum() == 3


def test_tokenizer_by_name_and_chat_template_override(tok):
    dm = SFTDataModule(sample_rows("messages", 2), tokenizer="tiny-llama",
                       chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    dm.setup("fit")
    text = "".join(f"{m['role']}: {m['content']}\n" for m in sample_rows("messages", 1)[0]["messages"])
    assert dm.train_dataset[0]["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_prompts_for_generation(tok):
    dm = prepared(sample_rows("messages", 6), tok, val_data=sample_rows("prompt_completion", 3))
    assert dm.prompts("val") == [r["prompt"] for r in sample_rows("prompt_completion", 3)]
    train_prompts = dm.prompts("train", limit=2)
    assert train_prompts == [r["messages"][:-1] for r in sample_rows("messages", 2)]


def test_tokenizer_comes_from_the_module(tmp_path):
    from lightning_llm.modules.sft import SFTModule

    module = SFTModule("tiny-llama")
    dm = SFTDataModule(sample_rows("text", 4), batch_size=4)
    with pytest.raises(ValueError, match="has no tokenizer"):
        dm.setup("fit")
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(module, dm)
    assert dm.tokenizer is module.tokenizer
    assert len(dm.train_dataset) == 4


def test_truncation_is_counted_and_logged(tok, caplog):
    rows = [{"text": "short."}, {"text": "a much longer sentence " * 8}, {"text": "another long one " * 9}]
    with caplog.at_level(logging.WARNING, logger="lightning_llm"):
        dm = prepared(rows, tok, max_length=16)
    assert dm.reports["train_data"].truncated == 2 and dm.reports["train_data"].num_dropped == 0
    assert "truncated 2 to max_length" in caplog.text


@pytest.mark.parametrize("kwargs, words", [
    ({"val_batch_size": -1}, "val_batch_size must be >= 1"), ({"num_workers": -1}, "num_workers must be >= 0"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be >= 1"), ({"num_proc": 0}, "num_proc must be >= 1"),
])
def test_bad_loader_settings_fail_at_construction(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SFTDataModule(**kwargs)
