"""HfPairwiseJudge against a hand computation of the judge model's next-token likelihoods of "0" and "1"."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from lightning_llm.judges import DEFAULT_PAIRWISE_SYSTEM_PROMPT, HfPairwiseJudge
from lightning_llm.models import tiny_model, tiny_tokenizer

PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello", "Write a haiku about rain, please.", "Hi"]
PAIRS = [
    ["4", "It is five."],
    ["Blue", "The sky is often described as blue on clear days."],
    ["hello", "hey there, hello!"],
    ["Rain falls on the roof", "drip"],
    ["Hello! How can I help?", "?"],
]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def saved_judge_model(request, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param, seed=11).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@functools.cache
def _reference_model(name: str) -> torch.nn.Module:
    return tiny_model(name, seed=11).double().eval()


def _hand_first_better(directory: Path, prompt: str, pair: list[str], chat: bool = True) -> float:
    """softmax over the logits of the tokens "0" and "1" after the judge request, one unpadded sequence in float64."""
    model = _reference_model("tiny-gpt2" if "gpt2" in directory.name else "tiny-llama")
    tokenizer = tiny_tokenizer()
    request = DEFAULT_PAIRWISE_SYSTEM_PROMPT.format(prompt=prompt, response0=pair[0], response1=pair[1])
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = request
    ids = torch.tensor([tokenizer(text, add_special_tokens=not chat)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    zero, one = tokenizer.convert_tokens_to_ids(["0", "1"])
    return 1.0 / (1.0 + math.exp(logits[one].item() - logits[zero].item()))


def test_scores_match_hand_likelihoods_loaded_by_path(saved_judge_model: Path) -> None:
    judge = HfPairwiseJudge(str(saved_judge_model), batch_size=2, device="cpu")
    expected = [_hand_first_better(saved_judge_model, p, pair) for p, pair in zip(PROMPTS, PAIRS)]
    scores = judge.judge(PROMPTS, PAIRS, shuffle_order=False, return_scores=True)
    assert scores == pytest.approx(expected, abs=2e-5)
    assert judge.judge(PROMPTS, PAIRS, shuffle_order=False) == [0 if p >= 0.5 else 1 for p in expected]


@pytest.mark.slow
def test_order_flips_map_back_to_the_original_order(saved_judge_model: Path) -> None:
    judge = HfPairwiseJudge(str(saved_judge_model), batch_size=4, device="cpu", seed=5)
    as_given = [_hand_first_better(saved_judge_model, p, pair) for p, pair in zip(PROMPTS, PAIRS)]
    reversed_ = [_hand_first_better(saved_judge_model, p, pair[::-1]) for p, pair in zip(PROMPTS, PAIRS)]
    prompts, pairs = PROMPTS * 3, PAIRS * 3  # more draws, so both orders occur
    scores = judge.judge(prompts, pairs, shuffle_order=True, return_scores=True)
    shown_reversed = 0
    for index, score in enumerate(scores):
        straight, flipped = as_given[index % 5], 1.0 - reversed_[index % 5]
        assert score == pytest.approx(straight, abs=2e-5) or score == pytest.approx(flipped, abs=2e-5)
        shown_reversed += abs(score - flipped) < abs(score - straight)
    assert 0 < shown_reversed < len(scores)
    # the tiny random model is position-biased, so decisions do depend on the flips; they must be the flipped-back
    # decisions of the very scores drawn with the same seed
    choices = HfPairwiseJudge(str(saved_judge_model), batch_size=4, device="cpu", seed=5).judge(prompts, pairs)
    assert choices == [0 if score >= 0.5 else 1 for score in scores]


def test_model_object_and_no_chat_template() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    judge = HfPairwiseJudge(tiny_model("tiny-llama", seed=11), tokenizer=tokenizer, batch_size=3)
    assert judge.device == torch.device("cpu")  # a model object stays where it is
    directory = Path("tiny-llama")
    expected = [_hand_first_better(directory, p, pair, chat=False) for p, pair in zip(PROMPTS, PAIRS)]
    assert judge.judge(PROMPTS, PAIRS, shuffle_order=False, return_scores=True) == pytest.approx(expected, abs=2e-5)


def test_custom_answers_and_bad_arguments() -> None:
    model, tokenizer = tiny_model("tiny-llama", seed=11), tiny_tokenizer()
    prompt = "Pick A or B. {prompt} A: {response0} B: {response1}"
    judge = HfPairwiseJudge(model, tokenizer=tokenizer, system_prompt=prompt, answers=("A", "B"))
    assert judge.answer_ids == tuple(tokenizer.convert_tokens_to_ids(["A", "B"]))
    with pytest.raises(ValueError, match="single token"):
        HfPairwiseJudge(model, tokenizer=tokenizer, answers=("0", "definitely not"))
    with pytest.raises(ValueError, match="placeholders"):
        HfPairwiseJudge(model, tokenizer=tokenizer, system_prompt="Which is better? {prompt}")
    with pytest.raises(ValueError, match="batch_size"):
        HfPairwiseJudge(model, tokenizer=tokenizer, batch_size=0)
    from transformers import AutoModelForCausalLM

    from lightning_llm.models import tiny_config

    nameless = AutoModelForCausalLM.from_config(tiny_config("tiny-llama"))
    with pytest.raises(ValueError, match="tokenizer"):
        HfPairwiseJudge(nameless)  # a model object built from a config carries no name to load a tokenizer from
    assert HfPairwiseJudge(model).tokenizer is not None  # a preset object knows its name, hence its tokenizer
    with pytest.raises(ValueError, match="same length"):
        judge.judge(["a"], [["x", "y"], ["z", "w"]])
