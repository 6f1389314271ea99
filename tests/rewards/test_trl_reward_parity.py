"""compute_rewards against TRL 1.16's own ``GRPOTrainer._calculate_rewards`` on the same rows and the same reward
sources (sync and async functions, None answers, TRL's built-in rewards, a reward model): the same rewards, and the
same arguments reach each function.

The trainer is a bare ``GRPOTrainer`` object holding only what ``_calculate_rewards`` reads (no model, no data),
so TRL's method runs as it runs inside training, on one CPU process.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.rewards import compute_rewards, resolve_reward_source

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

ROWS_CHAT = [
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "solution": "4", "level": 1},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "solution": "Paris", "level": 2},
    {"prompt": [{"role": "user", "content": "Say hi"}], "solution": None, "level": 3},
]
ROWS_TEXT = [dict(row, prompt=f"Q{index}: {row['prompt'][-1]['content']} A:") for index, row in enumerate(ROWS_CHAT)]
TEXTS = ["<think>easy</think>4", "Paris, on the Seine.", "hello hello hello"]
IDS = [[5, 6, 7], [8, 9, 9, 9, 9, 9], [10] * 9]

SEEN: dict[str, list[dict]] = defaultdict(list)


def _record(name, kwargs):
    SEEN[name].append({k: v for k, v in kwargs.items() if k not in ("trainer_state", "log_metric", "log_extra")})


def level_reward(completions, level, trainer_state, **kwargs):
    _record("level_reward", dict(kwargs, completions=completions, level=level))
    return [None if lv == 2 else float(lv) * (trainer_state.global_step + 1) for lv in level]


async def async_length_reward(completions, completion_ids, **kwargs):
    _record("async_length_reward", dict(kwargs, completions=completions, completion_ids=completion_ids))
    await asyncio.sleep(0)
    return [float(len(ids)) for ids in completion_ids]


def trl_builtins(conversational):
    from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment, think_format_reward

    # TRL's think_format_reward reads conversational completions only
    penalties = [get_soft_overlong_punishment(8, 4), get_repetition_penalty_reward(2)]
    return [think_format_reward] * conversational + penalties


def our_builtins(conversational):
    from lightning_llm.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment, think_format_reward

    penalties = [get_soft_overlong_punishment(8, 4), get_repetition_penalty_reward(2)]
    return [think_format_reward] * conversational + penalties


@pytest.fixture(scope="module")
def reward_model():
    return tiny_model("tiny-llama", task="sequence_classification", num_labels=1).eval()


def bare_trl_trainer(funcs, reward_model, step):
    """A GRPOTrainer with nothing but what ``_calculate_rewards`` reads."""
    trainer = trl_grpo.GRPOTrainer.__new__(trl_grpo.GRPOTrainer)
    cpu = torch.device("cpu")
    tokenizer = tiny_tokenizer()
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    trainer.accelerator = SimpleNamespace(device=cpu, is_main_process=True)
    trainer.args = SimpleNamespace(device=cpu, report_to=[])
    trainer.state = SimpleNamespace(global_step=step)
    trainer.is_deepspeed_enabled = False
    trainer.reward_funcs = [*funcs, reward_model]
    trainer.reward_processing_classes = [None] * len(funcs) + [tokenizer]
    trainer.reward_func_names = [trl_utils.get_callable_name(f) for f in funcs] + ["tiny-llama"]
    trainer.environments = None
    trainer.chat_template_kwargs = {}
    trainer._pending_extra_logs = defaultdict(list)
    trainer._pending_metrics = defaultdict(list)
    thread, loop, ready = trl_utils.start_event_loop_in_daemon(name="trl-parity")
    ready.wait()
    trainer.async_loop = loop
    return trainer, (thread, loop)


@pytest.mark.parametrize("rows", [ROWS_CHAT, ROWS_TEXT], ids=["conversational", "text"])
def test_the_same_rewards_and_arguments_as_trl(rows, reward_model):
    prompts = [row["prompt"] for row in rows]
    conversational = isinstance(prompts[0], list)
    completions = [[{"role": "assistant", "content": t}] for t in TEXTS] if conversational else list(TEXTS)

    SEEN.clear()
    funcs = [level_reward, async_length_reward, *trl_builtins(conversational)]
    trainer, (thread, loop) = bare_trl_trainer(funcs, reward_model, step=4)
    try:
        theirs = trl_grpo.GRPOTrainer._calculate_rewards(trainer, rows, prompts, completions, IDS)
    finally:
        trl_utils.shutdown_event_loop_in_daemon(thread, loop)
    trl_seen = dict(SEEN)

    SEEN.clear()
    from lightning_llm.rewards import RewardState, columns_from_rows

    sources = [resolve_reward_source(f) for f in (level_reward, async_length_reward, *our_builtins(conversational))]
    sources.append(resolve_reward_source(reward_model, tokenizer=tiny_tokenizer()))
    ours = compute_rewards(sources, prompts=prompts, completions=TEXTS, completion_ids=IDS,
                           columns=columns_from_rows(rows), trainer_state=RewardState(global_step=4))

    assert [s.name for s in sources] == trainer.reward_func_names
    assert torch.isnan(ours).equal(torch.isnan(theirs))
    torch.testing.assert_close(ours.nan_to_num(-99.0), theirs.nan_to_num(-99.0), atol=1e-5, rtol=0)
    assert dict(SEEN) == trl_seen  # every argument and column, in TRL's shapes
    assert trl_seen["level_reward"][0]["solution"] == ["4", "Paris", None]
