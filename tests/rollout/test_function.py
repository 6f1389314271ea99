"""``FunctionRollouts``: TRL's ``rollout_func`` contract as an engine — prompts and owner in, completions cut like
sampled ones, extra fields kept per completion; malformed returns refused by name."""

from __future__ import annotations

import pytest

from lightning_llm.rollout import FunctionRollouts, Rollouts, SamplingSettings

EOS, PAD = 2, 0
SETTINGS = SamplingSettings(max_completion_length=4)


def generate(engine, prompt_ids, prompts):
    return engine.generate(None, prompt_ids, SETTINGS, eos_token_ids=[EOS], pad_token_id=PAD, prompts=prompts)


def test_completions_are_cut_and_extra_fields_kept():
    seen = {}

    def rollout_func(prompts, trainer):
        seen.update(prompts=prompts, trainer=trainer)
        return {"prompt_ids": [[5, 6], [7]], "completion_ids": [[9, EOS, 9], [3, 4, 5, 6, 7]],
                "logprobs": [[-0.1, -0.2, -0.3], [-1.0, -1.1, -1.2, -1.3, -1.4]], "tool_calls": [1, 0]}

    owner = object()
    out = generate(FunctionRollouts(rollout_func, owner), [[5, 6], [7]], ["a", "b"])
    assert seen == {"prompts": ["a", "b"], "trainer": owner}
    assert out.completion_ids == [[9, EOS], [3, 4, 5, 6]]  # after the first EOS; at max_completion_length
    assert out.logprobs == [[-0.1, -0.2], [-1.0, -1.1, -1.2, -1.3]]
    assert out.extra_fields == {"tool_calls": [1, 0]}


@pytest.mark.parametrize("returned, match", [
    ({"completion_ids": [[1]], "logprobs": None}, "must return a dict with the keys"),
    ({"prompt_ids": None, "completion_ids": [[1], [1]], "logprobs": None}, "returned 2 completions for 1 prompts"),
    ({"prompt_ids": [[8]], "completion_ids": [[1]], "logprobs": None}, r"prompt_ids\[0\] differ"),
    ({"prompt_ids": None, "completion_ids": [[1]], "logprobs": None, "extra": [1, 2]}, "extra_fields"),
])
def test_malformed_returns_are_refused(returned, match):
    with pytest.raises(ValueError, match=match):
        generate(FunctionRollouts(lambda prompts, trainer: returned), [[5]], ["a"])


def test_prompts_are_required_and_the_function_callable():
    with pytest.raises(ValueError, match="needs the prompts themselves"):
        FunctionRollouts(lambda p, t: {}).generate(None, [[5]], SETTINGS, eos_token_ids=[EOS], pad_token_id=PAD)
    with pytest.raises(ValueError, match="rollout_func must be callable"):
        FunctionRollouts("not a function")
    with pytest.raises(ValueError, match="extra_fields"):
        Rollouts(completion_ids=[[1]], extra_fields={"x": []})
