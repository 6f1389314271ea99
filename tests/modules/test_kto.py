"""KTOModule: the loss and KL reference point against a float64 hand computation, precomputed reference log-probs
equal to the live reference over several steps, the class-imbalance warning with the recommended weights, the
KL-pair and batch-size checks, and learning on the tiny model."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import StepMetrics, flushed, perturbed_policy_model, quiet_trainer, sample_rows, sgd, sharp_reference_model

from lightning_llm.data.unpaired import UnpairedPreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.kto import KTOModule


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


reference_model = sharp_reference_model
policy_model = perturbed_policy_model


def data(tok, rows, batch_size, **kwargs) -> UnpairedPreferenceDataModule:
    dm = UnpairedPreferenceDataModule(rows, tokenizer=tok, batch_size=batch_size, shuffle=False, **kwargs)
    dm.setup("fit")
    return dm



def sequence_logp(model, prompt_ids, completion_ids) -> float:
    """float64 summed log-prob of the completion, the sequence run alone through the model."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None])[len(prompt_ids) - 1:].sum().item()


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_loss_matches_hand_computation(tok, loss_type):
    """KTO (Ethayarajh et al., Eq. 7) in float64: r = log π - log π_ref; z0 = max(0, mean over the mismatched pairs of
    log π - log π_ref); desirable λ_D (1 - σ(β(r - z0))), undesirable λ_U (1 - σ(β(z0 - r))); APO-zero unpaired:
    λ_D (1 - σ(βr)), λ_U σ(βr)."""
    beta, w_d, w_u = 0.4, 1.2, 0.8
    dm = data(tok, sample_rows("unpaired_preference", 6), batch_size=6)
    examples = dm.train_dataset.to_list()
    policy, ref = policy_model(), reference_model()
    module = KTOModule(policy, tokenizer=tok, ref_model=ref, beta=beta, loss_type=loss_type, desirable_weight=w_d,
                       undesirable_weight=w_u)
    module.configure_model()
    loss = module.compute_loss(dm.collate(examples))
    metrics = flushed(module)

    def logratio(ex, key):
        return sequence_logp(policy, ex["prompt_ids"], ex[key]) - sequence_logp(ref, ex["prompt_ids"], ex[key])

    r = torch.tensor([logratio(ex, "completion_ids") for ex in examples], dtype=torch.float64)
    desirable = torch.tensor([ex["label"] for ex in examples])
    z0 = max(0.0, sum(logratio(ex, "kl_completion_ids") for ex in examples) / len(examples))
    if loss_type == "kto":
        losses = torch.where(desirable, w_d * (1 - torch.sigmoid(beta * (r - z0))),
                             w_u * (1 - torch.sigmoid(beta * (z0 - r))))
    else:
        z0 = 0.0
        losses = torch.where(desirable, w_d * (1 - torch.sigmoid(beta * r)), w_u * torch.sigmoid(beta * r))
    assert loss.item() == pytest.approx(losses.mean().item(), abs=1e-5)
    assert metrics["kl"] == pytest.approx(z0, abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(beta * r[desirable].mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(beta * r[~desirable].mean().item(), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(
        beta * (r[desirable].mean() - r[~desirable].mean()).item(), abs=1e-5)
    if loss_type == "kto":
        assert z0 > 0.1  # the KL term is really exercised


def test_precomputed_reference_gives_the_live_losses(tok):
    """Three SGD steps with the default reference (a frozen copy of the initial policy), once live and once from
    log-probs precomputed before training: the same loss at every step, and the copy released."""
    rows = sample_rows("unpaired_preference", 12)
    series = {}
    for precompute in (False, True):
        module = KTOModule(policy_model(), tokenizer=tok, beta=0.5, precompute_ref_log_probs=precompute,
                           optimizer=sgd(0.5))
        steps = StepMetrics()
        dm = UnpairedPreferenceDataModule(rows, tokenizer=tok, batch_size=4, shuffle=False)
        quiet_trainer(max_steps=3, callbacks=[steps]).fit(module, dm)
        series[precompute] = (steps.series("loss"), steps.series("kl"), steps.series("rewards/chosen"))
        if precompute:
            assert module.ref_model is None
            assert all("ref_logps" in ex and "ref_kl_logps" in ex for ex in dm.train_dataset.to_list())
        else:
            assert module.ref_model is not None
    for live, cached in zip(series[False], series[True]):
        assert cached == pytest.approx(live, abs=1e-5)
    _losses, _kls, rewards = series[False]
    assert rewards[0] == pytest.approx(0.0, abs=1e-6)  # the reference is the initial policy
    assert max(abs(r) for r in rewards[1:]) > 1e-3  # later steps do compare against the reference


def test_imbalance_warning_gives_the_recommended_weights(tok, caplog):
    """Eq. 8 of the KTO paper: 1 <= λ_D n_D / (λ_U n_U) <= 4/3; with n_D = 2 n_U and unit weights that is
    λ_D in [n_U/n_D, 1.33 n_U/n_D] or λ_U in [n_D/(1.33 n_U), n_D/n_U]."""
    rows = sample_rows("unpaired_preference", 9)
    n_d = sum(row["label"] for row in rows)
    n_u = len(rows) - n_d
    assert n_d == 2 * n_u
    expected_d = f"[{n_u / n_d:.2f}, {round(1.33 * n_u / n_d, 2):.2f}]"
    expected_u = f"[{round(n_d / n_u / 1.33, 2):.2f}, {n_d / n_u:.2f}]"

    def warnings_for(**weights):
        caplog.clear()
        module = KTOModule(tiny_model("tiny-llama"), tokenizer=tok, **weights)
        dm = UnpairedPreferenceDataModule(rows, tokenizer=tok, batch_size=3)
        with caplog.at_level(logging.WARNING, logger="lightning_llm.modules.kto"):
            quiet_trainer(max_steps=1).fit(module, dm)
        return [r.getMessage() for r in caplog.records if r.name == "lightning_llm.modules.kto"]

    messages = warnings_for()
    assert len(messages) == 1
    assert f"{n_d} desirable and {n_u} undesirable" in messages[0]
    assert expected_d in messages[0] and expected_u in messages[0]
    assert expected_d == "[0.50, 0.67]" and expected_u == "[1.50, 2.00]"
    assert warnings_for(undesirable_weight=1.8) == []  # in range: no warning
    assert warnings_for(desirable_weight=0.6) == []


def test_kto_needs_kl_pairs_and_batches_over_one(tok):
    rows = sample_rows("unpaired_preference", 6)
    module = KTOModule(tiny_model("tiny-llama"), tokenizer=tok)
    with pytest.raises(ValueError, match="kl_pairs=True"):
        quiet_trainer(max_steps=1).fit(module, UnpairedPreferenceDataModule(rows, tokenizer=tok, batch_size=3,
                                                                            kl_pairs=False))
    module = KTOModule(tiny_model("tiny-llama"), tokenizer=tok)
    with pytest.raises(ValueError, match="batch_size > 1"):
        quiet_trainer(max_steps=1).fit(module, UnpairedPreferenceDataModule(rows, tokenizer=tok, batch_size=1))
    # APO-zero has no KL term: neither is needed
    module = KTOModule(tiny_model("tiny-llama"), tokenizer=tok, loss_type="apo_zero_unpaired")
    quiet_trainer(max_steps=1).fit(module, UnpairedPreferenceDataModule(rows, tokenizer=tok, batch_size=1,
                                                                        kl_pairs=False))
    assert module.trainer.global_step == 1


@pytest.mark.slow
def test_learns(tok):
    """20 AdamW steps at lr 1e-3: desirable rewards rise above undesirable ones and the loss falls."""
    rows = sample_rows("unpaired_preference", 12)
    dm = UnpairedPreferenceDataModule(rows, rows, tokenizer=tok, batch_size=6)
    module = KTOModule(tiny_model("tiny-llama", seed=7), tokenizer=tok, beta=0.5, learning_rate=1e-3,
                       undesirable_weight=2.0)
    before = quiet_trainer().validate(module, dm, verbose=False)[0]
    quiet_trainer(max_steps=20, limit_val_batches=0).fit(module, dm)
    after = quiet_trainer().validate(module, dm, verbose=False)[0]
    assert after["val/loss"] < before["val/loss"] - 0.05
    assert after["val/rewards/margins"] > before["val/rewards/margins"] + 0.5
    assert after["val/rewards/chosen"] > after["val/rewards/rejected"]


def test_data_of_one_class_is_refused_before_training():
    from lightning_llm import UnpairedPreferenceDataModule

    rows = [dict(row, label=True) for row in sample_rows("unpaired_preference", 8)]
    module = KTOModule("tiny-llama")
    with pytest.raises(ValueError, match=r"the training data has 8 desirable \(label true\) and 0 undesirable"):
        quiet_trainer(max_steps=1).fit(module, UnpairedPreferenceDataModule(rows, batch_size=4))
