"""DPOModule: the loss against a float64 hand computation from each sequence scored alone, learning on the tiny
preset (loss falls, reward margin and accuracy rise), LD-DPO with precomputed reference log-probs, and the argument
checks that must fail before training starts. (TRL parity per loss type: tests/parity/test_trl_dpo.py; the shared
reference / LoRA / padding-free / checkpoint machinery: tests/modules/test_preference_base.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import StepMetrics, flushed, perturb_, quiet_trainer, reference_nll_sum, sample_rows

from lightning_llm import DPOModule, PreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def policy():
    return perturb_(tiny_model("tiny-llama"), seed=11, scale=0.05)


def examples_and_batch(rows, tok):
    data = PreferenceDataModule(rows, tokenizer=tok, shuffle=False)
    data.setup("fit")
    return data.train_dataset.to_list(), data.collate(data.train_dataset.to_list())


def alone(model, examples, column: str) -> torch.Tensor:
    """``[B]`` float64 completion log-probs of ``column``, each sequence run alone."""
    out = []
    for ex in examples:
        labels = [-100] * len(ex["prompt_ids"]) + ex[column]
        with torch.no_grad():
            out.append(-reference_nll_sum(model, [ex["prompt_ids"] + ex[column]], [labels]))
    return torch.stack(out)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_by_hand(tok, policy, loss_type):
    rows = sample_rows("preference", 5)
    examples, batch = examples_and_batch(rows, tok)
    reference, beta = tiny_model("tiny-llama"), 0.2
    module = DPOModule(policy, tokenizer=tok, ref_model=reference, beta=beta, loss_type=loss_type)
    module.configure_model()
    module.train()
    with torch.no_grad():
        loss = module.training_step(batch, 0).item()
    metrics = flushed(module)

    chosen = alone(policy, examples, "chosen_ids") - alone(reference, examples, "chosen_ids")
    rejected = alone(policy, examples, "rejected_ids") - alone(reference, examples, "rejected_ids")
    if loss_type == "sigmoid":
        expected = -F.logsigmoid(beta * (chosen - rejected)).mean()
    else:  # IPO on per-token log-ratios: ((ρ_w/|y_w| - ρ_l/|y_l|) - 1/(2β))²
        n_w = torch.tensor([len(ex["chosen_ids"]) for ex in examples], dtype=torch.float64)
        n_l = torch.tensor([len(ex["rejected_ids"]) for ex in examples], dtype=torch.float64)
        expected = ((chosen / n_w - rejected / n_l - 1 / (2 * beta)) ** 2).mean()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx((beta * chosen).mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx((beta * rejected).mean().item(), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx((beta * (chosen - rejected)).mean().item(), abs=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx((chosen > rejected).double().mean().item())
    assert metrics["logps/chosen"] == pytest.approx(alone(policy, examples, "chosen_ids").mean().item(), abs=1e-4)
    assert abs(metrics["rewards/margins"]) > 1e-4


@pytest.mark.slow
def test_learns_on_the_tiny_preset(tok):
    """25 AdamW steps at lr 1e-3 on 8 pairs: the loss falls, the reward margin and accuracy rise."""
    torch.manual_seed(0)
    module = DPOModule("tiny-llama", tokenizer=tok, learning_rate=1e-3, beta=0.1)
    steps = StepMetrics()
    quiet_trainer(max_steps=25, callbacks=[steps]).fit(
        module, PreferenceDataModule(sample_rows("preference", 8), batch_size=8))
    loss, margins = steps.series("loss"), steps.series("rewards/margins")
    accuracies = steps.series("rewards/accuracies")
    assert margins[0] == 0.0 and loss[0] == pytest.approx(0.6931, abs=1e-4)  # policy == reference at step 1
    assert sum(loss[-3:]) / 3 < loss[0] - 0.2
    assert sum(margins[-3:]) / 3 > 0.8
    assert accuracies[-1] == 1.0
    assert steps.series("rewards/chosen")[-1] > steps.series("rewards/rejected")[-1]


def test_ld_alpha_with_precomputed_reference(tok, policy):
    """The precomputed reference log-probs use LD-DPO's length-desensitised sum too, so the loss is the live one."""
    user = [{"role": "user", "content": "Name a color."}]
    rows = sample_rows("preference", 3) + [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "I would rather not name any color today, sorry."}]}]
    examples, batch = examples_and_batch(rows, tok)
    live = DPOModule(policy, tokenizer=tok, ref_model=tiny_model("tiny-llama"), ld_alpha=0.3)
    live.configure_model()
    live.eval()
    data = PreferenceDataModule(rows, tokenizer=tok, batch_size=2)
    data.setup("fit")
    with torch.no_grad():
        loss_live = live.compute_loss(batch).item()
        live.precompute_reference(data)
        stored = data.train_dataset.to_list()
        assert all(ex["ref_chosen_logps"] is not None for ex in stored)
        loss_pre = live.compute_loss(data.collate(stored)).item()
        plain = DPOModule(policy, tokenizer=tok, ref_model=tiny_model("tiny-llama"))
        plain.configure_model()
        loss_plain = plain.compute_loss(batch).item()
    assert loss_pre == pytest.approx(loss_live, abs=1e-6)
    assert abs(loss_live - loss_plain) > 1e-5  # the long rejected tail is down-weighted: a different loss


@pytest.mark.parametrize("kwargs,words", [
    ({"loss_type": "nope"}, "Unknown `loss_type`"),
    ({"loss_type": []}, "at least one"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
    ({"f_divergence_type": "kl"}, "f_divergence_type"),
    ({"loss_type": "nca_pair", "f_divergence_type": "forward_kl"}, "only applies"),
    ({"loss_type": "exo_pair"}, "label_smoothing"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
    ({"loss_type": "aot", "use_weighting": True}, "use_weighting"),
    ({"ld_alpha": 1.5}, "ld_alpha"),
    ({"beta": 0.0}, "beta"),
])
def test_bad_arguments_fail_at_construction(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DPOModule("tiny-llama", **kwargs)
