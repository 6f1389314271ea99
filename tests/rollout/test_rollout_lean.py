"""The lean forward (``rollout/lean.py``): HF's logits, HF's tokens, weights read live, and a clear line between the
models it covers and those it does not."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import EOS, PAD, PROMPTS

import lightning_llm.rollout.fast as fast
from lightning_llm.models import tiny_model
from lightning_llm.rollout import FastDecodeEngine, HFGenerateEngine, SamplingSettings
from lightning_llm.rollout.base import left_pad
from lightning_llm.rollout.lean import LeanDecoder, lean_unsupported_reason, supports_lean

NEW_TOKENS = 12
GREEDY = SamplingSettings(max_completion_length=NEW_TOKENS, do_sample=False)
SAMPLING = SamplingSettings(max_completion_length=NEW_TOKENS, temperature=0.8, top_k=50, top_p=0.9, min_p=0.01,
                            repetition_penalty=1.3)


def _perturb_and_sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Seeded noise on every weight (biases, which HF initialises to zero, included, so that leaving one out would
    show; matrices far from their tiny init, so that completions depend on the whole prompt), and the head scaled
    up (as the rollout conftest does): greedy decoding then has no near-ties."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.05 if name.endswith(".bias") or "norm" in name else 0.15
            param.add_(scale * torch.randn(param.shape, generator=generator))
        model.lm_head.weight.mul_(4.0)
    return model.eval()


def _from_config(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config.vocab_size, config.pad_token_id, config.eos_token_id, config.bos_token_id = 64, PAD, EOS, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return AutoModelForCausalLM.from_config(config)


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    return model


def _llama_variant() -> torch.nn.Module:
    """Multi-head (no grouping) attention and MLP biases, linear rope scaling, a tanh-GELU MLP, untied head."""
    from transformers import LlamaConfig

    return _from_config(LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        attention_bias=True, mlp_bias=True, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, rms_norm_eps=1e-5))


def _llama_dynamic_rope() -> torch.nn.Module:
    """Dynamic-NTK rope with a short context, so that decoding grows past it (frequencies change mid-call)."""
    from transformers import LlamaConfig

    return _from_config(LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=10, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))


def _qwen3() -> torch.nn.Module:
    from transformers import Qwen3Config

    return _from_config(Qwen3Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, tie_word_embeddings=True))


def _mistral() -> torch.nn.Module:
    from transformers import MistralConfig

    return _from_config(MistralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        sliding_window=None))


MODELS = {
    "tiny-llama": lambda: tiny_model("tiny-llama"),  # GQA, untied head
    "tiny-qwen2": lambda: tiny_model("tiny-qwen2"),  # GQA, tied embeddings, q/k/v biases
    "tiny-llama-eager": lambda: _eager(tiny_model("tiny-llama")),
    "llama-mha-biases-linear-rope": _llama_variant,
    "llama-dynamic-rope": _llama_dynamic_rope,
    "qwen3": _qwen3,
    "mistral": _mistral,
}
ENGINE_MODELS = ["tiny-llama", "tiny-qwen2", "llama-mha-biases-linear-rope", "qwen3"]


@pytest.fixture(scope="module", params=list(MODELS))
def any_model(request) -> torch.nn.Module:
    return _perturb_and_sharpen(MODELS[request.param]())


@pytest.fixture(scope="module", params=ENGINE_MODELS)
def engine_model(request) -> torch.nn.Module:
    return _perturb_and_sharpen(MODELS[request.param]())


def generate(engine, model, settings, seed: int | None = None, prompts=PROMPTS):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return engine.generate(model, prompts, settings, eos_token_ids=[EOS], pad_token_id=PAD, generator=generator)


def hf_and_lean_logits(model: torch.nn.Module, steps: int = 6) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The prefill and ``steps`` decode logits of the left-padded :data:`PROMPTS`, fed the same (HF-greedy) tokens,
    from the engine's HF forward path (``DynamicCache``) and from the lean decoder."""
    input_ids, prompt_mask = left_pad(PROMPTS, PAD)
    rows, width = input_ids.shape
    mask = torch.zeros((rows, width + steps), dtype=torch.long)
    mask[:, :width] = prompt_mask
    hf = fast._Step(model, fast._dynamic_cache(model), None)
    lean = fast._LeanStep(LeanDecoder(model))
    with torch.no_grad():
        hf_logits = [hf.prefill(input_ids, mask[:, :width], width)]
        lean_logits = [lean.prefill(input_ids, mask, width)]
        for step in range(steps):
            token = hf_logits[-1].argmax(dim=-1, keepdim=True)
            slot = width + step
            mask[:, slot] = 1
            positions = prompt_mask.sum(dim=1) + step
            hf_logits.append(hf.decode(token, positions, mask[:, : slot + 1], slot))
            lean_logits.append(lean.decode(token, positions, mask[:, : slot + 1], slot))
    return hf_logits, lean_logits


