"""PreferenceModule, the machinery DPO/ORPO/CPO/KTO/BCO share, exercised through DPOModule: completion log-probs
(padded and padding-free) against each sequence scored alone in float64, ``unflatten_tokens`` by hand, the frozen
reference copy, LoRA (adapters disabled as the reference, only adapters trained), precomputed reference log-probs,
padding-free training equal to padded, checkpoints without the reference, and the metric buffer (flushed per
optimizer step with TRL's names, weighted over micro-batches, ``val/`` on validation)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import StepMetrics, constant_lr, flushed, perturb_, quiet_trainer, reference_nll_sum, sample_rows, sgd

from lightning_llm import CPOModule, DPOModule, ORPOModule, PreferenceDataModule
from lightning_llm.data.batches import CompletionBatch
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.models.reference import REF_PREFIX
from lightning_llm.modules.preference import unflatten_tokens

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
PAIR_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"]
TOKEN_METRICS = ["entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"]



@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def policy():
    """``tiny-llama`` moved off the preset by seeded noise, so that it differs from a ``tiny-llama`` reference."""
    return perturb_(tiny_model("tiny-llama"), seed=3, scale=0.05)


def examples_of(rows, tok, **kwargs):
    data = PreferenceDataModule(rows, tokenizer=tok, shuffle=False, **kwargs)
    data.setup("fit")
    return data.train_dataset.to_list()


def batches(rows, tok):
    """The same pairs as a padded and as a padding-free batch (with padding at the end of the flat row)."""
    examples = examples_of(rows, tok)
    padded = PreferenceDataModule(tokenizer=tok).collate(examples)
    flat = PreferenceDataModule(tokenizer=tok, padding_free=True, pad_to_multiple_of=32).collate(examples)
    return examples, padded, flat


def dpo(model, tok, **kwargs) -> DPOModule:
    module = DPOModule(model, tokenizer=tok, **kwargs)
    module.configure_model()
    return module


def alone_logps(model, examples) -> torch.Tensor:
    """``[2B]`` float64 completion log-probs, chosen then rejected, each sequence run alone from the model's logits."""
    out = []
    for column in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = ex["prompt_ids"] + ex[column]
            labels = [-100] * len(ex["prompt_ids"]) + ex[column]
            with torch.no_grad():
                out.append(-reference_nll_sum(model, [ids], [labels]))
    return torch.stack(out)


def test_unflatten_tokens_by_hand():
    # two sequences [a b c | d e] and one pad; value p scores token p + 1
    sequences = CompletionBatch(
        input_ids=torch.zeros((1, 6), dtype=torch.long), completion_mask=torch.ones((1, 6), dtype=torch.long),
        num_sequences=2, seq_index=torch.tensor([[0, 0, 0, 1, 1, -1]]),
        position_ids=torch.tensor([[0, 1, 2, 0, 1, 0]]),
    )
    values = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0]])
    # token b <- 10, c <- 20; d starts sequence 1 (30 dropped); e <- 40; the pad (50) belongs to nobody
    assert unflatten_tokens(values, sequences).tolist() == [[10.0, 20.0], [40.0, 0.0]]


def test_completion_logps_match_each_sequence_alone(tok, policy):
    rows = sample_rows("preference", 4)
    examples, padded, flat = batches(rows, tok)
    module = dpo(policy, tok)
    expected = alone_logps(policy, examples)
    lengths = torch.tensor([len(ex[c]) for c in ("chosen_ids", "rejected_ids") for ex in examples])
    with torch.no_grad():
        a = module.completion_logps(module.model, padded.sequences, return_entropy=True)
        b = module.completion_logps(module.model, flat.sequences, return_entropy=True)
    assert torch.allclose(a.sums.double(), expected, atol=1e-4, rtol=0)
    assert torch.equal(a.lengths, lengths) and torch.equal(b.lengths, lengths)
    # same [R, L] layout either way: column t scores token t + 1 of the sequence
    width = b.mask.shape[1]
    assert torch.equal(a.mask[:, :width], b.mask) and not a.mask[:, width:].any()
    assert torch.allclose(a.completion_token_logps[:, :width], b.completion_token_logps, atol=1e-5, rtol=0)
    entropy_a = torch.where(a.mask, a.outputs.entropy, 0.0)[:, :width]
    assert torch.allclose(entropy_a, torch.where(b.mask, b.outputs.entropy, 0.0), atol=1e-5, rtol=0)
    assert torch.allclose(a.means, a.sums / lengths)


