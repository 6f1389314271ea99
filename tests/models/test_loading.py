"""Model and tokenizer loading (preset, local directory, object), LM-head parts and logit scaling, PEFT helpers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CohereConfig, Gemma2Config, GraniteConfig

from lightning_llm.models import (
    PRESETS,
    apply_peft,
    causal_lm_parts,
    disabled_adapters,
    is_peft_model,
    load_model,
    load_tokenizer,
    tiny_model,
    tiny_tokenizer,
    unwrap_model,
)

IDS = torch.tensor([[5, 17, 300, 42, 9, 811, 2], [77, 64, 3, 120, 500, 2, 0]])


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_tiny_deterministic_and_match_the_tokenizer(preset):
    tok = tiny_tokenizer()
    state = torch.random.get_rng_state()
    model = load_model(preset)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 1_000_000
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert same_weights(model, tiny_model(preset))  # same seed, same weights
    assert not same_weights(model, tiny_model(preset, seed=1))
    assert next(model.parameters()).dtype == torch.float32
    assert load_model(preset, dtype="bfloat16").dtype == torch.bfloat16


def test_preset_tokenizer():
    tok = load_tokenizer(None, "tiny-llama")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.padding_side == "right"
    assert "{% generation %}" in tok.chat_template or "{%- generation %}" in tok.chat_template


def test_model_object_is_returned_as_is():
    model = tiny_model("tiny-gpt2")
    assert load_model(model) is model
    assert load_model(model, dtype=torch.float64) is model and model.dtype == torch.float64


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model("tiny-llama", dtype="float8")
    with pytest.raises(ValueError, match="task must be one of"):
        load_model("tiny-llama", task="seq2seq")
    with pytest.raises(ValueError, match="model must be"):
        load_model(3)
    with pytest.raises(ValueError, match="Pass a tokenizer, or a model"):
        load_tokenizer(None)
    nameless = tiny_model()
    nameless.config._name_or_path = ""
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        load_tokenizer(None, nameless)


def test_local_save_pretrained_directory(tmp_path):
    model, tok = tiny_model("tiny-qwen2"), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded) is type(model) and same_weights(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    loaded_tok = load_tokenizer(str(tmp_path))
    text = "<|im_start|>user\nWhat is 6 plus 9?<|im_end|>\n"
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded_tok.chat_template == tok.chat_template and loaded_tok.eos_token == tok.eos_token
    # the tokenizer of a model object is found from the directory it was loaded from
    assert load_tokenizer(None, loaded)(text)["input_ids"] == tok(text)["input_ids"]


def test_local_directory_wins_over_a_preset_name(tmp_path, monkeypatch):
    # a directory called like a preset is a directory, not the preset
    tiny_model("tiny-gpt2").save_pretrained(tmp_path / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    assert type(load_model("tiny-llama")).__name__ == "GPT2LMHeadModel"


def test_sequence_classification_head():
    model = load_model("tiny-llama", task="sequence_classification", num_labels=1)
    with torch.no_grad():
        assert model(input_ids=IDS[:1, :5]).logits.shape == (1, 1)
    trunk = tiny_model("tiny-llama")
    # the trunk is the causal LM's (same preset seed), the head is new
    assert torch.equal(model.model.embed_tokens.weight, trunk.model.embed_tokens.weight)


def test_tokenizer_pad_fallback_and_template_override(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    loaded = load_tokenizer(tok)
    assert loaded.pad_token == tok.eos_token
    assert loaded is not tok and tok.pad_token is None  # a tokenizer handed in is copied, never changed
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    handed = tiny_tokenizer()
    assert load_tokenizer(handed, chat_template=template).chat_template == template
    assert handed.chat_template != template
    assert load_tokenizer(handed) is handed  # nothing to change: the same object
    path = tmp_path / "t.jinja"
    path.write_text(template + "!")
    assert load_tokenizer(tiny_tokenizer(), chat_template=str(path)).chat_template == template + "!"


# ------------------------------------------------------------------------------------------- head parts / scaling
def head_logits(model, ids):
    parts = causal_lm_parts(model)
    hidden = parts.backbone(input_ids=ids, use_cache=False).last_hidden_state
    weight, bias = parts.head_weight()
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    logits = logits * parts.scaling.logit_scale
    if parts.scaling.softcap is not None:
        logits = parts.scaling.softcap * torch.tanh(logits / parts.scaling.softcap)
    return logits


SMALL = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0}


@pytest.mark.parametrize("config", [
    Gemma2Config(final_logit_softcapping=3.0, head_dim=16, **SMALL),  # soft-capping
    CohereConfig(logit_scale=0.25, **SMALL),  # multiplies
    GraniteConfig(logits_scaling=4.0, **SMALL),  # divides
], ids=["gemma2", "cohere", "granite"])
def test_parts_reproduce_the_logits_of_scaled_heads(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    parts = causal_lm_parts(model)
    assert (parts.scaling.logit_scale, parts.scaling.softcap) != (1.0, None)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(head_logits(model, ids), model(input_ids=ids, use_cache=False).logits)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parts_reproduce_the_logits_of_the_presets(preset):
    model = tiny_model(preset).eval()
    assert causal_lm_parts(model).scaling.logit_scale == 1.0
    with torch.no_grad():
        torch.testing.assert_close(head_logits(model, IDS), model(input_ids=IDS, use_cache=False).logits)


def test_parts_refuse_a_model_without_lm_head():
    with pytest.raises(ValueError):
        causal_lm_parts(torch.nn.Linear(2, 2))


# -------------------------------------------------------------------------------------------------------- PEFT
def test_peft_from_a_dict():
    model = tiny_model("tiny-llama")
    base_logits = model(input_ids=IDS, use_cache=False).logits.detach()
    peft_model = apply_peft(model, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert is_peft_model(peft_model) and not is_peft_model(model.base_model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B, q and v, two layers
    assert unwrap_model(peft_model) is model
    # fresh LoRA (B = 0) leaves outputs unchanged; after perturbing B, disabling the adapters restores the base
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, base_logits)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        assert not torch.allclose(peft_model(input_ids=IDS).logits, base_logits)
        with disabled_adapters(peft_model):
            torch.testing.assert_close(peft_model(input_ids=IDS).logits, base_logits)
    parts = causal_lm_parts(peft_model)
    assert parts.lm_head is model.lm_head


def test_tokenizer_loaded_by_auto_class_from_directory(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).eos_token == "<|im_end|>"


def test_a_missing_directory_and_a_misspelled_preset_are_named(tmp_path):
    from lightning_llm.models.loading import check_model_name

    with pytest.raises(ValueError, match=r"model: no such directory: .*nope"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"model: no such directory: .*outputs/sft/hf"):
        load_model("outputs/sft/hf")
    with pytest.raises(ValueError, match=r"unknown preset 'tiny-lama'; did you mean 'tiny-llama'\?"):
        load_model("tiny-lama")
    with pytest.raises(ValueError, match=r"tokenizer: unknown preset 'tiny-qwen'; did you mean 'tiny-qwen2'"):
        load_tokenizer("tiny-qwen")
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match=r"is a file; expected a directory"):
        load_model(str(tmp_path / "weights.bin"))
    assert check_model_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id is left to the hub


def test_a_hub_id_that_cannot_be_loaded_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model: 'nobody/no-such-model' is not a local directory or preset, and "
                                         r"could not be loaded from the Hugging Face Hub \(HF_HUB_OFFLINE is set"):
        load_model("nobody/no-such-model")