# ------------------------------------------------------------------------------------------------------------ logits
def test_lean_logits_equal_the_hf_forward(any_model):
    assert supports_lean(any_model), lean_unsupported_reason(any_model)
    hf_logits, lean_logits = hf_and_lean_logits(any_model)
    for step, (expected, got) in enumerate(zip(hf_logits, lean_logits)):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"step {step}")
    # the steps really differ from each other (the check above compares something)
    assert (hf_logits[0] - hf_logits[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_logits_follow_the_hf_forward_in_half_precision(dtype):
    """In half precision the ops (and their dtypes) are HF's: the logits agree to a few units of rounding."""
    model = tiny_model("tiny-llama", dtype=dtype).eval()
    assert supports_lean(model)
    hf_logits, lean_logits = hf_and_lean_logits(model)
    for expected, got in zip(hf_logits, lean_logits):
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)


def test_a_row_with_nothing_to_attend_to_gives_finite_logits(model):
    decoder = LeanDecoder(model)
    input_ids, prompt_mask = left_pad(PROMPTS, PAD)
    rows, width = input_ids.shape
    mask = torch.zeros((rows, width + 1), dtype=torch.long)
    mask[:, :width] = prompt_mask
    decoder.prefill(input_ids, mask, torch.zeros_like(input_ids))
    logits = decoder.decode(input_ids[:, -1:], torch.zeros((rows, 1), dtype=torch.long), torch.zeros_like(mask),
                            width)  # every slot masked, the new one included
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------------------- engines
def test_greedy_tokens_equal_the_hf_forward_path_and_hf_generate(engine_model):
    lean = generate(FastDecodeEngine(lean=True), engine_model, GREEDY)
    plain = generate(FastDecodeEngine(lean=False), engine_model, GREEDY)
    hf = generate(HFGenerateEngine(return_logprobs=True), engine_model, GREEDY)
    assert lean.completion_ids == plain.completion_ids == hf.completion_ids
    assert len({tuple(ids) for ids in lean.completion_ids}) > 1  # the prompts lead to different completions
    torch.testing.assert_close(sum(lean.logprobs, []), sum(plain.logprobs, []), rtol=0, atol=1e-5)


def test_greedy_tokens_with_dynamic_rope_past_the_context():
    """Frequencies that change as decoding passes the context length: the lean path calls the model's rotary
    module at each step, as the HF forward does."""
    model = _perturb_and_sharpen(_llama_dynamic_rope())
    assert LeanDecoder(model).rope_per_step
    lean = generate(FastDecodeEngine(lean=True), model, GREEDY)
    assert lean.completion_ids == generate(FastDecodeEngine(lean=False), model, GREEDY).completion_ids
    assert lean.completion_ids == generate(HFGenerateEngine(), model, GREEDY).completion_ids


def test_sampling_with_one_seed_gives_the_same_tokens_and_logprobs(engine_model):
    lean = generate(FastDecodeEngine(lean=True), engine_model, SAMPLING, seed=3)
    plain = generate(FastDecodeEngine(lean=False), engine_model, SAMPLING, seed=3)
    assert lean.completion_ids == plain.completion_ids
    torch.testing.assert_close(sum(lean.logprobs, []), sum(plain.logprobs, []), rtol=0, atol=1e-5)
    other = generate(FastDecodeEngine(lean=True), engine_model, SAMPLING, seed=4)
    assert other.completion_ids != lean.completion_ids


def test_the_decoder_reads_the_weights_as_they_are_now():
    """References, not copies: an in-place update after the decoder (or the engine) was built is seen."""
    model = _perturb_and_sharpen(tiny_model("tiny-llama"))
    decoder = LeanDecoder(model)
    engine = FastDecodeEngine(lean=True)
    before = generate(engine, model, GREEDY).completion_ids
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layers.0." in name or "norm" in name:
                param.mul_(0.5)
            elif "embed_tokens" in name:
                param.mul_(-1.0)
    after = generate(engine, model, GREEDY).completion_ids
    assert after != before
    assert after == generate(HFGenerateEngine(), model, GREEDY).completion_ids
    input_ids, prompt_mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=prompt_mask,
                         position_ids=fast._prompt_positions(prompt_mask)).logits[:, -1]
        got = decoder.prefill(input_ids, prompt_mask, fast._prompt_positions(prompt_mask))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- choosing
