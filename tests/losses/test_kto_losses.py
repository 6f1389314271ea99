"""KTO: hand-computed values for both loss types, the KL reference point, class weights, the weight-range advice,
validation, and parity with TRL 1.16's ``KTOTrainer._compute_loss`` driven by a stand-in model."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from lightning_llm.losses.kto import KTO_LOSSES, kto_kl_estimate, kto_loss, kto_weight_ranges

POLICY = [-10.0, -22.5, -8.0, -15.0]
REFERENCE = [-11.0, -21.0, -8.5, -13.0]
LABELS = [True, False, True, False]
BETA = 0.5
KL = 0.3


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def run(loss_type="kto", kl=KL, **kwargs):
    return kto_loss(
        torch.tensor(POLICY, dtype=torch.float64),
        torch.tensor(REFERENCE, dtype=torch.float64),
        torch.tensor(LABELS),
        kl,
        beta=BETA,
        loss_type=loss_type,
        **kwargs,
    )


def test_kto_hand_values_with_class_weights():
    out = run(desirable_weight=1.5, undesirable_weight=0.75)
    # log-ratios: 1.0, -1.5, 0.5, -2.0
    expected = [
        1.5 * (1 - sigmoid(BETA * (1.0 - KL))),
        0.75 * (1 - sigmoid(BETA * (KL - -1.5))),
        1.5 * (1 - sigmoid(BETA * (0.5 - KL))),
        0.75 * (1 - sigmoid(BETA * (KL - -2.0))),
    ]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.75, -1.0], dtype=torch.float64))
    assert out.kl.item() == pytest.approx(KL)


def test_apo_zero_unpaired_hand_values():
    out = run("apo_zero_unpaired", kl=None)
    expected = [1 - sigmoid(BETA * 1.0), sigmoid(BETA * -1.5), 1 - sigmoid(BETA * 0.5), sigmoid(BETA * -2.0)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    assert out.kl.item() == 0.0


def test_negative_kl_is_clamped_and_kl_gets_no_gradient():
    kl = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    out = run(kl=kl)
    assert out.kl.item() == 0.0
    torch.testing.assert_close(out.losses, run(kl=0.0).losses)
    assert not out.losses.requires_grad  # nothing but the (constant) KL required grad


def test_gradient_closed_form():
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    kto_loss(
        policy, torch.tensor(REFERENCE, dtype=torch.float64), torch.tensor(LABELS), KL, beta=BETA
    ).losses.sum().backward()
    # desirable: d/dr [1 - σ(β(r - z))] = -β σ'(β(r - z)); undesirable: d/dr [1 - σ(β(z - r))] = +β σ'(β(z - r))
    expected = []
    for p, q, desirable in zip(POLICY, REFERENCE, LABELS, strict=True):
        x = BETA * ((p - q) - KL) if desirable else BETA * (KL - (p - q))
        slope = sigmoid(x) * (1 - sigmoid(x))
        expected.append(-BETA * slope if desirable else BETA * slope)
    torch.testing.assert_close(policy.grad, torch.tensor(expected, dtype=torch.float64))


def test_kl_estimate_is_mean_log_ratio():
    policy_kl = torch.tensor([-5.0, -7.5, -6.0])
    ref_kl = torch.tensor([-5.5, -7.0, -7.0])
    estimate = kto_kl_estimate(policy_kl.requires_grad_(), ref_kl)
    assert estimate.item() == pytest.approx((0.5 - 0.5 + 1.0) / 3)
    assert not estimate.requires_grad


def test_weight_ranges_match_eq_8():
    # 100 desirable, 300 undesirable, unit weights: λ_D n_D / (λ_U n_U) ∈ [1, 4/3] gives λ_D ∈ [3, 3.99] or
    # λ_U ∈ [100/(300·1.33), 1/3] = [0.25, 0.33].
    ranges = kto_weight_ranges(100, 300)
    assert ranges.desirable == (3.0, 3.99)
    assert ranges.undesirable == (0.25, 0.33)
    assert not ranges.contains(1.0, 1.0)
    assert ranges.contains(3.5, 1.0)
    assert ranges.contains(1.0, 0.3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "bco"}, "Unknown `loss_type`.*'kto'"),
        ({"beta": 0.0}, "`beta`"),
        ({"desirable_weight": -1.0}, "`desirable_weight`"),
        ({"kl": None}, "`kl`"),
        ({"kl": torch.zeros(2)}, "scalar"),
        ({"labels": torch.tensor([True, False])}, "`labels`"),
    ],
)
def test_validation_errors(kwargs, message):
    arguments = {
        "policy_logps": torch.zeros(4),
        "ref_logps": torch.zeros(4),
        "labels": torch.tensor(LABELS),
        "kl": 0.1,
    } | kwargs
    with pytest.raises(ValueError, match=message):
        kto_loss(**arguments)


def test_helper_validation_errors():
    with pytest.raises(ValueError, match="same size"):
        kto_kl_estimate(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        kto_kl_estimate(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="`num_desirable`"):
        kto_weight_ranges(-1, 3)


def test_table():
    assert set(KTO_LOSSES) == {"kto", "apo_zero_unpaired"}


# ------------------------------------------------------------------------------------------------------------------
# Parity with TRL: KTOTrainer._compute_loss on a stand-in trainer whose "model" returns fixed per-token log-probs.
# ------------------------------------------------------------------------------------------------------------------

MAIN, MISMATCHED = 1, 2  # token id filling input_ids, so the stand-in model knows which forward it is serving


class _StandInModel:
    training = True

    def __init__(self, log_probs: torch.Tensor, kl_log_probs: torch.Tensor):
        self.log_probs = {MAIN: log_probs, MISMATCHED: kl_log_probs}

    def __call__(self, input_ids, **kwargs):
        log_probs = self.log_probs[int(input_ids[0, 0])]
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


@pytest.mark.parametrize(
    ("loss_type", "desirable_weight", "undesirable_weight", "kl_shift"),
    [("kto", 1.0, 1.0, 0.8), ("kto", 1.33, 0.5, 0.8), ("kto", 1.0, 1.0, -0.8), ("apo_zero_unpaired", 0.7, 1.2, 0.0)],
)
def test_parity_with_trl(loss_type, desirable_weight, undesirable_weight, kl_shift):
    kto_module = pytest.importorskip("trl.trainer.kto_trainer")
    torch.manual_seed(0)
    batch, length, beta = 6, 7, 0.2
    labels = [True, False, False, True, True, False]
    completion_mask = (torch.arange(length) >= torch.tensor([2, 3, 1, 4, 2, 3])[:, None]).long()
    token_logps = -torch.rand(batch, length - 1) * 2 * completion_mask[:, 1:]
    kl_token_logps = -torch.rand(batch, length - 1) * 2 * completion_mask[:, 1:]
    ref_logps = -torch.rand(batch) * 8
    # kl_shift > 0 makes the policy look more confident than the reference on mismatched pairs (positive KL);
    # kl_shift < 0 makes the local estimate negative, to exercise the clamp.
    ref_kl_logps = kl_token_logps.sum(-1) - kl_shift

    model = _StandInModel(token_logps, kl_token_logps)
    identity = lambda x: x  # single process: every gather is the identity
    stand_in = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity),
        calculate_KL=loss_type == "kto",
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    stand_in._compute_kl_logps = types.MethodType(kto_module.KTOTrainer._compute_kl_logps, stand_in)
    inputs = {
        "input_ids": torch.full((batch, length), MAIN),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "KL_input_ids": torch.full((batch, length), MISMATCHED),
        "KL_attention_mask": torch.ones(batch, length, dtype=torch.long),
        "KL_completion_mask": completion_mask,
        "label": torch.tensor(labels),
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    trl_loss = kto_module.KTOTrainer._compute_loss(stand_in, model, inputs, False)
    metrics = stand_in._metrics["train"]

    kl = kto_kl_estimate(kl_token_logps.sum(-1), ref_kl_logps) if loss_type == "kto" else None
    out = kto_loss(
        token_logps.sum(-1),
        ref_logps,
        torch.tensor(labels),
        kl,
        beta=beta,
        loss_type=loss_type,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    assert out.losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6, rel=1e-6)
    assert out.kl.item() == pytest.approx(metrics["kl"][0], abs=1e-6)
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-6)
    assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-6)
    if kl_shift < 0:
        assert out.kl.item() == 0.0 and kl.item() < 0
