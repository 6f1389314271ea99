"""The CUDA defaults of FastDecodeEngine (static cache, compiled decode step with CUDA graphs) on a GPU."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import EOS, PAD, PROMPTS

from lightning_llm.rollout import FastDecodeEngine, HFGenerateEngine, SamplingSettings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cuda_model():
    from helpers import sharp_reference_model

    return sharp_reference_model().cuda().eval()


def _generate(engine, model, settings, seed=None):
    generator = torch.Generator(device="cuda").manual_seed(seed) if seed is not None else None
    return engine.generate(model, PROMPTS, settings, eos_token_ids=[EOS], pad_token_id=PAD, generator=generator)


def test_compiled_static_decode_matches_hf_generate_greedy(cuda_model):
    engine = FastDecodeEngine()  # CUDA: static cache + torch.compile
    settings = SamplingSettings(max_completion_length=16, do_sample=False)
    expected = _generate(HFGenerateEngine(return_logprobs=True), cuda_model, settings)
    for _ in range(2):  # the second call replays the recorded graphs
        ours = _generate(engine, cuda_model, settings)
        assert ours.completion_ids == expected.completion_ids
        torch.testing.assert_close(sum(ours.logprobs, []), sum(expected.logprobs, []), rtol=0, atol=1e-4)


def test_sampling_on_cuda_is_reproducible_and_cut_at_eos(cuda_model):
    engine = FastDecodeEngine()
    settings = SamplingSettings(max_completion_length=16, temperature=0.8, top_p=0.9, top_k=50)
    first, again = _generate(engine, cuda_model, settings, seed=1), _generate(engine, cuda_model, settings, seed=1)
    assert first.completion_ids == again.completion_ids
    for ids, logprobs in zip(first.completion_ids, first.logprobs):
        assert len(ids) == len(logprobs) <= 16 and EOS not in ids[:-1]
        assert all(lp <= 0 for lp in logprobs)


def test_cuda_memory_does_not_grow_over_repeated_calls(cuda_model):
    engine = FastDecodeEngine()
    settings = SamplingSettings(max_completion_length=8)
    for seed in range(3):  # compilation, then the CUDA graphs' recording, happen in the first calls
        _generate(engine, cuda_model, settings, seed=seed)
    torch.cuda.synchronize()
    after_first = torch.cuda.memory_allocated()
    for seed in range(20):
        _generate(engine, cuda_model, settings, seed=seed)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= after_first + 1024**2


def test_bf16_model_generates(cuda_model):
    import copy

    model = copy.deepcopy(cuda_model).to(torch.bfloat16)
    rollouts = _generate(FastDecodeEngine(), model, SamplingSettings(max_completion_length=8), seed=0)
    assert all(1 <= len(ids) <= 8 for ids in rollouts.completion_ids)
