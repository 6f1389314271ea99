"""The typed batches' ``to`` (and ``pin_memory``): a new frozen instance with every tensor, nested batches' included,
moved or converted; other fields kept as they are; the original untouched. Lightning's own device transfer goes
through it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_llm.data.batches import (
    Batch,
    CompletionBatch,
    LMBatch,
    PairBatch,
    PromptBatch,
    RolloutBatch,
    StepBatch,
    UnpairedBatch,
)


def completion(num_sequences: int = 2, width: int = 5) -> CompletionBatch:
    ids = torch.arange(num_sequences * width).reshape(num_sequences, width)
    mask = torch.ones_like(ids)
    return CompletionBatch(input_ids=ids, completion_mask=mask, num_sequences=num_sequences, attention_mask=mask)


def padding_free_completion() -> CompletionBatch:
    return CompletionBatch(input_ids=torch.arange(7)[None], completion_mask=torch.tensor([[0, 1, 1, 0, 1, 1, 0]]),
                           num_sequences=2, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 0]]),
                           seq_index=torch.tensor([[0, 0, 0, 1, 1, 1, -1]]))


def all_batches() -> dict[str, Batch]:
    return {
        "lm": LMBatch(input_ids=torch.arange(6)[None], labels=torch.tensor([[-100, 1, 2, 3, 4, 5]]),
                      position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), num_real_tokens=6),
        "completion_padding_free": padding_free_completion(),
        "pair": PairBatch(sequences=completion(4), margin=torch.tensor([0.5, 1.0]),
                          ref_chosen_logps=torch.tensor([-1.0, -2.0]), ref_rejected_logps=torch.tensor([-3.0, -4.0])),
        "pair_without_reference": PairBatch(sequences=completion(2)),
        "unpaired": UnpairedBatch(sequences=completion(3), label=torch.tensor([True, False, True]),
                                  kl_sequences=completion(3, width=4), ref_logps=torch.tensor([-1.0, -2.0, -3.0]),
                                  ref_kl_logps=torch.tensor([-4.0, -5.0, -6.0])),
        "step": StepBatch(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3),
                          labels=torch.tensor([[-100, 1, 0], [-100, -100, 1]])),
        "rollout": RolloutBatch(prompt_ids=torch.ones(2, 3, dtype=torch.long), prompt_mask=torch.ones(2, 3),
                                completion_ids=torch.ones(2, 4, dtype=torch.long), completion_mask=torch.ones(2, 4),
                                advantages=torch.tensor([0.5, -0.5]), num_items_in_batch=torch.tensor(8.0),
                                old_per_token_logps=torch.zeros(2, 4)),
    }


def tensors_of(batch: Batch, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a batch and of the batches it nests, by dotted name."""
    out = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor):
            out[prefix + field.name] = value
        elif isinstance(value, Batch):
            out.update(tensors_of(value, prefix + field.name + "."))
    return out


def others_of(batch: Batch, prefix: str = "") -> dict[str, object]:
    """Every field of a batch (and of the batches it nests) that is neither a tensor nor a batch."""
    out = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, Batch):
            out.update(others_of(value, prefix + field.name + "."))
        elif not isinstance(value, torch.Tensor):
            out[prefix + field.name] = value
    return out


def check_moved(original: Batch, snapshot: dict[str, torch.Tensor], moved: Batch, *, device: str,
                dtype: torch.dtype | None = None) -> None:
    assert type(moved) is type(original)
    assert moved is not original
    with pytest.raises(dataclasses.FrozenInstanceError):
        moved.input_ids = None  # type: ignore[misc]  # still frozen (every batch is)
    before, after = tensors_of(original), tensors_of(moved)
    assert before.keys() == after.keys() == snapshot.keys() and after
    for name, tensor in after.items():
        assert tensor.device.type == device, name
        if dtype is not None:
            assert tensor.dtype == dtype, name
            assert torch.equal(tensor, snapshot[name].to(dtype)), name
        else:
            assert tensor.dtype == snapshot[name].dtype, name
        # the original keeps its own tensors, on the CPU, with their values and dtypes
        assert before[name].device.type == "cpu" and before[name].dtype == snapshot[name].dtype, name
        assert torch.equal(before[name], snapshot[name]), name
    # nested batches are new instances too
    for field in dataclasses.fields(original):
        value = getattr(original, field.name)
        if isinstance(value, Batch):
            assert getattr(moved, field.name) is not value, field.name
    # everything else (counts, None, lists) is carried over as it was
    kept, carried = others_of(original), others_of(moved)
    assert kept.keys() == carried.keys()
    for name, value in kept.items():
        assert carried[name] is value, name


@pytest.mark.parametrize("name", list(all_batches()))
def test_to_a_device_returns_a_new_frozen_batch(name):
    original = all_batches()[name]
    snapshot = {k: v.clone() for k, v in tensors_of(original).items()}
    check_moved(original, snapshot, original.to("meta"), device="meta")
    check_moved(original, snapshot, original.to(torch.device("meta"), non_blocking=True), device="meta")


@pytest.mark.parametrize("name", list(all_batches()))
def test_to_a_dtype_converts_every_tensor(name):
    original = all_batches()[name]
    snapshot = {k: v.clone() for k, v in tensors_of(original).items()}
    check_moved(original, snapshot, original.to(torch.float64), device="cpu", dtype=torch.float64)


def test_lightning_moves_a_typed_batch_through_its_to():
    """What ``LightningModule.transfer_batch_to_device`` does by default (it raises on a frozen dataclass that has no
    ``to``: it would set the moved fields on the instance)."""
    original = all_batches()["unpaired"]
    snapshot = {k: v.clone() for k, v in tensors_of(original).items()}
    check_moved(original, snapshot, move_data_to_device(original, torch.device("meta")), device="meta")


def test_a_batch_without_tensors_is_copied_with_its_fields():
    rows = [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}]
    original = PromptBatch(prompts=["a", "b"], indices=[3, 7], rows=rows, prompt_ids=[[1, 2], [3]], generation=4,
                           repeat=1)
    moved = original.to("meta")
    assert type(moved) is PromptBatch and moved is not original and moved == original
    assert moved.rows is rows and moved.prompt_ids is original.prompt_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_pin_memory_returns_a_new_pinned_batch():
    original = all_batches()["pair"]
    pinned = original.pin_memory()
    assert pinned is not original and pinned.sequences is not original.sequences
    assert all(t.is_pinned() for t in tensors_of(pinned).values())
    assert not any(t.is_pinned() for t in tensors_of(original).values())
