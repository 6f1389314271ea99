"""PromptDataModule and the generation samplers: TRL's RepeatSampler order (one process, and several processes sharing
a generation batch the way accelerate deals its batches out), every source column kept, prompt ids equal to TRL's
tokenization, resumption, validation groups, and named errors for bad rows and schedules."""

from __future__ import annotations

import pytest
from helpers import sample_rows

from lightning_llm.data.prompts import PromptDataModule
from lightning_llm.data.sampling import GenerationSampler, GenerationSchedule, GroupedEvalSampler
from lightning_llm.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def prepared(tok, rows, schedule=None, **kwargs) -> PromptDataModule:
    dm = PromptDataModule(rows, tokenizer=tok, **kwargs)
    if schedule is not None:
        dm.connect_schedule(schedule)
    dm.setup("fit")
    return dm


def trl_order(num_rows, *, n, batch_size, steps, iterations, world, seed):
    """What each process of TRL's GRPOTrainer draws: RepeatSampler's stream, cut into per-process loader batches of
    ``batch_size * steps`` dealt out in turn (accelerate's batch sharding)."""
    from trl.trainer.utils import RepeatSampler

    share = batch_size * steps
    sampler = RepeatSampler(list(range(num_rows)), mini_repeat_count=n, batch_size=share * world // n,
                            repeat_count=steps * iterations, seed=seed)
    stream = list(sampler)
    batches = [stream[k: k + share] for k in range(0, len(stream), share)]
    return [[b for k, b in enumerate(batches) if k % world == rank] for rank in range(world)]