def test_lean_is_the_cpu_default_for_supported_models(model, monkeypatch):
    built = []

    class Spy(LeanDecoder):
        def __init__(self, model):
            built.append(type(model).__name__)
            super().__init__(model)

    monkeypatch.setattr(fast, "LeanDecoder", Spy)
    generate(FastDecodeEngine(), model, GREEDY)
    assert built == ["LlamaForCausalLM"]
    for engine in (FastDecodeEngine(lean=False), FastDecodeEngine(cache="static"), FastDecodeEngine(cache="dynamic")):
        generate(engine, model, GREEDY)
    assert built == ["LlamaForCausalLM"]  # off when asked, and when an HF cache is chosen


def test_lean_true_on_an_unsupported_model_names_it_and_none_falls_back():
    gpt2 = tiny_model("tiny-gpt2").eval()
    assert not supports_lean(gpt2)
    with pytest.raises(ValueError, match=r"lean=True: no lean forward for GPT2LMHeadModel"):
        generate(FastDecodeEngine(lean=True), gpt2, GREEDY)
    assert (generate(FastDecodeEngine(), gpt2, GREEDY).completion_ids
            == generate(FastDecodeEngine(lean=False), gpt2, GREEDY).completion_ids
            == generate(HFGenerateEngine(), gpt2, GREEDY).completion_ids)


def test_lean_arguments_are_checked():
    with pytest.raises(ValueError, match="lean=True runs its own KV cache"):
        FastDecodeEngine(lean=True, cache="static")
    with pytest.raises(ValueError, match="lean=True runs its own KV cache"):
        FastDecodeEngine(lean=True, compile=True)
    with pytest.raises(ValueError, match="lean must be True, False or None"):
        FastDecodeEngine(lean="yes")
    with pytest.raises(ValueError, match="LeanDecoder does not support GPT2LMHeadModel"):
        LeanDecoder(tiny_model("tiny-gpt2"))


def test_models_outside_the_exact_cases_are_not_supported():
    from transformers import MistralConfig, Qwen2Config

    cases = {
        "sliding window (Qwen2)": _from_config(Qwen2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            use_sliding_window=True, sliding_window=4, max_window_layers=0)),
        "sliding window (Mistral)": _from_config(MistralConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            sliding_window=4)),
        "float64": tiny_model("tiny-llama").double(),
        "sequence classification": tiny_model("tiny-llama", task="sequence_classification"),
    }
    for case, candidate in cases.items():
        assert not supports_lean(candidate), case
    assert supports_lean(tiny_model("tiny-llama", dtype=torch.bfloat16))


def test_peft_models_fall_back_to_the_hf_forward():
    pytest.importorskip("peft")
    from lightning_llm.models import apply_peft, unwrap_model

    model = apply_peft(tiny_model("tiny-llama"), {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert not supports_lean(model) and not supports_lean(unwrap_model(model))
    with pytest.raises(ValueError, match="no lean forward for LlamaForCausalLM"):
        generate(FastDecodeEngine(lean=True), model, GREEDY)
    assert (generate(FastDecodeEngine(), model, GREEDY).completion_ids
            == generate(HFGenerateEngine(), model, GREEDY).completion_ids)
