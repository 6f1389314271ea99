"""FixedRollouts replays completions in order, cuts them like sampled ones, and says when it runs out."""

from __future__ import annotations

import pytest
from rollout_helpers import EOS, PAD

from lightning_llm.rollout import FixedRollouts, Rollouts, SamplingSettings

SETTINGS = SamplingSettings(max_completion_length=4)


def replay(engine: FixedRollouts, prompts, settings: SamplingSettings = SETTINGS, eos=(EOS,)) -> Rollouts:
    return engine.generate(None, prompts, settings, eos_token_ids=list(eos), pad_token_id=PAD)


def test_replays_in_order_across_calls():
    engine = FixedRollouts([[10, 11], [12], [13, 14, 15]])
    assert replay(engine, [[1], [2]]).completion_ids == [[10, 11], [12]]
    assert engine.remaining == 1
    assert replay(engine, [[3]]) == Rollouts([[13, 14, 15]], None)


def test_cuts_after_the_first_eos_and_at_the_length_limit_with_the_logprobs():
    completions = [[10, EOS, 11, EOS], [10, 11, 12, 13, 14, 15], [EOS], [10, 11, 99]]
    logprobs = [[-0.1, -0.2, -0.3, -0.4], [-1.0] * 6, [-0.5], [-0.1, -0.2, -0.3]]
    rollouts = replay(FixedRollouts(completions, logprobs), [[1]] * 4, eos=(EOS, 99))
    assert rollouts.completion_ids == [[10, EOS], [10, 11, 12, 13], [EOS], [10, 11, 99]]
    assert rollouts.logprobs == [[-0.1, -0.2], [-1.0] * 4, [-0.5], [-0.1, -0.2, -0.3]]


def test_an_exhausted_replay_names_the_counts():
    engine = FixedRollouts([[10], [11], [12]])
    replay(engine, [[1], [2]])
    with pytest.raises(ValueError, match="exhausted: it holds 3 completions, 2 were replayed, and this call needs 2"):
        replay(engine, [[1], [2]])


def test_a_callable_source_completes_each_batch():
    calls = []

    def source(prompts):
        calls.append(prompts)
        return [prompt[::-1] + [EOS, 7] for prompt in prompts]

    engine = FixedRollouts(source)
    assert replay(engine, [[4, 5], [3]]).completion_ids == [[5, 4, EOS], [3, EOS]]
    assert calls == [[[4, 5], [3]]]


def test_a_callable_may_return_rollouts_with_logprobs():
    engine = FixedRollouts(lambda prompts: Rollouts([[5, 6, 7, 8, 9]] * len(prompts), [[-1.0] * 5] * len(prompts)))
    rollouts = replay(engine, [[1], [2]])
    assert rollouts.completion_ids == [[5, 6, 7, 8]] * 2 and rollouts.logprobs == [[-1.0] * 4] * 2


def test_a_callable_returning_the_wrong_count_is_an_error():
    with pytest.raises(ValueError, match="returned 1 completions for 2 prompts"):
        replay(FixedRollouts(lambda prompts: [[5]]), [[1], [2]])


def test_logprobs_must_match_the_completions():
    with pytest.raises(ValueError, match=r"logprobs\[1\] has 1 values for a completion of 2 tokens"):
        FixedRollouts([[1], [2, 3]], [[-0.1], [-0.2]])
    with pytest.raises(ValueError, match="has 1 rows for 2 completions"):
        FixedRollouts([[1], [2, 3]], [[-0.1]])
    with pytest.raises(ValueError, match="a callable returns them itself"):
        FixedRollouts(lambda prompts: [], logprobs=[[0.0]])