@pytest.mark.parametrize("n, batch_size, steps, iterations, world", [
    (4, 4, 1, 1, 1), (4, 2, 2, 3, 1), (2, 3, 2, 1, 2), (4, 2, 1, 2, 2), (3, 3, 1, 1, 3),
])
def test_sampler_draws_trl_repeat_sampler_order(n, batch_size, steps, iterations, world):
    num_rows, seed = 23, 7
    schedule = GenerationSchedule(num_generations=n, steps_per_generation=steps, num_iterations=iterations)
    unique = schedule.unique_prompts(batch_size, world)
    expected = trl_order(num_rows, n=n, batch_size=batch_size, steps=steps, iterations=iterations, world=world,
                         seed=seed)
    share = batch_size * steps
    for rank in range(world):
        sampler = GenerationSampler(num_rows, schedule, unique_prompts=unique, seed=seed, rank=rank, world_size=world)
        drawn = list(sampler)
        assert len(drawn) == len(sampler)
        batches = [drawn[k: k + share] for k in range(0, len(drawn), share)]
        assert [[row for row, _, _ in batch] for batch in batches] == expected[rank]
        # each loader batch is one draw of one generation batch: a single generation number, repeats counting up
        for k, batch in enumerate(batches):
            assert {(g, r) for _, g, r in batch} == {(k // schedule.repeats, k % schedule.repeats)}


def test_groups_span_processes_and_every_process_sees_the_same_prompts():
    # 1 prompt x 4 completions over 2 processes of 2: one group split in half
    schedule = GenerationSchedule(num_generations=4)
    unique = schedule.unique_prompts(2, 2)
    assert unique == 1
    ranks = [list(GenerationSampler(5, schedule, unique_prompts=unique, seed=0, rank=r, world_size=2))
             for r in range(2)]
    for k in range(0, len(ranks[0]), 2):
        rows = {row for rank in ranks for row, _, _ in rank[k: k + 2]}
        assert len(rows) == 1


def test_epochs_reshuffle_by_seed_and_epoch_and_skip_resumes():
    schedule = GenerationSchedule(num_generations=2, steps_per_generation=2)
    sampler = GenerationSampler(10, schedule, unique_prompts=2, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert [r for r, _, _ in first] != [r for r, _, _ in second]
    assert {g for _, g, _ in second} == set(range(5, 10))  # generation numbers continue across epochs
    resumed = GenerationSampler(10, schedule, unique_prompts=2, seed=3, epoch=1, skip=6)
    assert list(resumed) == second[6:]
    assert len(resumed) == len(second)


def test_incomplete_last_chunk_is_dropped_like_trl():
    schedule = GenerationSchedule(num_generations=2)
    sampler = GenerationSampler(7, schedule, unique_prompts=3, shuffle=False)
    assert [r for r, _, _ in sampler] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_schedule_errors_name_the_settings():
    with pytest.raises(ValueError, match=r"num_generations=3 must divide the generation batch: batch_size=4 x "
                                         r"steps_per_generation=1 x 1 process\(es\) = 4"):
        GenerationSchedule(num_generations=3).unique_prompts(4, 1)
    with pytest.raises(ValueError, match="num_iterations must be a whole number >= 1"):
        GenerationSchedule(num_iterations=0)
    with pytest.raises(ValueError, match="needs 8 distinct prompts but the data has 5 rows"):
        GenerationSampler(5, GenerationSchedule(), unique_prompts=8)


def test_eval_sampler_keeps_groups_whole_across_processes():
    ranks = [list(GroupedEvalSampler(5, 2, batch_size=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    for k in (0, 3):
        merged = [row for rank in ranks for row, _, _ in rank[k: k + 3]]
        assert merged[0::2] == merged[1::2]  # pairs of the same prompt, in order
    assert [row for rank in ranks for row, _, _ in rank[:3]] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="num_generations_eval=4 must divide the validation batch"):
        GroupedEvalSampler(5, 4, batch_size=3, world_size=1)


# ------------------------------------------------------------------------------------------------------ the module
def test_every_column_is_kept_and_prompt_ids_equal_trls_tokenization(tok):
    rows = sample_rows("prompt_only", 12)
    for k, row in enumerate(rows):
        row["meta"] = {"k": k}
    dm = prepared(tok, rows, GenerationSchedule(num_generations=2), batch_size=4, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch.indices == [0, 0, 1, 1]
    assert batch.rows[0] == rows[0] and batch.rows[2] == rows[1]  # solution and meta reach the rewards
    assert batch.prompts[2] == rows[1]["prompt"]
    expected = tok.apply_chat_template([rows[1]["prompt"]], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"][0]
    assert batch.prompt_ids[2] == list(expected)
    assert (batch.generation, batch.repeat) == (0, 0)


def test_standard_prompts_are_tokenized_with_special_tokens_like_trl(tok):
    rows = [{"prompt": f"Question: what is {i} plus {i}?\nAnswer:", "answer": str(2 * i)} for i in range(4)]
    dm = prepared(tok, rows, batch_size=2, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch.prompt_ids == tok(text=[rows[0]["prompt"], rows[1]["prompt"]])["input_ids"]
    assert batch.rows[1]["answer"] == "2"


def test_other_kinds_with_a_prompt_are_accepted(tok):
    rows = sample_rows("prompt_completion", 4)
    dm = prepared(tok, rows, batch_size=2, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch.rows[0]["completion"] == rows[0]["completion"]


def test_long_prompts_keep_their_end_by_default(tok):
    rows = [{"prompt": "word " * 40 + "What is 2 plus 2?"}, {"prompt": "What is 1 plus 1?"}]
    dm = prepared(tok, rows, batch_size=2, max_length=8, shuffle=False)
    full = tok(text=rows[0]["prompt"])["input_ids"]
    assert dm.train_dataset[0]["prompt_ids"] == full[-8:]
    assert dm.reports["train_data"].truncated == 1
    with pytest.raises(ValueError, match=r"train_data: row 0, column 'prompt': \d+ tokens do not fit max_length=8"):
        prepared(tok, rows, batch_size=2, max_length=8, on_overflow="error")


@pytest.mark.parametrize("row, message", [
    ({"prompt": None, "x": 1}, r"row 1, column 'prompt': missing value"),
    ({"prompt": "   "}, r"row 1, column 'prompt': the text is empty \(only whitespace\)"),
    ({"prompt": 5}, r"row 1, column 'prompt': expected a string, got int"),
])
def test_bad_standard_rows_are_named_before_training(tok, row, message):
    rows = [{"prompt": "What is 1 plus 1?", "x": 0}, row]
    with pytest.raises(ValueError, match=message):
        prepared(tok, rows, batch_size=2)


def test_a_conversation_must_end_on_a_user_turn(tok):
    rows = [{"prompt": [{"role": "user", "content": "hi"}]},
            {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(ValueError, match=r"row 1, column 'prompt': the conversation ends on a 'assistant' turn"):
        prepared(tok, rows, batch_size=2)
    with pytest.raises(ValueError, match=r"row 1, column 'prompt': expected a list of messages, got str"):
        prepared(tok, [rows[0], {"prompt": "plain"}], batch_size=2)


def test_a_column_named_like_the_modules_own_is_refused(tok):
    rows = [{"prompt": "a b", "prompt_ids": [1]}, {"prompt": "c d", "prompt_ids": [2]}]
    with pytest.raises(ValueError, match=r"column\(s\) \['prompt_ids'\] are names PromptDataModule writes itself"):
        prepared(tok, rows, batch_size=2)


def test_streams_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="a stream cannot do"):
        PromptDataModule("sample:prompt_only", streaming=True)


def test_loader_batches_follow_the_schedule(tok):
    schedule = GenerationSchedule(num_generations=2, steps_per_generation=2, num_iterations=2)
    dm = prepared(tok, "sample:prompt_only", schedule, batch_size=2, seed=5)
    loader = dm.train_dataloader()
    assert len(loader) == (172 // 2) * 4
    batches = [batch for _, batch in zip(range(8), loader)]
    assert [(b.generation, b.repeat) for b in batches] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2),
                                                            (1, 3)]
    assert all(len(b.prompts) == 4 for b in batches)
    assert batches[0].indices == batches[3].indices and batches[0].indices[0] == batches[0].indices[1]
