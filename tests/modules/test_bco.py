"""BCOModule (TRL 1.16 has no BCO trainer; the reference is the paper and the BCO trainer of TRL <= 0.x, checked by
hand here):

* loss and ``delta`` against a float64 hand computation: ``r = β (log π - log π_ref)``, ``δ`` = running mean of every
  reward seen in training *including the current batch*, not updated in evaluation; desirable ``-log σ(r - δ)``,
  undesirable ``-w log σ(-(r - δ))``, mean over the batch;
* the running moments saved in the checkpoint: a run resumed from it ends where the uninterrupted run ends;
* UDM: the prompt classifier equals an independent Newton (IRLS) fit of the same balanced, L2-regularised logistic
  regression; identical prompt distributions give unit weights whatever the class sizes; the clipped density-ratio
  weights apply to the undesirable examples only;
* learning on the tiny model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import constant_lr, flushed, perturbed_policy_model, quiet_trainer, sample_rows, sgd, sharp_reference_model

from lightning_llm.data.unpaired import UnpairedPreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.bco import BCOModule, fit_prompt_classifier


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


reference_model = sharp_reference_model
policy_model = perturbed_policy_model


def data(tok, rows, batch_size, **kwargs) -> UnpairedPreferenceDataModule:
    dm = UnpairedPreferenceDataModule(rows, tokenizer=tok, batch_size=batch_size, shuffle=False, kl_pairs=False,
                                      **kwargs)
    dm.setup("fit")
    return dm



def sequence_logp(model, prompt_ids, completion_ids) -> float:
    """float64 summed log-prob of the completion, the sequence run alone through the model."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None])[len(prompt_ids) - 1:].sum().item()


def hand_rewards(policy, ref, examples, beta) -> torch.Tensor:
    return torch.tensor([beta * (sequence_logp(policy, ex["prompt_ids"], ex["completion_ids"])
                                 - sequence_logp(ref, ex["prompt_ids"], ex["completion_ids"])) for ex in examples],
                        dtype=torch.float64)


def hand_loss(rewards, labels, delta, weights=None) -> float:
    labels = torch.as_tensor(labels)
    weights = torch.ones_like(rewards) if weights is None else weights.double()
    losses = torch.where(labels, -F.logsigmoid(rewards - delta), -weights * F.logsigmoid(-(rewards - delta)))
    return losses.mean().item()


