"""HF ``generate`` and our decode loop: the same greedy tokens, the same sampling distribution, the right log-probs."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import EOS, PAD, PROMPTS, hf_scores

from lightning_llm.rollout import FastDecodeEngine, HFGenerateEngine, SamplingSettings, make_engine
from lightning_llm.rollout.base import left_pad

NEVER = 10_000  # an id outside the vocabulary: EOS never occurs
ENGINES = {
    "hf": lambda: HFGenerateEngine(return_logprobs=True),
    "fast": lambda: FastDecodeEngine(),
    "fast_multinomial": lambda: FastDecodeEngine(sampler="multinomial"),
    "fast_static": lambda: FastDecodeEngine(cache="static"),
}


def generate(engine, model, settings, eos=(EOS,), prompts=PROMPTS, seed: int | None = None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return engine.generate(model, prompts, settings, eos_token_ids=list(eos), pad_token_id=PAD, generator=generator)


def reference_greedy(model, prompt: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding of one prompt alone: no padding, no cache, the whole sequence re-run at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt):]


def forced_eos(model) -> int:
    """An id that greedy decoding of the second prompt emits at its step 2 (and not before): taken as an extra EOS,
    that row stops after 3 tokens while the others go on."""
    completion = reference_greedy(model, PROMPTS[1], 3, set())
    assert completion[2] not in completion[:2]
    return completion[2]


# ------------------------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("name", ["fast", "fast_static"])
def test_greedy_tokens_equal_hf_generate_with_padding_and_early_eos(model, name):
    settings = SamplingSettings(max_completion_length=12, do_sample=False)
    eos = (EOS, forced_eos(model))
    hf = generate(ENGINES["hf"](), model, settings, eos)
    ours = generate(ENGINES[name](), model, settings, eos)
    assert ours.completion_ids == hf.completion_ids
    # each row is its prompt's greedy continuation decoded alone: the left padding changed nothing
    assert ours.completion_ids == [reference_greedy(model, p, 12, set(eos)) for p in PROMPTS]
    lengths = [len(ids) for ids in ours.completion_ids]
    assert lengths[1] == 3 and ours.completion_ids[1][-1] == eos[1]  # the row cut right after its EOS, kept
    assert max(lengths) == 12  # while another row ran to the length limit
    for ids in ours.completion_ids:  # no EOS before the last token, no padding left
        assert not set(ids[:-1]) & set(eos)
    torch.testing.assert_close(sum(ours.logprobs, []), sum(hf.logprobs, []), rtol=0, atol=1e-5)


def test_greedy_stops_when_every_row_has_ended(model):
    settings = SamplingSettings(max_completion_length=12, do_sample=False)
    stop_all = {ids[1] for ids in (reference_greedy(model, p, 2, set()) for p in PROMPTS)}
    for name in ENGINES:
        rollouts = generate(ENGINES[name](), model, settings, eos=sorted(stop_all))
        assert all(len(ids) <= 2 and ids[-1] in stop_all for ids in rollouts.completion_ids), name


def test_completions_are_at_most_max_completion_length(model):
    settings = SamplingSettings(max_completion_length=5)
    for name in ENGINES:
        rollouts = generate(ENGINES[name](), model, settings, eos=(NEVER,), seed=0)
        assert [len(ids) for ids in rollouts.completion_ids] == [5] * len(PROMPTS), name
        assert [len(lp) for lp in rollouts.logprobs] == [5] * len(PROMPTS), name


# ---------------------------------------------------------------------------------------------------------- sampling
def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of ``counts`` to ``probs`` (Pearson's chi-square; bins expecting fewer than 5 draws pooled)."""
    expected = probs.double() * counts.sum()
    observed = counts.double()
    assert observed[expected == 0].sum() == 0, "a token of probability 0 was drawn"
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    # the chi-square survival function is the regularised upper incomplete gamma function
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))


SAMPLING = SamplingSettings(max_completion_length=1, temperature=1.3, top_k=40, top_p=0.95, min_p=0.02,
                            repetition_penalty=1.2)


