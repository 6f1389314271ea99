"""Model helpers on the tiny presets: dropout, bf16 casting, parameter counts (plain and sharded), layer freezing."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.multiprocessing as mp
from sharded_param_count_worker import sharded_count_worker
from torch import nn

from lightning_llm.models import tiny_model
from lightning_llm.utils.model import (
    disable_dropout_in_model,
    find_decoder_layers,
    freeze_model_layers,
    get_model_param_count,
    peft_module_casting_to_bf16,
)


def _train_forward_twice(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    input_ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids).logits, model(input_ids).logits


# ---- disable_dropout_in_model -------------------------------------------------------------------------------------


def test_disable_dropout_modules_makes_gpt2_training_forward_deterministic() -> None:
    model = tiny_model("tiny-gpt2", resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    first, second = _train_forward_twice(model)
    assert not torch.allclose(first, second)
    disable_dropout_in_model(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    first, second = _train_forward_twice(model)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_disable_dropout_functional_attention_rate_of_llama() -> None:
    # Llama has no nn.Dropout: attention dropout is a float handed to the attention function
    model = tiny_model("tiny-llama", attention_dropout=0.5, attn_implementation="eager")
    first, second = _train_forward_twice(model)
    assert not torch.allclose(first, second)
    disable_dropout_in_model(model, functional=False)  # TRL's behaviour: misses it
    assert model.model.layers[0].self_attn.attention_dropout == 0.5
    disable_dropout_in_model(model)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    first, second = _train_forward_twice(model)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ---- peft_module_casting_to_bf16 ----------------------------------------------------------------------------------


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {name: param.dtype for name, param in model.named_parameters()}


def test_bf16_casting_follows_trl_rules_on_llama() -> None:
    model = tiny_model("tiny-llama")
    cast = peft_module_casting_to_bf16(model)
    norm_modules = {f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert cast == {**{name: torch.float32 for name in norm_modules | {"model.norm"}},
                    "model.embed_tokens": torch.bfloat16, "lm_head": torch.bfloat16}
    dtypes = _dtypes(model)
    assert dtypes["model.embed_tokens.weight"] == dtypes["lm_head.weight"] == torch.bfloat16
    assert dtypes["model.norm.weight"] == dtypes["model.layers.1.input_layernorm.weight"] == torch.float32
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.float32  # untouched


def test_bf16_casting_upcasts_norms_of_a_bf16_model_and_extra_patterns() -> None:
    model = tiny_model("tiny-gpt2", task="sequence_classification", num_labels=1, dtype=torch.bfloat16)
    peft_module_casting_to_bf16(model, module_patterns=("wte", "wpe", "score"))
    dtypes = _dtypes(model)
    # GPT-2's ln_1 / ln_2 / ln_f are LayerNorm instances without "norm" in their names
    assert {dtypes[f"transformer.h.{i}.ln_{j}.weight"] for i in range(2) for j in (1, 2)} == {torch.float32}
    assert dtypes["transformer.ln_f.bias"] == torch.float32
    assert dtypes["transformer.wte.weight"] == dtypes["score.weight"] == torch.bfloat16
    assert dtypes["transformer.h.0.mlp.c_fc.weight"] == torch.bfloat16


# ---- get_model_param_count ----------------------------------------------------------------------------------------


def _hand_count(name: str) -> int:
    """Parameter count from the architecture's formula and the preset's sizes (vocab 885, width 64, 2 layers)."""
    vocab, width, layers, ffn = 885, 64, 2, 176
    if name == "tiny-gpt2":
        block = 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width) \
            + (width * 4 * width + 4 * width) + (4 * width * width + width)
        return vocab * width + 512 * width + layers * block + 2 * width
    kv_width = 2 * 16  # 2 key/value heads of size 64 / 4
    attention = 2 * width * width + 2 * width * kv_width
    if name == "tiny-qwen2":
        attention += width + 2 * kv_width  # q/k/v biases
    block = attention + 3 * width * ffn + 2 * width
    heads = vocab * width * (1 if name == "tiny-qwen2" else 2)  # qwen2 ties the LM head to the embeddings
    return heads + layers * block + width


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_param_count_matches_architecture_formula(name: str) -> None:
    model = tiny_model(name)
    assert get_model_param_count(model) == _hand_count(name)
    assert get_model_param_count(model, trainable_only=True) == _hand_count(name)
    model.get_input_embeddings().weight.requires_grad_(False)
    assert get_model_param_count(model, trainable_only=True) == _hand_count(name) - 885 * 64


def test_param_count_deepspeed_zero3_placeholders() -> None:
    model = nn.Module()
    model.a = nn.Parameter(torch.empty(0))
    model.a.ds_numel = 12  # ZeRO-3 keeps an empty placeholder and the full size aside
    model.b = nn.Parameter(torch.empty(0), requires_grad=False)
    model.b.ds_numel = 30
    model.c = nn.Parameter(torch.ones(4))  # not partitioned
    assert get_model_param_count(model) == 46
    assert get_model_param_count(model, trainable_only=True) == 16


def test_param_count_fsdp1_flat_parameters_fake() -> None:
    # use_orig_params=False: one flat shard per wrapped unit, remembering the unpadded original sizes
    model = nn.Module()
    model.flat = nn.Parameter(torch.ones(5))
    model.flat._numels, model.flat._fqns, model.flat._params = (6, 4), ("x.weight", "x.bias"), None
    assert get_model_param_count(model) == 10

    # use_orig_params=True: the originals are (possibly empty) views of this rank's shard
    class FlatHolder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(0))
            self.bias = nn.Parameter(torch.ones(3), requires_grad=False)
            flat = torch.ones(3)
            flat._numels, flat._fqns, flat._params = (20, 5), ("weight", "bias"), [self.weight, self.bias]
            self._flat_param = flat

    holder = FlatHolder()
    assert get_model_param_count(holder) == 25
    assert get_model_param_count(holder, trainable_only=True) == 20


@pytest.mark.slow
def test_param_count_real_fsdp1_and_fsdp2_on_two_gloo_ranks(tmp_path) -> None:
    mp.spawn(sharded_count_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    total, trainable = 5 * 7 + 7 + 7 * 3 + 3, 7 + 7 * 3 + 3  # 66 parameters, the first weight frozen
    for rank in range(2):
        counts = torch.load(tmp_path / f"rank{rank}.pt")
        assert counts["fsdp1_origFalse"][:2] == (total, total)
        assert counts["fsdp1_origTrue"][:2] == (total, trainable)
        assert counts["fsdp2"][:2] == (total, trainable)
        # the ranks really held shards: what each holds locally is less than the whole
        assert all(local < total for _, _, local in counts.values())


# ---- freeze_model_layers ------------------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_freeze_layer_range_llama() -> None:
    model = tiny_model("tiny-llama")
    everything = _trainable(model)
    frozen = freeze_model_layers(model, layer_range=(0, 1))
    expected = {name for name in everything if name.startswith("model.layers.0.")}
    assert set(frozen) == expected and len(expected) == 9
    assert _trainable(model) == everything - expected


def test_freeze_negative_open_range_and_embeddings_gpt2() -> None:
    model = tiny_model("tiny-gpt2")
    frozen = freeze_model_layers(model, layer_range=(-1, None), freeze_embeddings=True)
    expected = {n for n, _ in model.named_parameters() if n.startswith("transformer.h.1.")}
    expected |= {"transformer.wte.weight", "transformer.wpe.weight"}
    assert set(frozen) == expected
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in expected)
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in expected)


def test_freeze_name_patterns_and_range_union() -> None:
    model = tiny_model("tiny-llama")
    frozen = freeze_model_layers(model, layer_range=range(1, 2), name_patterns=[r"mlp\.down_proj", r"^model\.norm"])
    expected = {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    expected |= {"model.layers.0.mlp.down_proj.weight", "model.norm.weight"}
    assert set(frozen) == expected


def test_freeze_tied_lm_head_warns_and_freezes_the_shared_matrix(caplog) -> None:
    model = tiny_model("tiny-qwen2")
    with caplog.at_level(logging.WARNING, logger="lightning_llm.utils.model"):
        frozen = freeze_model_layers(model, freeze_lm_head=True)
    assert frozen == ["model.embed_tokens.weight"]
    assert not model.lm_head.weight.requires_grad
    assert "tied" in caplog.text


def test_freeze_untied_lm_head_llama() -> None:
    model = tiny_model("tiny-llama")
    assert freeze_model_layers(model, freeze_lm_head=True) == ["lm_head.weight"]
    assert model.model.embed_tokens.weight.requires_grad


def test_freeze_finds_layers_under_peft() -> None:
    from lightning_llm.models import apply_peft

    model = apply_peft(tiny_model("tiny-llama"), {"r": 2, "target_modules": ["q_proj"]})
    name, layers = find_decoder_layers(model)
    assert name == "base_model.model.model.layers" and len(layers) == 2
    frozen = freeze_model_layers(model, layer_range=(1, 2))
    assert frozen and all(n.startswith("base_model.model.model.layers.1.") for n in frozen)
    assert any("lora_A" in n for n in frozen)


def test_freeze_nothing_requested_is_a_no_op() -> None:
    model = tiny_model("tiny-llama")
    assert freeze_model_layers(model) == []
    assert len(_trainable(model)) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layer_range=(0, 5)), "outside"),
        (dict(layer_range=(1, 1)), "selects none"),
        (dict(layer_range=(1,)), r"\(start, stop\) pair"),
        (dict(layer_range=(0.5, 2)), "integers"),
        (dict(name_patterns=["does_not_exist"]), "matches no parameter"),
        (dict(name_patterns=["("]), "not a valid regular expression"),
    ],
)
def test_freeze_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        freeze_model_layers(tiny_model("tiny-llama"), **kwargs)


def test_ambiguous_layer_lists_raise() -> None:
    model = nn.Module()
    model.vision = nn.Module()
    model.vision.layers = nn.ModuleList([nn.Linear(2, 2)])
    model.text = nn.Module()
    model.text.layers = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="several layer lists"):
        freeze_model_layers(model, layer_range=(0, 1))
    with pytest.raises(ValueError, match="Could not find"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))
