"""LLMModule: the log-prob path vs float64, metric buffer, optimizer and schedule, generation, checkpoint round trip,
HF export, LoRA, and building from a local directory."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import IGNORE, quiet_trainer, sample_rows, sgd
from lightning import Callback, Trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_llm.data.sft import SFTDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.models.peft import is_peft_model
from lightning_llm.modules.base import LLMModule, MetricBuffer, cosine_with_warmup, decay_parameter_groups
from lightning_llm.modules.sft import SFTModule

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def padded_batch(tok, n=4):
    texts = ["Question: What is 1 plus 8?\nAnswer: 1 plus 8 is 9.", "Blood is red.", "A frog says ribbit.",
             "The opposite of long is short."][:n]
    enc = [tok(t + tok.eos_token)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, seq in enumerate(enc):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    labels = torch.where(mask.bool(), ids, IGNORE)
    labels[0, :4] = IGNORE  # a prompt part without loss
    return ids, mask, labels


# --------------------------------------------------------------------------------------------- log-prob path
@pytest.mark.parametrize("preset, impl", [("tiny-llama", "chunked"), ("tiny-qwen2", "chunked"),
                                          ("tiny-gpt2", "chunked"), ("tiny-llama", "eager")])
def test_token_logprobs_match_float64_logits(tok, preset, impl):
    model = tiny_model(preset).eval()
    reference = copy.deepcopy(model).double()
    module = LLMModule(model=model, tokenizer=tok, logprob_impl=impl)
    ids, mask, labels = padded_batch(tok)
    temperature = 0.7
    out = module.token_logprobs(model, ids, labels, attention_mask=mask, temperature=temperature,
                                return_entropy=True, return_is_top1=True)
    logits = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1] / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # float64
    targets = labels[:, 1:]
    valid = targets != IGNORE
    ref = torch.where(valid, logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    ref_entropy = -(logp_all.exp() * logp_all).sum(-1)
    assert out.logps.shape == targets.shape
    torch.testing.assert_close(out.logps.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double()[valid], ref_entropy[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_top1[valid], (logits.argmax(-1) == targets)[valid])
    assert (out.logps[~valid] == 0).all()

    # gradients w.r.t. parameters of the backbone and the head, through a weighted sum of the log-probs
    weights = torch.linspace(0.5, 1.5, targets.numel()).reshape(targets.shape)
    (out.logps * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    names = [n for n, _ in model.named_parameters()]
    picked = [names[1], names[len(names) // 2], names[-1]]  # early layer, middle layer, head / final norm
    params, ref_params = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in picked:
        grad, ref_grad = params[name].grad.double(), ref_params[name].grad
        assert ref_grad.abs().max() > 0, name
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6 * ref_grad.abs().max().item(), msg=name)


# ---------------------------------------------------------------------------------------------- metric buffer
def test_metric_buffer_token_weighted_means_and_sums():
    buffer = MetricBuffer()
    assert not buffer
    buffer.add("loss", torch.tensor(6.0), torch.tensor(3))  # micro-batch 1: 3 tokens, mean 2
    buffer.add("loss", 2.0, 1.0)  # micro-batch 2: 1 token, mean 2 -> weighted mean of (6 + 2) / 4
    buffer.add("entropy", torch.tensor(1.0), 2)
    buffer.add_sum("num_tokens", torch.tensor(10))
    buffer.add_sum("num_tokens", 5)
    out = buffer.flush(lambda t: t, torch.device("cpu"))
    assert out == {"loss": 2.0, "entropy": 0.5, "num_tokens": 15.0}
    assert not buffer and buffer.flush(lambda t: t, torch.device("cpu")) == {}
    # a cross-rank sum: two identical ranks -> same means, doubled sums
    buffer.add("loss", 3.0, 2.0)
    buffer.add_sum("num_tokens", 7)
    assert buffer.flush(lambda t: t * 2, torch.device("cpu")) == {"loss": 1.5, "num_tokens": 14.0}
    buffer.add("empty", 0.0, 0.0)
    assert buffer.flush(lambda t: t, torch.device("cpu")) == {}  # a mean over nothing is left out, not logged as 0


def test_metric_buffer_extremes_over_micro_batches_and_processes():
    buffer = MetricBuffer()
    buffer.add_extreme("clip_ratio/low_min", torch.tensor(0.5), "min")
    buffer.add_extreme("clip_ratio/low_min", 0.25, "min")
    buffer.add_extreme("clip_ratio/low_min", float("nan"), "min")  # NaN is ignored
    buffer.add_extreme("clip_ratio/high_max", 0.1, "max")
    buffer.add_extreme("clip_ratio/high_max", 0.375, "max")
    buffer.add_extreme("only_nan", float("nan"), "max")
    assert buffer
    # another process saw 0.125 (min) and 0.2 / nothing (max): the cross-process reduction takes the min / max
    other = {"min": torch.tensor([0.125]), "max": torch.tensor([0.2, -math.inf])}

    def reduce_extreme(values, op):
        return torch.minimum(values, other[op]) if op == "min" else torch.maximum(values, other[op])

    out = buffer.flush(lambda t: t, torch.device("cpu"), reduce_extreme)
    assert out == {"clip_ratio/low_min": 0.125, "clip_ratio/high_max": 0.375}
    assert not buffer
    with pytest.raises(ValueError, match="op must be 'min' or 'max'"):
        buffer.add_extreme("x", 1.0, "mean")


# ------------------------------------------------------------------------------------- optimizer and schedule
def test_cosine_with_warmup_values():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = cosine_with_warmup(optimizer, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warm-up 1/2, 2/2; then 0.5 * (1 + cos(pi * k / 8)) for k = 0..8
    expected = [1.0, 2.0] + [2.0 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(9)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[6] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_named_schedule_steps_like_the_hf_trainer(tok):
    """``lr_scheduler_type="linear"``: warm-up from 0 over 2 steps, then linear decay to 0 at step 6 (hand-computed:
    the HF Trainer's schedule that TRL's configs default to); the rate each step used is logged."""
    from helpers import StepMetrics, quiet_trainer

    module = SFTModule("tiny-llama", learning_rate=0.4, lr_scheduler_type="linear", warmup_steps=2)
    data = SFTDataModule("sample:messages", tokenizer=tok, batch_size=2, max_length=48)
    metrics = StepMetrics()
    quiet_trainer(max_steps=6, callbacks=[metrics]).fit(module, data)
    lrs = [step["learning_rate"] for step in metrics.logged]
    assert lrs == pytest.approx([0.0, 0.2, 0.4, 0.3, 0.2, 0.1], abs=1e-9)
    with pytest.raises(ValueError, match="lr_scheduler_type must be None or one of"):
        SFTModule("tiny-llama", lr_scheduler_type="reduce_lr_on_plateau")
    with pytest.raises(ValueError, match="lr_scheduler_kwargs was given without lr_scheduler_type"):
        SFTModule("tiny-llama", lr_scheduler_kwargs={"min_lr_rate": 0.1})


def test_decay_groups_exclude_biases_and_norms():
    model = tiny_model("tiny-qwen2")  # attention biases, RMSNorms, tied embeddings
    decay, plain = decay_parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert any(n.endswith("q_proj.bias") for n in plain_names)
    assert any("layernorm" in n or n.endswith("norm.weight") for n in plain_names)
    assert all(not n.endswith("bias") and "norm" not in n for n in decay_names)
    assert len(plain_names) + len(decay_names) == len(list(model.parameters()))


def test_optimizer_is_built_from_trainable_parameters_only(tok):
    module = SFTModule("tiny-llama", peft_config=LORA, learning_rate=1e-3, weight_decay=0.01)
    module.configure_model()
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    lora = {id(p) for n, p in module.named_parameters() if "lora_" in n}
    assert in_optimizer == lora and lora
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    custom = SFTModule("tiny-llama", optimizer=sgd(0.5))
    custom.configure_model()
    assert isinstance(custom.configure_optimizers()["optimizer"], torch.optim.SGD)


@pytest.mark.parametrize("kwargs, match", [
    ({"logprob_impl": "cuda"}, "logprob_impl"), ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"learning_rate": 0.0}, "learning_rate"), ({"model": 3}, "model must be"),
])
def test_constructor_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLMModule(**{"model": "tiny-llama", **kwargs})


def test_model_is_required():
    with pytest.raises(TypeError, match="model"):
        LLMModule()


# ---------------------------------------------------------------------------------------------------- generate
def test_generate_is_greedy_hf_generate(tok):
    module = LLMModule("tiny-llama")
    conversation = [{"role": "user", "content": "What is 6 plus 9?"}]
    prompts = ["Question: What is 1 plus 8?\nAnswer:", conversation, "Hi"]
    outs = module.generate(prompts, max_new_tokens=5, batch_size=2)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert module.tokenizer.padding_side == "right" and module.model.training
    # each prompt alone through HF generate (no padding at all) gives the same text
    model = tiny_model("tiny-llama").eval()
    for prompt, out in zip(prompts, outs):
        text = prompt if isinstance(prompt, str) else tok.apply_chat_template(prompt, tokenize=False,
                                                                             add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                   do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert out == tok.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------ checkpoint, export, LoRA, local
def short_fit(module, tmp_path, steps=3, **trainer_kwargs):
    data = SFTDataModule(sample_rows("messages", 16), batch_size=4, shuffle=False, max_length=128)
    trainer = quiet_trainer(max_steps=steps, default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module, data)
    return trainer


def eval_logps(module, tok):
    ids, mask, labels = padded_batch(tok)
    model = module.ensure_model().eval()
    with torch.no_grad():
        return module.token_logprobs(model, ids, labels, attention_mask=mask).logps


def test_load_from_checkpoint_round_trip(tok, tmp_path):
    module = SFTModule("tiny-llama", learning_rate=1e-2, loss_type="dft")
    trainer = short_fit(module, tmp_path)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SFTModule.load_from_checkpoint(path)
    assert reloaded.loss_type == "dft" and reloaded.learning_rate == 1e-2
    assert reloaded.num_tokens_seen == module.num_tokens_seen > 0
    trained = eval_logps(module, tok)
    assert not torch.equal(trained, eval_logps(SFTModule("tiny-llama"), tok))  # training changed the model
    assert torch.equal(eval_logps(reloaded, tok), trained)


def test_a_module_of_a_model_object_restores_from_its_checkpoint_alone(tok, tmp_path):
    """A model given as an object is saved as the spec of its architecture: load_from_checkpoint rebuilds it and
    loads the trained weights (not a preset, not random weights), with the tokenizer it was trained with."""
    model = tiny_model("tiny-qwen2")  # not the tiny-llama of the old default
    module = SFTModule(model, tokenizer=tok, learning_rate=1e-2)
    trainer = short_fit(module, tmp_path)
    path = tmp_path / "object.ckpt"
    trainer.save_checkpoint(path)
    assert module.hparams["model"]["config"]["model_type"] == "qwen2"
    reloaded = SFTModule.load_from_checkpoint(path)
    assert type(reloaded.model).__name__ == "Qwen2ForCausalLM"
    assert reloaded.tokenizer.name_or_path == tok.name_or_path
    trained = eval_logps(module, tok)
    assert torch.equal(eval_logps(reloaded, tok), trained)
    assert not torch.equal(eval_logps(SFTModule(tiny_model("tiny-qwen2"), tokenizer=tok), tok), trained)


def test_hf_export_reloads_with_auto_classes(tok, tmp_path):
    export = tmp_path / "export"
    module = SFTModule("tiny-qwen2", learning_rate=1e-2, export_dir=str(export))
    short_fit(module, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    model = module.model.eval()
    ids, mask, _ = padded_batch(tok)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    exported_tok = AutoTokenizer.from_pretrained(export)
    assert exported_tok.chat_template == tok.chat_template and exported_tok.eos_token == tok.eos_token
    # our own loader reads the export back as the very tokenizer the model was trained with
    again = SFTModule(str(export))
    text = "Question: What is 16 plus 29?<|im_end|>"
    assert again.tokenizer(text)["input_ids"] == tok(text)["input_ids"]


def test_lora_trains_only_adapters_and_merged_export_matches(tok, tmp_path):
    export = tmp_path / "merged"
    module = SFTModule("tiny-llama", peft_config=LORA, learning_rate=5e-2, export_dir=str(export))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    short_fit(module, tmp_path)
    assert is_peft_model(module.model)
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    base = {n for n in before if "lora_" not in n}
    assert base and not (base & changed)  # every base weight bit-identical

    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids, mask, _ = padded_batch(tok)
    with torch.no_grad():
        peft_logits = module.model.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, peft_logits,
                                   rtol=1e-5, atol=1e-5)
        base_logits = tiny_model("tiny-llama").eval()(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4)  # the adapters did something
    assert is_peft_model(module.model)  # merging for export left the trained module wrapped

    adapters = tmp_path / "adapters"
    module.export_hf(adapters, merge_adapters=False)
    assert (adapters / "adapter_config.json").is_file() and not (adapters / "config.json").is_file()
    # the adapters of a preset name their base, written beside them, so PEFT loads them offline
    from peft import AutoPeftModelForCausalLM

    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((adapters / "base").resolve())
    reloaded = AutoPeftModelForCausalLM.from_pretrained(adapters).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, peft_logits,
                                   rtol=1e-5, atol=1e-5)


def test_module_from_a_local_save_pretrained_directory(tmp_path):
    source = tiny_model("tiny-gpt2", seed=7)
    source.save_pretrained(tmp_path)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    module = SFTModule(model=str(tmp_path))
    module.configure_model()
    assert type(module.model).__name__ == "GPT2LMHeadModel"
    for (name, p), (_, q) in zip(module.model.named_parameters(), source.named_parameters()):
        assert torch.equal(p, q), name
    assert module.tokenizer.chat_template == tokenizer.chat_template  # the directory's tokenizer, not the preset's
    # and it trains
    trainer = short_fit(module, tmp_path / "run", steps=2, logger=False)
    assert trainer.global_step == 2


def test_a_loaded_model_trains_in_train_mode(tmp_path):
    tiny_model("tiny-gpt2").save_pretrained(tmp_path)  # GPT-2 has dropout 0.1
    tiny_tokenizer().save_pretrained(tmp_path)
    module = SFTModule(model=str(tmp_path))
    module.configure_model()
    modes = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            modes.append(all(m.training for m in pl_module.model.modules()))

    short_fit(module, tmp_path / "run", steps=1, callbacks=[Probe()])
    assert modes == [True]


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    ids, mask, labels = padded_batch(tok)
    grads = []
    for checkpointing in (False, True):
        module = LLMModule("tiny-llama", gradient_checkpointing=checkpointing)
        module.configure_model()
        module.model.train()
        module.token_logprobs(module.model, ids, labels, attention_mask=mask).logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None]))
    assert module.model.is_gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, words", [
    ({"max_tokens": 4}, "unknown setting 'max_tokens'"), ({"max_new_tokens": 0}, "max_new_tokens must be a positive"),
    ({"do_sample": "yes"}, "do_sample must be true or false"), ({"top_p": 1.5}, "top_p must be in"),
    ({"batch_size": 2.5}, "batch_size must be a whole number"),
])
def test_generation_kwargs_are_checked_by_name(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SFTModule("tiny-llama", generation_kwargs=kwargs)


def test_predict_completes_each_prompt_in_order(tok, tmp_path):
    """trainer.predict over predict_data: one record per row, in row order, each the greedy completion generate
    gives; the JSONL writer writes them; a row without a prompt is refused by index before anything runs."""
    from lightning_llm import JsonlPredictionWriter

    rows = sample_rows("prompt_only", 5)
    module = SFTModule("tiny-llama", tokenizer=tok, generation_kwargs={"max_new_tokens": 5})
    data = SFTDataModule(predict_data=rows, tokenizer=tok, val_batch_size=2)
    trainer = quiet_trainer(default_root_dir=tmp_path, callbacks=[JsonlPredictionWriter()])
    records = [r for batch in trainer.predict(module, data) for r in batch]
    expected = module.generate([row["prompt"] for row in rows], max_new_tokens=5)
    assert [r["index"] for r in records] == list(range(5))
    assert [r["completion"] for r in records] == expected
    written = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert written == records
    bad = rows[:2] + [{"question": "no prompt here"}]
    with pytest.raises(ValueError, match=r"predict_data: row 2: no prompt to complete"):
        SFTDataModule(predict_data=bad, tokenizer=tok).setup("predict")


@pytest.mark.parametrize("kwargs, words", [
    ({"weight_decay": -1.0}, "weight_decay must be >= 0"), ({"warmup_steps": -5}, "warmup_steps must be >= 0"),
    ({"peft_config": {"rank": 8}}, r"unknown LoraConfig field 'rank' \(did you mean 'r'\?\)"),
    ({"peft_config": {"r": 8, "lora_alhpa": 16}}, r"'lora_alhpa' \(did you mean 'lora_alpha'"),
])
def test_settings_that_would_fail_at_fit_fail_at_construction(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SFTModule("tiny-llama", **kwargs)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_default_adamw_is_fused_unless_lightning_must_clip_it_under_amp(precision):
    """Fused AdamW by default; under mixed precision with gradient clipping, Lightning's AMP plugin refuses to clip a
    fused optimizer's gradients (RuntimeError at the first step), so the module falls back to the unfused one."""
    module = SFTModule("tiny-llama", learning_rate=1e-3)
    trainer = Trainer(max_steps=2, precision=precision, gradient_clip_val=1.0, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, SFTDataModule("sample:messages", batch_size=4, max_length=64))
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"] is (precision == "32-true")