@pytest.mark.parametrize("name", list(ENGINES))
def test_first_tokens_follow_the_processed_distribution(model, name):
    """Many draws of the first token of one prompt against the probabilities HF's processors give."""
    prompt = PROMPTS[2]
    draws = 3000
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[:, -1]
        probs = hf_scores(model, SAMPLING, torch.tensor([prompt]), logits).softmax(-1)[0]
    assert 10 < int((probs > 0).sum()) < 40  # the filters are active, and many tokens are in play
    rollouts = generate(ENGINES[name](), model, SAMPLING, prompts=[prompt] * draws, seed=11)
    first = torch.tensor([ids[0] for ids in rollouts.completion_ids])
    counts = torch.bincount(first, minlength=probs.numel())
    assert chi_square_p_value(counts, probs) > 1e-3
    # the returned log-probs are those of the same distribution
    torch.testing.assert_close(torch.tensor([lp[0] for lp in rollouts.logprobs]), probs[first].log(),
                               rtol=0, atol=1e-5)


def test_the_chi_square_check_rejects_a_different_distribution(model):
    """The check above has power: draws at temperature 1 do not pass for the probabilities at 1.3."""
    prompt = PROMPTS[2]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[:, -1]
        probs = hf_scores(model, SAMPLING, torch.tensor([prompt]), logits).softmax(-1)[0]
    colder = SamplingSettings(**{**SAMPLING.__dict__, "temperature": 1.0})
    rollouts = generate(FastDecodeEngine(), model, colder, prompts=[prompt] * 3000, seed=11)
    counts = torch.bincount(torch.tensor([ids[0] for ids in rollouts.completion_ids]), minlength=probs.numel())
    assert chi_square_p_value(counts, probs) < 1e-6


LONG_SAMPLING = SamplingSettings(max_completion_length=10, temperature=0.8, top_k=50, top_p=0.9, min_p=0.01,
                                 repetition_penalty=1.3)


@pytest.mark.parametrize("name", list(ENGINES))
def test_logprobs_are_the_processed_logprobs_of_a_fresh_forward(model, name):
    """Each returned log-prob equals the log-prob of the sampled token, recomputed from one forward of the prompt
    and the completion (no padding, no cache) through HF's processors."""
    rollouts = generate(ENGINES[name](), model, LONG_SAMPLING, eos=(NEVER,), seed=5)
    for prompt, completion, logprobs in zip(PROMPTS, rollouts.completion_ids, rollouts.logprobs):
        sequence = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=sequence, use_cache=False).logits[0]
        for step, token in enumerate(completion):
            seen = sequence[:, : len(prompt) + step]
            scores = hf_scores(model, LONG_SAMPLING, seen, logits[len(prompt) + step - 1: len(prompt) + step])
            expected = torch.log_softmax(scores, dim=-1)[0, token]
            assert logprobs[step] == pytest.approx(float(expected), abs=1e-4), (name, step)


def test_the_multinomial_sampler_draws_generates_tokens_for_the_same_generator(model):
    """With ``sampler="multinomial"`` both engines turn the generator into the same random stream and compute the
    same probabilities, so they draw the same tokens."""
    hf = generate(ENGINES["hf"](), model, LONG_SAMPLING, seed=3)
    fast = generate(ENGINES["fast_multinomial"](), model, LONG_SAMPLING, seed=3)
    assert fast.completion_ids == hf.completion_ids


@pytest.mark.parametrize("name", ["fast", "fast_multinomial"])
def test_one_generator_seed_gives_the_same_samples_again(model, name):
    first = generate(ENGINES[name](), model, LONG_SAMPLING, seed=3)
    again = generate(ENGINES[name](), model, LONG_SAMPLING, seed=3)
    other = generate(ENGINES[name](), model, LONG_SAMPLING, seed=4)
    assert again.completion_ids == first.completion_ids and other.completion_ids != first.completion_ids
    assert again.logprobs == first.logprobs