def test_loss_and_running_delta_match_hand_computation(tok):
    beta = 0.3
    dm = data(tok, sample_rows("unpaired_preference", 12), batch_size=6)
    examples = dm.train_dataset.to_list()
    policy, ref = policy_model(), reference_model()
    module = BCOModule(policy, tokenizer=tok, ref_model=ref, beta=beta)
    module.configure_model()
    module.train()
    first, second = examples[:6], examples[6:]
    r1, r2 = hand_rewards(policy, ref, first, beta), hand_rewards(policy, ref, second, beta)
    labels1, labels2 = [ex["label"] for ex in first], [ex["label"] for ex in second]

    # step 1: δ is the mean of this batch's rewards (the running mean starts empty)
    loss = module.compute_loss(dm.collate(first))
    metrics = flushed(module)
    delta1 = r1.mean().item()
    assert loss.item() == pytest.approx(hand_loss(r1, labels1, delta1), abs=1e-5)
    assert metrics["delta"] == pytest.approx(delta1, abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(r1[torch.tensor(labels1)].mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(r1[~torch.tensor(labels1)].mean().item(), abs=1e-5)

    # step 2: δ is the mean of all twelve rewards seen so far
    loss = module.compute_loss(dm.collate(second))
    delta2 = torch.cat([r1, r2]).mean().item()
    assert loss.item() == pytest.approx(hand_loss(r2, labels2, delta2), abs=1e-5)
    assert flushed(module)["delta"] == pytest.approx(delta2, abs=1e-5)
    assert abs(delta2 - delta1) > 1e-3

    # evaluation reads δ without updating it
    module.eval()
    loss = module.compute_loss(dm.collate(first))
    assert loss.item() == pytest.approx(hand_loss(r1, labels1, delta2), abs=1e-5)
    assert flushed(module, "val")["delta"] == pytest.approx(delta2, abs=1e-5)
    assert module.running.count == pytest.approx(12)


def test_running_moments_resume_from_checkpoint(tok, tmp_path):
    """Three SGD steps uninterrupted, against two steps, a checkpoint, and a resumed third step (8 rows in batches
    of 4: the checkpoint falls at an epoch end, so the third step sees the same batch in both runs; a constant
    learning rate, as the default schedule depends on ``max_steps``)."""
    rows = sample_rows("unpaired_preference", 8)

    def module():
        return BCOModule(policy_model(), tokenizer=tok, beta=0.5, optimizer=sgd(0.5), scheduler=constant_lr)

    straight = module()
    quiet_trainer(max_steps=3).fit(straight, data(tok, rows, 4))

    first = module()
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(first, data(tok, rows, 4))
    path = tmp_path / "bco.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["lightning_llm"]["running_moments"] == pytest.approx(first.running.state_dict())
    assert checkpoint["lightning_llm"]["running_moments"]["count"] == pytest.approx(8)
    assert not any(key.startswith("ref_model.") for key in checkpoint["state_dict"])

    resumed = module()
    quiet_trainer(max_steps=3).fit(resumed, data(tok, rows, 4), ckpt_path=path)
    assert resumed.running.count == pytest.approx(12)
    for key, value in straight.running.state_dict().items():
        assert resumed.running.state_dict()[key] == pytest.approx(value, abs=1e-6), key
    assert straight.running.mean != pytest.approx(first.running.mean, abs=1e-4)  # step 3 moved it


def newton_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: Newton's method (IRLS) on Σ_i c_i BCE(x_i w + b, y_i) + l2/2 |w|² with balanced class
    weights c_i = n / (2 n_class), on inputs standardised by the sample mean and (unbiased) standard deviation."""
    x = (x - x.mean(0)) / x.std(0)
    n, d = x.shape
    c = torch.where(y > 0.5, n / (2 * y.sum()), n / (2 * (n - y.sum())))
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    theta = torch.zeros(d + 1, dtype=x.dtype)
    penalty = torch.diag(torch.cat([torch.full((d,), l2, dtype=x.dtype), torch.zeros(1, dtype=x.dtype)]))
    for _ in range(50):
        p = torch.sigmoid(design @ theta)
        gradient = design.T @ (c * (p - y)) + penalty @ theta
        hessian = design.T @ (design * (c * p * (1 - p))[:, None]) + penalty
        theta = theta - torch.linalg.solve(hessian, gradient)
    return theta[:d], theta[d]


def test_prompt_classifier_matches_newton_reference():
    generator = torch.Generator().manual_seed(0)
    y = torch.cat([torch.ones(30), torch.zeros(15)]).double()
    x = torch.randn(45, 3, generator=generator, dtype=torch.float64) + y[:, None] * torch.tensor([1.0, -0.5, 0.0])
    classifier = fit_prompt_classifier(x, y, l2=1.0)
    weight, bias = newton_logistic(x, y, l2=1.0)
    probe = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    expected = torch.sigmoid(((probe - x.mean(0)) / x.std(0)) @ weight + bias)
    torch.testing.assert_close(classifier(probe).double(), expected, atol=1e-5, rtol=0)


def test_identical_prompt_distributions_give_unit_weights(tok):
    """With prompts that say nothing about the label (constant embeddings), the density ratio is 1, on data with two
    desirable examples for each undesirable one: the class prior must not leak into the weights."""
    rows = sample_rows("unpaired_preference", 9)
    assert sum(row["label"] for row in rows) == 6
    module = BCOModule(policy_model(), tokenizer=tok, ref_model=reference_model(), beta=0.3, optimizer=sgd(1e-9),
                       embedding_func=lambda texts: torch.ones(len(texts), 2))
    dm = data(tok, rows, 9)
    quiet_trainer(max_steps=1).fit(module, dm)
    probability = module.prompt_classifier(torch.ones(4, 2))
    torch.testing.assert_close(probability, torch.full((4,), 0.5), atol=1e-6, rtol=0)


def colour_rows() -> list[dict]:
    """Desirable completions mostly follow 'red' prompts, undesirable ones mostly 'blue' prompts."""
    def row(colour, label, answer):
        return {"prompt": f"Question: is the {colour} ball round?\nAnswer:", "completion": f" {answer}",
                "label": label}

    return [row("red", True, "Yes, it is."), row("red", True, "Yes."), row("red", True, "It is round."),
            row("blue", True, "Yes, round."), row("blue", False, "No."), row("blue", False, "It is square."),
            row("blue", False, "Never."), row("red", False, "No, it is not.")]


def colour_embedding(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[float("red" in t), float("blue" in t)] for t in texts])


def test_udm_weights_are_clipped_density_ratios_on_undesirable_examples(tok):
    beta, low, high = 0.4, 0.5, 2.0
    dm = data(tok, colour_rows(), batch_size=8)
    policy, ref = policy_model(), reference_model()
    module = BCOModule(policy, tokenizer=tok, ref_model=ref, beta=beta, embedding_func=colour_embedding,
                       min_density_ratio=low, max_density_ratio=high, optimizer=sgd(1e-9))
    quiet_trainer(max_steps=1).fit(module, dm)  # fits the prompt classifier, sets δ
    examples = dm.train_dataset.to_list()
    prompts = [tok.decode(ex["prompt_ids"]) for ex in examples]
    p = module.prompt_classifier(colour_embedding(prompts)).double()
    assert bool(((p > 0) & (p < 1)).all())
    is_red = torch.tensor(["red" in t for t in prompts])
    assert bool((p[is_red] > 0.5).all()) and bool((p[~is_red] < 0.5).all())
    ratio = p / (1 - p + 1e-8)
    weights = ratio.clamp(low, high)
    assert bool((ratio[is_red] > high).all()) and bool((ratio[~is_red] < low).all())  # both clips exercised

    module.eval()
    with torch.no_grad():
        loss = module.compute_loss(dm.collate(examples))
    rewards = hand_rewards(module.model, module.ref_model, examples, beta)
    labels = [ex["label"] for ex in examples]
    delta = module.running.mean
    assert loss.item() == pytest.approx(hand_loss(rewards, labels, delta, weights), abs=1e-5)
    # the weights matter, and only on the undesirable side
    assert abs(hand_loss(rewards, labels, delta) - hand_loss(rewards, labels, delta, weights)) > 1e-3
    desirable_only = torch.where(torch.tensor(labels), weights, torch.ones_like(weights))
    assert hand_loss(rewards, labels, delta, desirable_only) == pytest.approx(hand_loss(rewards, labels, delta))


def test_learns(tok):
    """20 AdamW steps at lr 1e-3: desirable rewards rise above undesirable ones."""
    rows = sample_rows("unpaired_preference", 12)
    dm = UnpairedPreferenceDataModule(rows, rows, tokenizer=tok, batch_size=6, kl_pairs=False)
    module = BCOModule(tiny_model("tiny-llama", seed=7), tokenizer=tok, beta=0.5, learning_rate=1e-3)
    before = quiet_trainer().validate(module, dm, verbose=False)[0]
    quiet_trainer(max_steps=20, limit_val_batches=0).fit(module, dm)
    after = quiet_trainer().validate(module, dm, verbose=False)[0]
    assert after["val/rewards/margins"] > before["val/rewards/margins"] + 0.5
    assert after["val/rewards/chosen"] > after["val/rewards/rejected"]
    assert after["val/loss"] < before["val/loss"]
