"""Row sources: shipped samples, json/jsonl/parquet/csv files, datasets objects, lists; the validation split."""

from __future__ import annotations

import json

import datasets
import pytest
from helpers import sample_rows

from lightning_llm.data.sources import load_rows, load_source, split_rows

ROWS = [
    {"prompt": "Question: 1+1?", "completion": " two", "score": 0.5},
    {"prompt": "Question: 2+3?", "completion": " five", "score": 1.5},
    {"prompt": "Question: 9-4?", "completion": " five, again", "score": -2.0},
]


def test_sample_source_is_the_shipped_file():
    assert load_rows("sample:messages") == sample_rows("messages")
    assert load_rows("sample:stepwise") == sample_rows("stepwise")


def test_unknown_sample_lists_the_shipped_ones():
    with pytest.raises(ValueError, match=r"Unknown sample dataset 'nope'.*'messages'"):
        load_rows("sample:nope")


def test_jsonl_and_json_array_files(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")  # a trailing blank line is fine
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ROWS, indent=2))
    assert load_rows(str(jsonl)) == ROWS
    assert load_rows(array) == ROWS  # a Path works too


def test_jsonl_with_a_bad_line_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "oops",\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: line 2 is not valid JSON"):
        load_rows(str(path))


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_parquet_and_csv_files(tmp_path, suffix):
    path = tmp_path / f"rows.{suffix}"
    dataset = datasets.Dataset.from_list(ROWS)
    getattr(dataset, f"to_{suffix}")(str(path))
    assert load_rows(str(path)) == ROWS


def test_unsupported_file_type_and_missing_file(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'"):
        load_rows(str(path), name="val_data")
    with pytest.raises(ValueError, match=r"train_data: no such file or directory"):
        load_rows(str(tmp_path / "missing.jsonl"), name="train_data")


def test_datasets_objects_and_saved_directory(tmp_path):
    dataset = datasets.Dataset.from_list(ROWS)
    assert load_rows(dataset) == ROWS
    both = datasets.DatasetDict({"train": dataset, "test": datasets.Dataset.from_list(ROWS[:1])})
    assert load_rows(both, split="test") == ROWS[:1]
    with pytest.raises(ValueError, match=r"split 'validation' not in the DatasetDict"):
        load_rows(both, split="validation")
    both.save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved"), split="train") == ROWS


def test_list_of_dicts_and_bad_sources():
    assert load_rows(ROWS) == ROWS
    assert load_rows(tuple(ROWS)) == ROWS
    with pytest.raises(ValueError, match=r"train_data: row 1: expected a dict of columns, got str"):
        load_rows([ROWS[0], "text"], name="train_data")
    with pytest.raises(ValueError, match="no data given"):
        load_rows(None)
    with pytest.raises(ValueError, match="got int"):
        load_rows(42)


def test_split_rows_is_a_reproducible_partition():
    rows = [{"i": i} for i in range(20)]
    train, val = split_rows(rows, 0.25, seed=7)
    assert len(val) == 5 and len(train) == 15
    assert sorted(r["i"] for r in train + val) == list(range(20))  # a partition: nothing lost, nothing twice
    # original order is kept within each part
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)
    assert split_rows(rows, 0.25, seed=7) == (train, val)
    other = [split_rows(rows, 0.25, seed=s)[1] for s in range(1, 6)]
    assert any(v != val for v in other)  # the seed matters
    _, tiny_val = split_rows(rows[:3], 0.01, seed=0)
    assert len(tiny_val) == 1  # at least one validation row


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_split_rows_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="val_split must be a fraction"):
        split_rows([{"i": 0}, {"i": 1}], fraction, seed=0)


def test_split_rows_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        split_rows([{"i": 0}], 0.5, seed=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 1 << 22])
def test_bytes_that_are_not_utf8_are_named_by_line_and_byte(tmp_path, chunk_size):
    from lightning_llm.data.sources import check_utf8

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: line 3, byte 14: not valid UTF-8 \(byte 0xe9\)"):
        check_utf8(path, chunk_size=chunk_size)
    for load in (load_rows, load_source):
        with pytest.raises(ValueError, match=r"rows.jsonl: line 3, byte 14: not valid UTF-8"):
            load(str(path))