def test_hf_engine_overrides_the_models_generation_defaults(model):
    """A hub model's generation_config (top-k, temperature, min-p, ...) does not leak into the HF engine's sampling."""
    import copy

    shipped = copy.deepcopy(model)
    shipped.generation_config.update(top_k=2, temperature=0.1, top_p=0.5, min_p=0.5, repetition_penalty=2.0,
                                     typical_p=0.5, no_repeat_ngram_size=1, min_new_tokens=5)
    settings = SamplingSettings(max_completion_length=10, temperature=0.9, repetition_penalty=1.1)  # min_p None
    hf = generate(ENGINES["hf"](), shipped, settings, seed=8)
    fast = generate(ENGINES["fast_multinomial"](), model, settings, seed=8)
    assert hf.completion_ids == fast.completion_ids


# -------------------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("name", list(ENGINES))
def test_generation_runs_in_eval_mode_and_restores_the_modes(name):
    from lightning_llm.models import tiny_model

    model = tiny_model("tiny-llama", attention_dropout=0.5)  # in train mode, every forward would differ
    model.train()
    model.model.layers[0].eval()  # a submodule with its own mode keeps it
    settings = SamplingSettings(max_completion_length=6, do_sample=False)
    first = generate(ENGINES[name](), model, settings)
    second = generate(ENGINES[name](), model, settings)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert first.completion_ids == second.completion_ids
    model.eval()
    assert generate(ENGINES[name](), model, settings).completion_ids == first.completion_ids


def test_left_pad_aligns_prompts_to_the_right():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_static_cache_is_reused_across_calls_of_the_same_shape(model):
    engine = FastDecodeEngine(cache="static")
    settings = SamplingSettings(max_completion_length=8, do_sample=False)
    first = generate(engine, model, settings)
    cache = engine._static[1]
    second = generate(engine, model, settings, prompts=[p[:-1] or p for p in PROMPTS])  # shorter, same slots
    assert engine._static[1] is cache
    assert first.completion_ids == generate(FastDecodeEngine(), model, settings).completion_ids
    assert second.completion_ids == generate(FastDecodeEngine(), model, settings,
                                             prompts=[p[:-1] or p for p in PROMPTS]).completion_ids


def test_make_engine_builds_each_backend_by_name():
    assert isinstance(make_engine("hf", return_logprobs=True), HFGenerateEngine)
    assert isinstance(make_engine("fast", cache="static"), FastDecodeEngine)
    assert make_engine("fixed", completions=[[1]]).name == "fixed"
    with pytest.raises(ValueError, match=r"Unknown rollout engine 'vllm'; choose one of \['fast', 'fixed', 'hf'\]"):
        make_engine("vllm")


def test_engine_arguments_are_checked_by_name(model):
    with pytest.raises(ValueError, match="cache must be one of"):
        FastDecodeEngine(cache="paged")
    with pytest.raises(ValueError, match="compile=True needs cache='static'"):
        FastDecodeEngine(cache="dynamic", compile=True)
    with pytest.raises(ValueError, match="stop_check_interval"):
        FastDecodeEngine(stop_check_interval=0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        FastDecodeEngine(sampler="gumbel")
    for engine in (HFGenerateEngine(), FastDecodeEngine()):
        with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
            engine.generate(model, [[1], []], SamplingSettings(), eos_token_ids=[EOS], pad_token_id=PAD)
        with pytest.raises(ValueError, match="eos_token_ids is empty"):
            engine.generate(model, [[1]], SamplingSettings(), eos_token_ids=[], pad_token_id=PAD)


def test_sync_weights_is_a_no_op_in_process(model):
    for engine in (HFGenerateEngine(), FastDecodeEngine()):
        assert engine.sync_weights(model) is None


@pytest.mark.slow
def test_compiled_decode_step_on_cpu_gives_the_same_tokens(model):
    """The torch.compile path (CUDA's default) exercised on CPU: same tokens as HF, and a second call reuses it."""
    engine = FastDecodeEngine(cache="static", compile=True)
    settings = SamplingSettings(max_completion_length=8, do_sample=False)
    expected = generate(ENGINES["hf"](), model, settings).completion_ids
    assert generate(engine, model, settings).completion_ids == expected
    assert generate(engine, model, settings).completion_ids == expected