def test_reference_is_a_frozen_copy(tok, policy):
    module = dpo(copy.deepcopy(policy), tok)  # no ref_model: a copy of the initial policy
    ref = module.ref_model
    assert ref is not None and ref is not module.model
    assert all(not p.requires_grad for p in ref.parameters())
    for (name, p), (_, q) in zip(module.model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    module.train()
    assert not ref.training and module.model.training
    trainable = {id(p) for p in module.trainable_parameters()}
    assert not trainable & {id(p) for p in ref.parameters()}
    assert trainable == {id(p) for p in module.model.parameters()}


def test_reference_stays_fixed_while_the_policy_trains(tok, policy):
    rows = sample_rows("preference", 8)
    module = DPOModule(copy.deepcopy(policy), tokenizer=tok, ref_model=tiny_model("tiny-llama"),
                       optimizer=sgd(0.5), scheduler=constant_lr)
    quiet_trainer(max_steps=2).fit(module, PreferenceDataModule(rows, batch_size=4))
    preset = tiny_model("tiny-llama").state_dict()
    assert all(torch.equal(v, preset[k]) for k, v in module.ref_model.state_dict().items())
    assert any(not torch.equal(p, q) for p, q in zip(module.model.parameters(), policy.parameters()))


def test_lora_reference_is_the_policy_without_adapters(tok):
    """Under LoRA: no second model, the adapters alone change, and the reference (adapters disabled) is the preset."""
    rows = sample_rows("preference", 8)
    module = DPOModule("tiny-llama", tokenizer=tok, peft_config=LORA, learning_rate=2e-2)
    steps = StepMetrics()
    quiet_trainer(max_steps=3, callbacks=[steps]).fit(module, PreferenceDataModule(rows, batch_size=4))

    assert module.ref_model is None
    assert sum(type(m).__name__ == "LlamaForCausalLM" for m in module.modules()) == 1
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # every base weight is still the preset's; the adapters moved away from their zero-initialised B
    preset = tiny_model("tiny-llama").state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in module.model.get_base_model().state_dict().items()
            if "lora_" not in k}
    assert base.keys() == preset.keys()
    assert all(torch.equal(v, preset[k]) for k, v in base.items())
    assert any(p.abs().max() > 0 for n, p in module.named_parameters() if "lora_B" in n)

    # the reference forward is the preset's forward, and the trained policy now differs from it
    _, batch, _ = batches(rows[:4], tok)
    module.eval()
    with torch.no_grad():
        ref = module.reference_completion_logps(batch.sequences).sums
        preset_logps = module.completion_logps(tiny_model("tiny-llama"), batch.sequences).sums
        policy_logps = module.completion_logps(module.model, batch.sequences).sums
    assert torch.allclose(ref, preset_logps, atol=1e-5, rtol=0)
    assert (policy_logps - ref).abs().max() > 1e-3

    # at the first step the adapters are zero: policy == reference, so the sigmoid loss is log 2, like full DPO's
    full = dpo("tiny-llama", tok)
    full.train()
    with torch.no_grad():
        full_loss = full.training_step(batches(rows[:4], tok)[1], 0).item()
    assert steps.steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert full_loss == pytest.approx(math.log(2), abs=1e-6)
    assert steps.steps[0]["rewards/margins"] == 0.0


def fit_first_step(policy, tok, rows, val_rows, **kwargs):
    module = DPOModule(copy.deepcopy(policy), tokenizer=tok, ref_model=tiny_model("tiny-llama"), **kwargs)
    data = PreferenceDataModule(rows, val_data=val_rows, batch_size=len(rows), val_batch_size=3, shuffle=False)
    steps = StepMetrics()
    trainer = quiet_trainer(max_steps=1, callbacks=[steps])
    trainer.fit(module, data)
    return module, data, steps.steps[0], {k: float(v) for k, v in trainer.callback_metrics.items()
                                          if k.startswith("val/")}


