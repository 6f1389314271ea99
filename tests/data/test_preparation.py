"""Arrow-backed preparation: the on-disk cache and its fingerprints, ``num_proc``, tokenizers left as they were
handed in, and streams (validated and tokenized as they are read, in bounded memory)."""

from __future__ import annotations

import copy
import gc
import tracemalloc

import datasets
import pytest
import torch
from helpers import sample_rows

from lightning_llm import DPOModule, PreferenceDataModule, SFTDataModule, UnpairedPreferenceDataModule
from lightning_llm.data.cache import tokenizer_fingerprint
from lightning_llm.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


class Counting:
    """Counts the rows a data module class encodes (patched onto the class for one test)."""

    def __init__(self, monkeypatch, cls) -> None:
        self.calls = 0
        original = cls.encode_batch

        def encode_batch(module, rows, *args, **kwargs):
            self.calls += len(rows)
            return original(module, rows, *args, **kwargs)

        monkeypatch.setattr(cls, "encode_batch", encode_batch)


def prepared(cls, data, tok, **kwargs):
    dm = cls(data, tokenizer=tok, shuffle=False, **kwargs)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------------------ cache
def test_a_second_preparation_loads_the_cache(tok, tmp_path, monkeypatch):
    rows = sample_rows("preference", 40)
    counter = Counting(monkeypatch, PreferenceDataModule)
    first = prepared(PreferenceDataModule, rows, tok, cache_dir=str(tmp_path))
    assert counter.calls == 40
    assert list((tmp_path / "prepared" / "PreferenceDataModule").glob("encode-*.arrow"))  # in-memory rows, cached
    second = prepared(PreferenceDataModule, copy.deepcopy(rows), tok, cache_dir=str(tmp_path))
    assert counter.calls == 40  # nothing tokenized again
    assert second.train_dataset.to_list() == first.train_dataset.to_list()
    assert second.reports["train_data"].examples == 40

    # anything the examples depend on prepares again: the rows, a setting, the tokenizer's template
    prepared(PreferenceDataModule, rows[:39], tok, cache_dir=str(tmp_path))
    assert counter.calls == 40 + 39
    prepared(PreferenceDataModule, rows, tok, cache_dir=str(tmp_path), max_length=32)
    assert counter.calls == 2 * 40 + 39
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    prepared(PreferenceDataModule, rows, tok, cache_dir=str(tmp_path), chat_template=template)
    assert counter.calls == 3 * 40 + 39


def test_drops_are_reported_after_a_cache_load(tok, tmp_path):
    rows = sample_rows("preference", 30)
    kwargs = dict(cache_dir=str(tmp_path), max_length=23, on_overflow="drop")
    first = prepared(PreferenceDataModule, rows, tok, **kwargs)
    second = prepared(PreferenceDataModule, rows, tok, **kwargs)
    assert first.reports["train_data"].num_dropped > 0
    assert second.reports["train_data"].dropped == first.reports["train_data"].dropped


def test_tokenizer_fingerprint_follows_content_not_identity(tok):
    other = tiny_tokenizer()
    assert other is not tok and tokenizer_fingerprint(other) == tokenizer_fingerprint(tok)
    changed = copy.deepcopy(tok)
    changed.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(tok)
    changed = copy.deepcopy(tok)
    changed.add_tokens(["<new>"])
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(tok)


def test_num_proc_gives_the_same_examples_and_the_same_errors(tok):
    rows = sample_rows("messages", 60)
    one = prepared(SFTDataModule, rows, tok)
    two = prepared(SFTDataModule, rows, tok, num_proc=2)
    assert two.train_dataset.to_list() == one.train_dataset.to_list()
    bad = copy.deepcopy(rows)
    bad[47]["messages"][0]["role"] = "robot"  # in the second worker's half
    with pytest.raises(ValueError, match=r"train_data: row 47, column 'messages', message 0: unknown role 'robot'"):
        prepared(SFTDataModule, bad, tok, num_proc=2)


# -------------------------------------------------------------------------------------------------- tokenizers
def test_the_modules_tokenizer_is_copied_before_it_is_changed(tok):
    module_tokenizer = copy.deepcopy(tok)
    template = module_tokenizer.chat_template

    class FakeModule:
        tokenizer = module_tokenizer

    other = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    dm = SFTDataModule(sample_rows("messages", 4), chat_template=other)
    dm.trainer = type("FakeTrainer", (), {"lightning_module": FakeModule()})()
    dm.setup("fit")
    assert dm.tokenizer is not module_tokenizer and dm.tokenizer.chat_template.startswith("{% for m in messages")
    assert module_tokenizer.chat_template == template  # the module's tokenizer is as it was
    untouched = SFTDataModule(sample_rows("messages", 4))
    untouched.trainer = dm.trainer
    untouched.setup("fit")
    assert untouched.tokenizer is module_tokenizer  # nothing to change: shared


