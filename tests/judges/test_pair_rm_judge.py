"""PairRMJudge against rewards computed directly with the classifier, one unpadded sequence at a time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_llm.judges import PairRMJudge
from lightning_llm.models import tiny_model, tiny_tokenizer

PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello", "Write a haiku about rain.", "Hi"]
PAIRS = [
    ["4", "It is five."],
    ["Blue", "The sky is often described as blue on clear days."],
    ["hello", "hey there, hello!"],
    ["Rain falls on the roof", "drip"],
    ["Hello! How can I help?", "?"],
]


@pytest.fixture(scope="module")
def saved_reward_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("reward")
    tiny_model("tiny-llama", task="sequence_classification", num_labels=1, seed=21).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def _direct_rewards(model: torch.nn.Module, prompts, completions, chat: bool = True, index: int = 0) -> np.ndarray:
    tokenizer = tiny_tokenizer()
    rewards = []
    for prompt, completion in zip(prompts, completions):
        if chat:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt + completion)["input_ids"]
        with torch.no_grad():
            rewards.append(model(torch.tensor([ids])).logits[0, index].item())
    return np.asarray(rewards, dtype=np.float64)


def test_rewards_and_judgements_match_direct_scores(saved_reward_model: Path) -> None:
    judge = PairRMJudge(str(saved_reward_model), batch_size=3, device="cpu")
    reference = tiny_model("tiny-llama", task="sequence_classification", num_labels=1, seed=21).double().eval()
    first = _direct_rewards(reference, PROMPTS, [pair[0] for pair in PAIRS])
    second = _direct_rewards(reference, PROMPTS, [pair[1] for pair in PAIRS])
    assert judge.rewards(PROMPTS, [pair[0] for pair in PAIRS]) == pytest.approx(first, abs=1e-5)
    assert judge.judge(PROMPTS, PAIRS) == [0 if a >= b else 1 for a, b in zip(first, second)]
    probabilities = 1.0 / (1.0 + np.exp(-(first - second)))
    assert judge.judge(PROMPTS, PAIRS, return_scores=True) == pytest.approx(probabilities, abs=1e-5)
    # pointwise scoring has no position bias: shuffling changes nothing, swapping the pair mirrors the answer
    assert judge.judge(PROMPTS, PAIRS, shuffle_order=True) == judge.judge(PROMPTS, PAIRS, shuffle_order=False)
    swapped = judge.judge(PROMPTS, [pair[::-1] for pair in PAIRS], return_scores=True)
    assert swapped == pytest.approx(1.0 - probabilities, abs=1e-5)


def test_temperature_scales_the_margin(saved_reward_model: Path) -> None:
    plain = PairRMJudge(str(saved_reward_model)).judge(PROMPTS, PAIRS, return_scores=True)
    warm = PairRMJudge(str(saved_reward_model), temperature=0.25).judge(PROMPTS, PAIRS, return_scores=True)
    for p, q in zip(plain, warm):
        margin = math.log(p / (1 - p))
        assert q == pytest.approx(1.0 / (1.0 + math.exp(-margin / 0.25)), abs=1e-6)


def test_multi_label_classifier_without_chat_template() -> None:
    model = tiny_model("tiny-qwen2", task="sequence_classification", num_labels=2, seed=3)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="score_index"):
        PairRMJudge(model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="score_index"):
        PairRMJudge(model, tokenizer=tokenizer, score_index=2)
    judge = PairRMJudge(model, tokenizer=tokenizer, score_index=1, batch_size=2)
    completions = [pair[1] for pair in PAIRS]
    expected = _direct_rewards(model.eval(), PROMPTS, completions, chat=False, index=1)
    assert judge.rewards(PROMPTS, completions) == pytest.approx(expected, abs=1e-5)


def test_bad_arguments() -> None:
    model, tokenizer = tiny_model("tiny-llama", task="sequence_classification", num_labels=1), tiny_tokenizer()
    with pytest.raises(ValueError, match="temperature"):
        PairRMJudge(model, tokenizer=tokenizer, temperature=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        PairRMJudge(model, tokenizer=tokenizer, batch_size=-1)
    judge = PairRMJudge(model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pair"):
        judge.judge(["p"], [["a", "b", "c"]])
