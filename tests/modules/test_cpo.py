"""CPOModule: CPO/SimPO/AlphaPO losses against a float64 hand computation from the model's own logits, padding-free
equal to padded (loss and gradients), no reference model, argument checks, and learning on the tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import flushed, quiet_trainer, sample_rows

from lightning_llm.data.preference import PreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.cpo import CPOModule


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    dm = PreferenceDataModule(sample_rows("preference_standard", 6), tokenizer=tok)
    dm.setup("fit")
    return dm.train_dataset.to_list()


def sharp_model(seed: int = 5) -> torch.nn.Module:
    model = tiny_model("tiny-llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model



def completion_token_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """float64 log-probs of the completion tokens, the sequence run alone through the model."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
    token_logp = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return token_logp[len(prompt_ids) - 1:]


def hand_cpo(model, examples, *, loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, cpo_alpha=1.0):
    average = loss_type in ("ipo", "simpo", "alphapo")
    chosen, rejected, nll_sum, nll_count = [], [], 0.0, 0
    for ex in examples:
        c = completion_token_logps(model, ex["prompt_ids"], ex["chosen_ids"])
        r = completion_token_logps(model, ex["prompt_ids"], ex["rejected_ids"])
        chosen.append(c.mean() if average else c.sum())
        rejected.append(r.mean() if average else r.sum())
        nll_sum, nll_count = nll_sum - c.sum().item(), nll_count + c.numel()
    logps_chosen, logps_rejected = torch.stack(chosen), torch.stack(rejected)
    chosen, rejected = logps_chosen, logps_rejected
    if alpha:  # AlphaPO's reward (1 - P^-alpha) / alpha, P = exp(log-prob)
        chosen, rejected = (1 - torch.exp(chosen) ** -alpha) / alpha, (1 - torch.exp(rejected) ** -alpha) / alpha
    z = beta * (chosen - rejected)
    if loss_type in ("simpo", "alphapo"):
        z = z - simpo_gamma
    if loss_type == "hinge":
        losses = torch.clamp(1 - z, min=0)
    elif loss_type == "ipo":
        losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    nll = nll_sum / nll_count
    weight = 0.0 if loss_type == "alphapo" else cpo_alpha
    return {
        "loss": losses.mean().item() + weight * nll,
        "nll_loss": nll,
        "rewards/chosen": beta * chosen.mean().item(),
        "rewards/rejected": beta * rejected.mean().item(),
        "rewards/margins": beta * (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).double().mean().item(),
        "logps/chosen": logps_chosen.mean().item(),
        "logps/rejected": logps_rejected.mean().item(),
    }


CASES = [
    {"loss_type": "sigmoid", "beta": 0.2, "label_smoothing": 0.1, "cpo_alpha": 0.5},
    {"loss_type": "hinge", "beta": 0.1},
    {"loss_type": "ipo", "beta": 0.5, "cpo_alpha": 0.0},
    {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.4, "label_smoothing": 0.05},
    {"loss_type": "alphapo", "beta": 2.0, "simpo_gamma": 0.2, "alpha": 0.25},
]


@pytest.mark.parametrize("config", CASES, ids=[c["loss_type"] for c in CASES])
def test_loss_and_metrics_match_hand_computation(tok, examples, config):
    module = CPOModule(sharp_model(), tokenizer=tok, **config)
    module.configure_model()
    loss = module.compute_loss(PreferenceDataModule(tokenizer=tok).collate(examples))
    metrics = flushed(module)
    expected = hand_cpo(module.model, examples, **config)
    assert loss.item() == pytest.approx(expected["loss"], abs=1e-5)
    for name, value in expected.items():
        if name != "loss":
            assert metrics[name] == pytest.approx(value, abs=1e-5), name


def test_padding_free_equals_padded(tok, examples):
    grads, losses = [], []
    for padding_free in (False, True):
        dm = PreferenceDataModule(tokenizer=tok, padding_free=padding_free)
        module = CPOModule(sharp_model(), tokenizer=tok, loss_type="simpo", beta=2.0, cpo_alpha=0.3)
        module.configure_model()
        batch = dm.collate(examples)
        assert batch.sequences.padding_free == padding_free
        loss = module.compute_loss(batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in module.model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    assert grads[0].abs().max() > 0


def test_no_reference_model(tok):
    module = CPOModule(sharp_model(), tokenizer=tok)
    module.configure_model()
    assert module.ref_model is None
    assert not any(key.startswith("ref_model.") for key in module.state_dict())


@pytest.mark.parametrize("kwargs, word", [
    ({"loss_type": "kto_pair"}, "loss_type"),
    ({"label_smoothing": 0.6}, "label_smoothing"),
    ({"cpo_alpha": -0.1}, "cpo_alpha"),
    ({"beta": 0.0}, "beta"),
])
def test_bad_arguments(tok, kwargs, word):
    with pytest.raises(ValueError, match=word):
        CPOModule("tiny-llama", tokenizer=tok, **kwargs)


def test_simpo_learns(tok):
    """SimPO, 20 AdamW steps at lr 1e-3: the validation loss falls and the reward margin rises."""
    rows = sample_rows("preference_standard", 8)
    dm = PreferenceDataModule(rows, rows, tokenizer=tok, batch_size=8)
    module = CPOModule(tiny_model("tiny-llama", seed=7), tokenizer=tok, loss_type="simpo", beta=2.0,
                       simpo_gamma=0.5, cpo_alpha=0.0, learning_rate=1e-3)
    before = quiet_trainer().validate(module, dm, verbose=False)[0]
    quiet_trainer(max_steps=20, limit_val_batches=0).fit(module, dm)
    after = quiet_trainer().validate(module, dm, verbose=False)[0]
    assert after["val/loss"] < before["val/loss"] - 0.1
    assert after["val/rewards/margins"] > before["val/rewards/margins"] + 0.2
    assert after["val/rewards/accuracies"] >= 0.75