def test_precomputed_reference_gives_the_live_results(tok, policy):
    rows, val_rows = sample_rows("preference", 6), sample_rows("preference", 14)[6:]
    _, _, live, live_val = fit_first_step(policy, tok, rows, val_rows)
    module, data, pre, pre_val = fit_first_step(policy, tok, rows, val_rows, precompute_ref_log_probs=True,
                                                precompute_ref_batch_size=4)
    assert abs(live["rewards/margins"]) > 1e-4  # the reference matters
    for name in PAIR_METRICS + TOKEN_METRICS:
        assert pre[name] == pytest.approx(live[name], abs=1e-5), name
    assert pre_val.keys() == live_val.keys() and "val/rewards/margins" in pre_val
    for name in pre_val:
        assert pre_val[name] == pytest.approx(live_val[name], abs=1e-5), name
    assert module.ref_model is None  # released once the log-probs are stored
    # the stored values are the reference model's completion log-probs (each sequence alone, float64)
    for dataset in (data.train_dataset, data.val_dataset):
        examples = dataset.to_list()
        expected = alone_logps(tiny_model("tiny-llama"), examples)
        stored = torch.tensor([ex["ref_chosen_logps"] for ex in examples] +
                              [ex["ref_rejected_logps"] for ex in examples], dtype=torch.float64)
        assert torch.allclose(stored, expected, atol=1e-4, rtol=0)


def test_padding_free_equals_padded(tok, policy):
    """Same loss, metrics and gradient on one batch, and the same second step after an SGD update."""
    rows = sample_rows("preference", 4) + sample_rows("preference", 40)[36:]
    _, padded, flat = batches(rows, tok)
    results = []
    for batch in (padded, flat):
        module = dpo(copy.deepcopy(policy), tok, ref_model=tiny_model("tiny-llama"))
        module.train()
        loss = module.training_step(batch, 0)
        loss.backward()
        metrics = flushed(module)
        grads = torch.cat([p.grad.flatten() for p in module.model.parameters()])
        results.append((loss.item(), metrics, grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for name in PAIR_METRICS + TOKEN_METRICS:
        assert metrics_b[name] == pytest.approx(metrics_a[name], abs=1e-5), name
    assert abs(metrics_a["rewards/margins"]) > 1e-4
    assert torch.allclose(grads_b, grads_a, rtol=1e-4, atol=1e-7)

    series = []
    for padding_free in (False, True):
        module = DPOModule(copy.deepcopy(policy), tokenizer=tok, ref_model=tiny_model("tiny-llama"),
                           optimizer=sgd(0.5), scheduler=constant_lr)
        steps = StepMetrics()
        data = PreferenceDataModule(rows, batch_size=4, shuffle=False, padding_free=padding_free)
        quiet_trainer(max_steps=2, callbacks=[steps]).fit(module, data)
        series.append(steps.steps)
    for name in PAIR_METRICS:
        assert series[1][1][name] == pytest.approx(series[0][1][name], abs=1e-5), name
    assert series[0][1]["loss"] != series[0][0]["loss"]  # the update did something


def test_checkpoints_leave_out_the_reference(tok, tmp_path):
    rows = sample_rows("preference", 8)
    module = DPOModule("tiny-llama", tokenizer=tok, optimizer=sgd(0.5), scheduler=constant_lr)
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, PreferenceDataModule(rows, batch_size=4))
    path = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert not [k for k in state if k.startswith(REF_PREFIX)]
    assert any(k.startswith("model.") for k in state)

    restored = DPOModule.load_from_checkpoint(path)
    for (name, p), (_, q) in zip(module.model.named_parameters(), restored.model.named_parameters()):
        assert torch.equal(p, q), name
    preset = tiny_model("tiny-llama").state_dict()  # the reference is rebuilt from its source: the initial model
    assert all(torch.equal(v, preset[k]) for k, v in restored.ref_model.state_dict().items())
    _, batch, _ = batches(rows[:4], tok)
    for m in (module, restored):
        m.eval()
    with torch.no_grad():
        assert restored.compute_loss(batch).item() == pytest.approx(module.compute_loss(batch).item(), abs=1e-6)



def test_checkpoints_of_model_objects_leave_out_the_reference(tok, policy, tmp_path):
    """Policy and reference given as objects: still no reference weight under any name; objects are not
    hyperparameters, so they are given again when loading, and the trained policy weights come back."""
    module = DPOModule(copy.deepcopy(policy), tokenizer=tok, ref_model=tiny_model("tiny-llama"),
                       optimizer=sgd(0.5), scheduler=constant_lr)
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, PreferenceDataModule(sample_rows("preference", 4), batch_size=4))
    path = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert not [k for k in state if k.startswith("ref_model")]
    restored = DPOModule.load_from_checkpoint(path, model=copy.deepcopy(policy), ref_model=tiny_model("tiny-llama"),
                                              tokenizer=tok)
    assert all(torch.equal(p, q) for p, q in zip(restored.model.parameters(), module.model.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(restored.model.parameters(), policy.parameters()))


def test_a_reference_copied_from_a_model_object_must_be_given_again(tok, policy, tmp_path):
    module = DPOModule(copy.deepcopy(policy), tokenizer=tok, optimizer=sgd(0.5), scheduler=constant_lr)
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, PreferenceDataModule(sample_rows("preference", 4), batch_size=4))
    path = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(path)
    words = r"reference \(a frozen copy of the initial policy\) is not saved .* ref_model="
    with pytest.raises(ValueError, match=words):
        DPOModule.load_from_checkpoint(path)
    restored = DPOModule.load_from_checkpoint(path, ref_model=copy.deepcopy(policy))
    assert all(torch.equal(p, q) for p, q in zip(restored.model.parameters(), module.model.parameters()))