# ----------------------------------------------------------------------------------------------------- streams
def stream_of(rows):
    return datasets.Dataset.from_list(rows).to_iterable_dataset()


@pytest.mark.parametrize("cls, sample, kwargs", [
    (SFTDataModule, "messages", {}), (SFTDataModule, "text", {"padding_free": True}),
    (PreferenceDataModule, "preference", {}), (UnpairedPreferenceDataModule, "unpaired_preference", {}),
])
def test_a_stream_gives_the_batches_of_the_map_style_dataset(tok, cls, sample, kwargs):
    rows = sample_rows(sample, 23)
    mapped = prepared(cls, rows, tok, batch_size=4, **kwargs)
    streamed = prepared(cls, stream_of(rows), tok, batch_size=4, **kwargs)
    ours, theirs = list(streamed.train_dataloader()), list(mapped.train_dataloader())
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert type(a) is type(b)
        for name, value in vars(a).items():
            other = getattr(b, name)
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), name
            elif hasattr(value, "input_ids"):
                assert torch.equal(value.input_ids, other.input_ids), name


def test_a_bad_row_of_a_stream_fails_before_its_batch_trains(tok):
    rows = sample_rows("text", 20)
    rows[13] = {"text": ""}
    dm = prepared(SFTDataModule, stream_of(rows), tok, batch_size=4)
    loader = iter(dm.train_dataloader())
    for _ in range(3):  # rows 0-11 come through
        assert next(loader).input_ids.shape[0] == 4
    with pytest.raises(ValueError, match=r"train_data: row 13, column 'text': the text is empty"):
        next(loader)


def test_what_a_stream_cannot_do_is_refused_by_name(tok):
    rows = sample_rows("preference", 8)
    with pytest.raises(ValueError, match="val_split cannot carve a validation set out of a stream"):
        prepared(PreferenceDataModule, stream_of(rows), tok, val_split=0.2)
    with pytest.raises(ValueError, match="packing .* cannot run on a stream"):
        SFTDataModule(streaming=True, packing=True, max_length=64)
    with pytest.raises(ValueError, match="paired preference data .* a stream cannot"):
        prepared(UnpairedPreferenceDataModule, stream_of(rows), tok)
    dm = prepared(PreferenceDataModule, stream_of(rows), tok)
    module = DPOModule("tiny-llama", tokenizer=tok, precompute_ref_log_probs=True)
    module.configure_model()
    with pytest.raises(ValueError, match="precompute_ref_log_probs needs the whole dataset .* a stream"):
        module.precompute_reference(dm)


def test_streaming_reads_files_as_streams(tok, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(f'{{"text": "row {i} is here."}}\n' for i in range(10)))
    dm = prepared(SFTDataModule, str(path), tok, batch_size=4, streaming=True)
    assert isinstance(dm._sources["train_data"], datasets.IterableDataset)
    assert [b.input_ids.shape[0] for b in dm.train_dataloader()] == [4, 4, 2]


def _peak_streaming_memory(tok, n: int) -> int:
    def generate():
        for i in range(n):
            yield {"text": f"Row {i}: the number {i} written out in a sentence of some length."}

    dm = prepared(SFTDataModule, datasets.IterableDataset.from_generator(generate), tok, batch_size=8)
    gc.collect()
    tracemalloc.start()
    count = sum(batch.input_ids.shape[0] for batch in dm.train_dataloader())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == n
    return peak


def test_streaming_memory_does_not_grow_with_the_stream(tok):
    small, large = _peak_streaming_memory(tok, 500), _peak_streaming_memory(tok, 4000)
    assert large < 1.5 * small + 256 * 1024, (small, large)
    # the map-style preparation of the same rows holds them all: the measure can see a dataset's rows
    rows = [{"text": f"Row {i}: the number {i} written out in a sentence of some length."} for i in range(4000)]
    gc.collect()
    tracemalloc.start()
    held = [dict(row) for row in rows]
    _, listed = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(held) == 4000 and listed > 2 * large
