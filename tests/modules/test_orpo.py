"""ORPOModule: the loss and every logged metric against a float64 hand computation from the model's own logits (NLL
over the whole chosen sequence, or the completion only), no reference model, and learning on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import flushed, quiet_trainer, sample_rows

from lightning_llm.data.preference import PreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.orpo import ORPOModule


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def sharp_model(seed: int = 3) -> torch.nn.Module:
    model = tiny_model("tiny-llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model



def per_sequence(model, prompt_ids, completion_ids):
    """float64 logits and target log-probs of one sequence run alone (no padding): row ``t`` predicts token ``t+1``."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
    logp = logits.log_softmax(-1)
    targets = ids[0, 1:]
    return logits, logp, logp.gather(-1, targets[:, None])[:, 0], targets


def hand_orpo(model, examples, beta, nll_on_prompt):
    chosen_avg, rejected_avg = [], []
    nll_sum, nll_count = 0.0, 0
    logits_sum, logits_count, top1, entropy_sum, entropy_count = 0.0, 0, 0, 0.0, 0
    for ex in examples:
        first = len(ex["prompt_ids"]) - 1  # row predicting the first completion token
        for side, averages in (("chosen", chosen_avg), ("rejected", rejected_avg)):
            logits, logp, token_logp, targets = per_sequence(model, ex["prompt_ids"], ex[f"{side}_ids"])
            averages.append(token_logp[first:].mean())
            probs = logp.exp()
            entropy = -(probs * logp).sum(-1)[first:]
            entropy_sum, entropy_count = entropy_sum + entropy.sum().item(), entropy_count + entropy.numel()
            if side == "chosen":
                scored = token_logp if nll_on_prompt else token_logp[first:]
                nll_sum, nll_count = nll_sum - scored.sum().item(), nll_count + scored.numel()
                logits_sum += logits[first:].mean(-1).sum().item()
                logits_count += logits[first:].shape[0]
                top1 += (logits[first:].argmax(-1) == targets[first:]).sum().item()
    chosen, rejected = torch.stack(chosen_avg), torch.stack(rejected_avg)
    log_odds = (chosen - torch.log(-torch.expm1(chosen))) - (rejected - torch.log(-torch.expm1(rejected)))
    ratio = F.logsigmoid(log_odds)
    nll = nll_sum / nll_count
    return {
        "loss": nll - beta * ratio.mean().item(),
        "nll_loss": nll,
        "log_odds_ratio": ratio.mean().item(),
        "log_odds_chosen": log_odds.mean().item(),
        "rewards/chosen": beta * chosen.mean().item(),
        "rewards/rejected": beta * rejected.mean().item(),
        "rewards/margins": beta * (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).double().mean().item(),
        "logps/chosen": chosen.mean().item(),
        "logps/rejected": rejected.mean().item(),
        "logits/chosen": logits_sum / logits_count,
        "mean_token_accuracy": top1 / logits_count,
        "entropy": entropy_sum / entropy_count,
    }


@pytest.mark.parametrize("nll_on_prompt", [True, False])
def test_loss_and_metrics_match_hand_computation(tok, nll_on_prompt):
    rows = sample_rows("preference_standard", 6)
    dm = PreferenceDataModule(rows, tokenizer=tok)
    dm.setup("fit")
    examples = dm.train_dataset.to_list()
    module = ORPOModule(sharp_model(), tokenizer=tok, beta=0.4, nll_on_prompt=nll_on_prompt)
    module.configure_model()
    loss = module.compute_loss(dm.collate(examples))
    metrics = flushed(module)
    expected = hand_orpo(module.model, examples, beta=0.4, nll_on_prompt=nll_on_prompt)
    assert loss.item() == pytest.approx(expected["loss"], abs=1e-5)
    for name, value in expected.items():
        if name != "loss":
            assert metrics[name] == pytest.approx(value, abs=1e-5), name
    assert 0.0 < expected["rewards/accuracies"] < 1.0


def test_nll_on_prompt_is_the_whole_chosen_sequence(tok):
    """With the prompt in the NLL term its value moves towards the prompt tokens' NLL: the two settings differ."""
    rows = sample_rows("preference_standard", 4)
    dm = PreferenceDataModule(rows, tokenizer=tok)
    dm.setup("fit")
    batch = dm.collate(dm.train_dataset.to_list())
    values = {}
    for flag in (True, False):
        module = ORPOModule(sharp_model(), tokenizer=tok, nll_on_prompt=flag)
        module.configure_model()
        module.compute_loss(batch)
        values[flag] = flushed(module)["nll_loss"]
    assert not math.isclose(values[True], values[False], rel_tol=1e-3)


def test_no_reference_model(tok):
    module = ORPOModule(sharp_model(), tokenizer=tok)
    module.configure_model()
    assert module.ref_model is None
    assert not any(key.startswith("ref_model.") for key in module.state_dict())
    assert sum(p.numel() for p in module.trainable_parameters()) == sum(p.numel() for p in module.model.parameters())


def test_learns(tok):
    """20 AdamW steps at lr 1e-3: the validation loss falls and the reward margin and log-odds ratio rise."""
    rows = sample_rows("preference_standard", 8)
    dm = PreferenceDataModule(rows, rows, tokenizer=tok, batch_size=8)
    module = ORPOModule(tiny_model("tiny-llama", seed=7), tokenizer=tok, beta=1.0, learning_rate=1e-3)
    before = quiet_trainer().validate(module, dm, verbose=False)[0]
    quiet_trainer(max_steps=20, limit_val_batches=0).fit(module, dm)
    after = quiet_trainer().validate(module, dm, verbose=False)[0]
    assert after["val/loss"] < before["val/loss"] - 1.0
    assert after["val/rewards/margins"] > before["val/rewards/margins"] + 0.05
    assert after["val/log_odds_ratio"] > before["val/log_odds_ratio"]
    assert after["val/rewards/accuracies"] >= 0.75
