"""Sampling from a geometric mixture of two models (Nash-MD's second completion) through the fast and HF engines: each
step's distribution is ``log_softmax(c · z_ref + (1 - c) · z_π)`` of the two models' logits on the same prefix,
``c = 0`` decodes the policy and ``c = 1`` the reference; replayed rollouts ignore the mixture."""

from __future__ import annotations

import pytest
import torch
from helpers import perturb_, sharp_reference_model
from rollout_helpers import EOS, PAD, PROMPTS

from lightning_llm.rollout import FastDecodeEngine, FixedRollouts, HFGenerateEngine, SamplingSettings
from lightning_llm.rollout.mixture import GeometricMixture

ENGINES = {
    "fast": lambda: FastDecodeEngine(),  # the lean decoder on CPU
    "fast_hf_forward": lambda: FastDecodeEngine(lean=False),
    "fast_static": lambda: FastDecodeEngine(cache="static"),
    "hf": lambda: HFGenerateEngine(return_logprobs=True),
}
GREEDY = SamplingSettings(max_completion_length=8, do_sample=False)


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A policy and a reference that decode differently (a perturbed copy)."""
    policy = sharp_reference_model().eval()
    reference = perturb_(sharp_reference_model(), seed=5, scale=0.2).eval()
    return policy, reference


def generate(engine, model, settings=GREEDY, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return engine.generate(model, PROMPTS, settings, eos_token_ids=[EOS], pad_token_id=PAD, generator=generator)


def direct_mixture_logps(policy, reference, prefix: list[int], coef: float) -> torch.Tensor:
    """``[V]`` next-token log-probs of the mixture after ``prefix`` alone: no padding, no cache, float64."""
    ids = torch.tensor([prefix])
    with torch.no_grad():
        z_policy = policy(input_ids=ids, use_cache=False).logits[0, -1].double()
        z_reference = reference(input_ids=ids, use_cache=False).logits[0, -1].double()
    return torch.log_softmax(coef * z_reference + (1 - coef) * z_policy, dim=-1)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_every_greedy_step_is_the_argmax_of_the_directly_computed_mixture(models, name):
    policy, reference = models
    coef = 0.4
    out = generate(ENGINES[name](), GeometricMixture(policy, reference, coef))
    for prompt, completion, logprobs in zip(PROMPTS, out.completion_ids, out.logprobs):
        assert len(completion) == GREEDY.max_completion_length or completion[-1] == EOS
        for position, token in enumerate(completion):
            direct = direct_mixture_logps(policy, reference, prompt + completion[:position], coef)
            assert token == int(direct.argmax()), (prompt, position)
            # greedy: the processed distribution is the mixture itself, so the engine's log-prob is the mixture's
            assert logprobs[position] == pytest.approx(float(direct[token]), abs=2e-5)


def test_the_fast_engines_distribution_equals_the_formula(models):
    """One prefill of the mixture step gives exactly log_softmax(c z_ref + (1 - c) z_pol) of the two models."""
    from lightning_llm.rollout.fast import _LeanStep, _MixtureStep, _prompt_positions
    from lightning_llm.rollout.lean import LeanDecoder

    policy, reference = models
    coef = 0.3
    mixture = GeometricMixture(policy, reference, coef)
    ids = torch.tensor([PROMPTS[0]])
    mask = torch.ones((1, ids.shape[1] + 4), dtype=torch.long)
    step = _MixtureStep(_LeanStep(LeanDecoder(policy)), _LeanStep(LeanDecoder(reference)), mixture)
    with torch.no_grad():
        mixed = step.prefill(ids, mask, ids.shape[1])[0]
        positions = _prompt_positions(mask[:, : ids.shape[1]])
        z_policy = policy(input_ids=ids, position_ids=positions).logits[0, -1].float()
        z_reference = reference(input_ids=ids, position_ids=positions).logits[0, -1].float()
    expected = torch.log_softmax(coef * z_reference + (1 - coef) * z_policy, dim=-1)
    # the lean forward equals HF's to float32 rounding (1e-5 on logits, tests/rollout/test_rollout_lean.py); log-probs
    # near -8 have a float32 spacing of about 1e-6
    torch.testing.assert_close(mixed, expected, rtol=1e-6, atol=1e-5)
    assert torch.exp(mixed).sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_coefficient_zero_decodes_the_policy_and_one_the_reference(models, name):
    policy, reference = models
    alone = {model_name: generate(ENGINES[name](), model).completion_ids
             for model_name, model in (("policy", policy), ("reference", reference))}
    assert alone["policy"] != alone["reference"]  # the two models disagree, so the check can fail
    assert generate(ENGINES[name](), GeometricMixture(policy, reference, 0.0)).completion_ids == alone["policy"]
    assert generate(ENGINES[name](), GeometricMixture(policy, reference, 1.0)).completion_ids == alone["reference"]


def test_sampling_from_the_mixture_is_reproducible_and_the_engines_agree_on_its_log_probs(models):
    """Sampled tokens: the fast engine's log-prob of each is the temperature-scaled mixture's (float64 directly)."""
    policy, reference = models
    settings = SamplingSettings(max_completion_length=6, temperature=0.7)
    mixture = GeometricMixture(policy, reference, 0.5)
    first = generate(FastDecodeEngine(), mixture, settings, seed=3)
    assert generate(FastDecodeEngine(), mixture, settings, seed=3).completion_ids == first.completion_ids
    for prompt, completion, logprobs in zip(PROMPTS, first.completion_ids, first.logprobs):
        for position, token in enumerate(completion):
            direct = torch.log_softmax(direct_mixture_logps(policy, reference, prompt + completion[:position], 0.5)
                                       / 0.7, dim=-1)
            assert logprobs[position] == pytest.approx(float(direct[token]), abs=2e-5)


def test_the_reference_context_is_entered_around_every_reference_forward(models):
    policy, reference = models
    entered = []

    class Count:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    generate(FastDecodeEngine(), GeometricMixture(policy, reference, 0.5, reference_context=Count),
             SamplingSettings(max_completion_length=3, do_sample=False))
    assert len(entered) >= 3  # the prefill and each decode step (and building the step)


def test_replayed_rollouts_ignore_the_mixture(models):
    policy, reference = models
    out = FixedRollouts([[3, EOS], [4, 4, EOS], [7], [8, 9]]).generate(
        GeometricMixture(policy, reference, 0.5), PROMPTS, GREEDY, eos_token_ids=[EOS], pad_token_id=PAD)
    assert out.completion_ids == [[3, EOS], [4, 4, EOS], [7], [8, 9]]


@pytest.mark.parametrize("coef", [-0.1, 1.5, float("nan")])
def test_a_coefficient_outside_zero_one_is_refused(models, coef):
    with pytest.raises(ValueError, match="mixture_coef must lie in"):
        GeometricMixture(*models, coef)


def test_the_mixture_is_not_a_model_to_call(models):
    with pytest.raises(TypeError, match="rollout engine"):
        GeometricMixture(*models, 0.5)(torch.tensor([[1]]))


@pytest.mark.parametrize("name", ["fast", "hf"])
def test_a_peft_policy_with_its_adapters_off_is_the_reference(models, name):
    """The policy object serves as both models: the reference context disables its adapters for the reference's
    forwards only (the fast engine falls back from the lean decoder to the model's forward under PEFT)."""
    from peft import LoraConfig, get_peft_model

    from lightning_llm.models.peft import disabled_adapters

    base = sharp_reference_model().eval()
    alone_base = generate(ENGINES[name](), base).completion_ids
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                             init_lora_weights=False)).eval()
    alone_policy = generate(ENGINES[name](), policy).completion_ids
    assert alone_policy != alone_base  # the adapters change the greedy tokens
    off = lambda: disabled_adapters(policy)  # noqa: E731
    assert generate(ENGINES[name](), GeometricMixture(policy, policy, 1.0, off)).completion_ids == alone_base
    assert generate(ENGINES[name](), GeometricMixture(policy, policy, 0.0, off)).completion_ids == alone_policy
