"""Padding, best-fit-decreasing packing, padding-free batches, and packed == unpacked log-likelihood on a tiny model."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from helpers import IGNORE, reference_nll_sum

from lightning_llm.data.collate import (
    collate_lm,
    pack_bfd,
    pack_examples,
    pad_sequences,
    position_ids_for,
)
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.base import LLMModule


def test_pad_sequences_sides_and_lengths():
    seqs = [[1, 2, 3], [4], []]
    assert pad_sequences(seqs, 0).tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad_sequences(seqs, 9, side="left").tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert pad_sequences(seqs, 0, multiple_of=4).shape == (3, 4)
    assert pad_sequences(seqs, 0, length=6, multiple_of=4).shape == (3, 8)
    assert pad_sequences(seqs, 0).dtype == torch.long


# ---------------------------------------------------------------------------------------------------------- BFD
def naive_best_fit_decreasing(lengths, capacity):
    """Textbook BFD, written plainly: longest first (ties by index), into the fullest bin that still fits it."""
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda k: (free[k], k))
        else:
            b = len(bins)
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def optimal_bin_count(lengths, capacity):
    """Fewest bins, by trying every assignment of items to bins (small inputs only)."""
    n = len(lengths)
    for k in range(1, n + 1):
        for assignment in itertools.product(range(k), repeat=n):
            loads = [0] * k
            for item, b in zip(lengths, assignment):
                loads[b] += item
            if max(loads) <= capacity:
                return k
    return n


@pytest.mark.parametrize("seed", range(12))
def test_pack_bfd_on_random_lengths(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 32, 64])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 60))]
    bins = pack_bfd(lengths, capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))  # every item exactly once
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)  # no bin over capacity
    assert all(b for b in bins)
    assert len(bins) >= -(-sum(lengths) // capacity)
    assert bins == naive_best_fit_decreasing(lengths, capacity)


@pytest.mark.parametrize("seed", range(6))
def test_pack_bfd_is_near_optimal_on_small_inputs(seed):
    rng = random.Random(100 + seed)
    capacity = 10
    lengths = [rng.randint(1, 9) for _ in range(7)]
    bins = pack_bfd(lengths, capacity)
    # Johnson's bound for (best/first)-fit decreasing: at most 11/9 OPT + 6/9 bins
    opt = optimal_bin_count(lengths, capacity)
    assert len(bins) <= 11 / 9 * opt + 6 / 9


def test_pack_bfd_hand_example():
    # 7 first (bin 0, 3 left), 5 (bin 1, 5 left), 4 -> bin 1 (tightest: 5 >= 4), 3 -> bin 0, 1 -> bin 1
    assert pack_bfd([5, 3, 7, 1, 4], 10) == [[2, 1], [0, 4, 3]]


def test_pack_bfd_rejects_oversized_items_and_bad_capacity():
    with pytest.raises(ValueError, match="item 1 has length 11 > capacity 10"):
        pack_bfd([3, 11], 10)
    with pytest.raises(ValueError, match="capacity must be positive"):
        pack_bfd([1], 0)


def test_pack_examples_keeps_every_token_and_the_sequence_lengths():
    rng = random.Random(0)
    examples = []
    for k in range(9):
        n = rng.randint(2, 12)
        ids = [rng.randint(3, 800) for _ in range(n)]
        examples.append({"input_ids": ids, "labels": [t if j % 3 else IGNORE for j, t in enumerate(ids)]})
    packed = pack_examples(examples, 16)
    seen = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lengths"]) <= 16
        offset = 0
        for n in row["seq_lengths"]:
            seen.append((tuple(row["input_ids"][offset:offset + n]), tuple(row["labels"][offset:offset + n])))
            offset += n
    assert sorted(seen) == sorted((tuple(e["input_ids"]), tuple(e["labels"])) for e in examples)


def test_collate_padded():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate_lm(examples, pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert collate_lm(examples, 0, multiple_of=8).input_ids.shape == (2, 8)


def test_collate_padding_free():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [8, 9, 10, 11], "labels": [8, 9, 10, 11], "seq_lengths": [1, 3]},  # a packed row
    ]
    batch = collate_lm(examples, pad_token_id=0, padding_free=True)
    assert batch.padding_free and batch.attention_mask is None
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2]]
    # no token is trained to predict the first token of the next sequence
    assert batch.labels.tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE, 10, 11]]
    padded = collate_lm(examples, pad_token_id=0, padding_free=True, multiple_of=4)
    assert padded.input_ids.shape == (1, 8) and padded.labels[0, -1] == IGNORE
    assert position_ids_for([2, 1, 3]) == [0, 1, 0, 0, 1, 2]


# -------------------------------------------------------------------------------------------------- equivalence
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def sample_sequences(tok, n=6):
    texts = ["Question: What is 1 plus 8?\nAnswer: 1 plus 8 is 9.", "Blood is red.",
             "The opposite of long is short, and the opposite of open is closed.", "A frog says ribbit.",
             "What is 2 plus 6? It is 8.", "Hi."]
    return [tok(t + tok.eos_token)["input_ids"] for t in texts[:n]]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_packed_padding_free_equals_unpacked(tok, preset):
    """Summed NLL of a packed padding-free batch == each sequence alone == the padded batch; and the packed batch
    with positions NOT restarted differs (attention would cross sequences), so the test can fail."""
    model = tiny_model(preset).eval()
    module = LLMModule(model=model, tokenizer=tok, logprob_impl="chunked")
    seqs = sample_sequences(tok)
    examples = [{"input_ids": s, "labels": list(s)} for s in seqs]
    alone = reference_nll_sum(model, seqs).item()

    packed_rows = pack_examples(examples, 40)
    assert len(packed_rows) < len(examples) and any(len(r["seq_lengths"]) > 1 for r in packed_rows)
    packed = collate_lm(packed_rows, tok.pad_token_id, padding_free=True)
    padded = collate_lm(examples, tok.pad_token_id)
    with torch.no_grad():
        packed_nll = -module.token_logprobs(model, packed.input_ids, packed.labels,
                                            position_ids=packed.position_ids).logps.double().sum().item()
        padded_nll = -module.token_logprobs(model, padded.input_ids, padded.labels,
                                            attention_mask=padded.attention_mask).logps.double().sum().item()
        flat_positions = torch.arange(packed.input_ids.shape[1]).unsqueeze(0)
        leaky_nll = -module.token_logprobs(model, packed.input_ids, packed.labels,
                                           position_ids=flat_positions).logps.double().sum().item()
    assert packed_nll == pytest.approx(alone, rel=1e-5, abs=1e-5)
    assert padded_nll == pytest.approx(alone, rel=1e-5, abs=1e-5)
    assert abs(leaky_nll - alone) > 1e-2


def test_packed_datamodule_batches_equal_unpacked(tok):
    """Through SFTDataModule: packing=True gives the same summed NLL (and loss-token count) as no packing."""
    from helpers import sample_rows

    from lightning_llm.data.sft import SFTDataModule

    rows = sample_rows("messages", 10)
    model = tiny_model("tiny-llama").eval()
    module = LLMModule(model=model, tokenizer=tok)
    plain = SFTDataModule(rows, tokenizer=tok, batch_size=len(rows), shuffle=False)
    packed = SFTDataModule(rows, tokenizer=tok, batch_size=len(rows), shuffle=False, packing=True, max_length=96)
    plain.setup("fit")
    packed.setup("fit")
    assert len(packed.train_dataset) < len(plain.train_dataset)
    assert all(len(ex["input_ids"]) <= 96 for ex in packed.train_dataset)
    examples = list(plain.train_dataset)
    alone = reference_nll_sum(model, [e["input_ids"] for e in examples], [e["labels"] for e in examples]).item()
    batch = next(iter(packed.train_dataloader()))
    assert batch.padding_free and batch.attention_mask is None and batch.input_ids.shape[0] == 1
    with torch.no_grad():
        out = module.token_logprobs(model, batch.input_ids, batch.labels, position_ids=batch.position_ids)
    packed_nll = -out.logps.double().sum().item()
    assert packed_nll == pytest.approx(alone, rel=1e-5, abs=1e-5)
    n_loss_tokens = sum(sum(1 for t in e["labels"][1:] if t != IGNORE) for e in examples)
    assert int((batch.labels[:, 1:] != IGNORE).sum()) == n_loss_tokens