@pytest.mark.parametrize("cls", [ORPOModule, CPOModule])
@pytest.mark.parametrize("kwargs", [{"ref_model": "tiny-llama"}, {"precompute_ref_log_probs": True},
                                    {"sync_ref_model": True}, {"ref_model_sync_steps": 8}])
def test_reference_free_modules_refuse_reference_arguments(cls, kwargs):
    with pytest.raises(ValueError, match=rf"{cls.__name__} is reference-free: {next(iter(kwargs))} would not be used"):
        cls("tiny-llama", **kwargs)


def test_sync_ref_model_keeps_the_reference_in_checkpoints(tok):
    module = dpo("tiny-llama", tok, sync_ref_model=True)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert any(k.startswith(REF_PREFIX) for k in checkpoint["state_dict"])


def test_metrics_are_flushed_per_optimizer_step_with_trl_names(tok, policy):
    """With 2 micro-batches per step, the logged metrics are those of the 8 pairs together (pair- or token-weighted,
    as TRL computes them on one batch); validation logs the same names under val/, over the whole validation set."""
    rows, val_rows = sample_rows("preference", 8), sample_rows("preference", 16)[8:]
    whole = dpo(policy, tok, ref_model=tiny_model("tiny-llama"))
    whole.train()
    with torch.no_grad():
        whole.training_step(batches(rows, tok)[1], 0)
        expected = flushed(whole)
        whole.eval()
        whole.validation_step(batches(val_rows, tok)[1], 0)
        expected_val = flushed(whole, "val")

    module = DPOModule(copy.deepcopy(policy), tokenizer=tok, ref_model=tiny_model("tiny-llama"))
    data = PreferenceDataModule(rows, val_data=val_rows, batch_size=4, val_batch_size=3, shuffle=False)
    steps = StepMetrics()
    trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[steps], limit_val_batches=0)
    trainer.fit(module, data)
    assert len(steps.steps) == 1
    logged = steps.steps[0]
    for name in PAIR_METRICS[1:] + TOKEN_METRICS:  # loss: the mean of the micro-batch losses, as in TRL
        assert logged[name] == pytest.approx(expected[name], abs=1e-5), name
    assert logged["num_tokens"] == expected["num_tokens"]
    assert logged["learning_rate"] > 0

    # validation of the untrained policy (3 + 3 + 2 pairs): pair- and token-weighted over the whole set
    module = DPOModule(copy.deepcopy(policy), tokenizer=tok, ref_model=tiny_model("tiny-llama"))
    metrics = quiet_trainer().validate(module, data, verbose=False)[0]
    for name in PAIR_METRICS[1:] + TOKEN_METRICS:
        assert metrics[f"val/{name}"] == pytest.approx(expected_val[name], abs=1e-5), name
    assert not [k for k in metrics if not k.startswith("val/")]
