"""DPO family: every loss type against float64 arithmetic written out here, helpers against hand-worked examples,
argument validation, and parity with TRL 1.16's ``DPOTrainer._compute_loss`` driven by a stand-in model."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from lightning_llm.losses.dpo import DPO_LOSSES, dpo_loss, dpo_sft_loss, ld_dpo_logps, wpo_weights

# Three pairs, chosen so every log-ratio and margin differs in sign and size.
CHOSEN = [-12.5, -30.0, -7.25]
REJECTED = [-14.0, -26.5, -9.0]
REF_CHOSEN = [-13.0, -28.0, -7.0]
REF_REJECTED = [-13.5, -27.0, -10.5]
CHOSEN_LEN = [5, 12, 3]
REJECTED_LEN = [6, 10, 4]
BETA = 0.5
EPS = 0.1  # label smoothing
TAU = 0.05
SFT = 1.375


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pair_terms(i: int) -> tuple[float, float, float]:
    rho_w = CHOSEN[i] - REF_CHOSEN[i]
    rho_l = REJECTED[i] - REF_REJECTED[i]
    return rho_w, rho_l, rho_w - rho_l


def expected_pair_loss(name: str, i: int) -> float:
    """The per-pair formulas of TRL 1.16 / the papers, in float64 scalars."""
    rho_w, rho_l, delta = pair_terms(i)
    z = BETA * delta
    if name == "sigmoid":
        return -log_sigmoid(z)
    if name == "hinge":
        return max(0.0, 1.0 - z)
    if name == "ipo":
        per_token = rho_w / CHOSEN_LEN[i] - rho_l / REJECTED_LEN[i]
        return (per_token - 1.0 / (2 * BETA)) ** 2
    if name == "sigmoid_norm":
        per_token = rho_w / CHOSEN_LEN[i] - rho_l / REJECTED_LEN[i]
        return -log_sigmoid(BETA * per_token)
    if name == "exo_pair":
        q_w, q_l = sigmoid(z), sigmoid(-z)
        return q_w * (math.log(q_w) - math.log(1 - EPS)) + q_l * (math.log(q_l) - math.log(EPS))
    if name == "nca_pair":
        return -log_sigmoid(BETA * rho_w) - 0.5 * log_sigmoid(-BETA * rho_w) - 0.5 * log_sigmoid(-BETA * rho_l)
    if name == "robust":
        return (-(1 - EPS) * log_sigmoid(z) + EPS * log_sigmoid(-z)) / (1 - 2 * EPS)
    if name == "bco_pair":
        return -log_sigmoid(BETA * rho_w) - log_sigmoid(-BETA * rho_l)
    if name == "sppo_hard":
        return (rho_w - 1 / (2 * BETA)) ** 2 + (rho_l + 1 / (2 * BETA)) ** 2
    if name == "apo_zero":
        return (1 - sigmoid(BETA * rho_w)) + sigmoid(BETA * rho_l)
    if name == "apo_down":
        return sigmoid(BETA * rho_w) + (1 - sigmoid(BETA * (rho_w - rho_l)))
    if name == "discopop":
        mix = sigmoid(z / TAU)
        return (1 - mix) * -log_sigmoid(z) + mix * math.exp(-z)
    if name == "sft":
        return SFT
    raise KeyError(name)


def expected_aot(name: str) -> list[float]:
    if name == "aot":
        policy = sorted(c - r for c, r in zip(CHOSEN, REJECTED))
        reference = sorted(c - r for c, r in zip(REF_CHOSEN, REF_REJECTED))
    else:
        policy = sorted(c - r for c, r in zip(CHOSEN, REF_CHOSEN))
        reference = sorted(c - r for c, r in zip(REJECTED, REF_REJECTED))
    d = [BETA * (p - q) for p, q in zip(policy, reference)]
    return [-(1 - EPS) * log_sigmoid(x) - EPS * log_sigmoid(-x) for x in d]


def run(loss_type, dtype=torch.float64, **kwargs):
    tensor = lambda values: torch.tensor(values, dtype=dtype)
    defaults = {
        "beta": BETA,
        "loss_type": loss_type,
        "label_smoothing": EPS,
        "discopop_tau": TAU,
        "chosen_lengths": torch.tensor(CHOSEN_LEN),
        "rejected_lengths": torch.tensor(REJECTED_LEN),
        "sft_loss": torch.tensor(SFT, dtype=dtype),
    }
    defaults.update(kwargs)
    return dpo_loss(tensor(CHOSEN), tensor(REJECTED), tensor(REF_CHOSEN), tensor(REF_REJECTED), **defaults)


def test_table_holds_every_trl_loss_type():
    assert set(DPO_LOSSES) == {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
        "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    }  # fmt: skip


@pytest.mark.parametrize("loss_type", sorted(set(DPO_LOSSES) - {"aot", "aot_unpaired"}))
def test_each_loss_type_matches_hand_formula(loss_type):
    out = run(loss_type)
    expected = [expected_pair_loss(loss_type, i) for i in range(3)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_sorts_across_the_batch(loss_type):
    out = run(loss_type)
    torch.testing.assert_close(out.losses, torch.tensor(expected_aot(loss_type), dtype=torch.float64))


def test_worked_sigmoid_example():
    # Pair 0: log-ratios 0.5 and -0.5, so Δ = 1 and with β = 0.5 the loss is -log σ(0.5) = log(1 + e^-0.5).
    out = run("sigmoid")
    assert out.losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-12)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.25, -1.0, -0.125], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.25, 0.25, 0.75], dtype=torch.float64))
    margins = out.chosen_rewards - out.rejected_rewards
    torch.testing.assert_close(margins, torch.tensor([0.5, -1.25, -0.875], dtype=torch.float64))
    torch.testing.assert_close((out.chosen_rewards > out.rejected_rewards).float(), torch.tensor([1.0, 0.0, 0.0]))
    assert not out.chosen_rewards.requires_grad


def test_weighted_mixture_and_pair_weights():
    weights = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    out = run(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], weights=weights)
    expected = [
        weights[i].item()
        * (
            0.8 * expected_pair_loss("sigmoid", i)
            + 0.2 * expected_pair_loss("bco_pair", i)
            + 1.0 * expected_pair_loss("sft", i)
        )
        for i in range(3)
    ]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("divergence", "alpha", "score"),
    [
        ("forward_kl", 0.5, lambda rho: 1 - math.exp(-rho)),
        ("js_divergence", 0.5, lambda rho: math.log(2) + log_sigmoid(rho)),
        ("alpha_divergence", 0.5, lambda rho: (math.exp(-0.5 * rho) - 1) / -0.5),
        ("alpha_divergence", 0.25, lambda rho: (math.exp(-0.75 * rho) - 1) / -0.75),
        ("alpha_divergence", 1.0, lambda rho: rho),
    ],
)
def test_f_divergence_scores(divergence, alpha, score):
    out = run("sigmoid", f_divergence_type=divergence, f_alpha_divergence_coef=alpha)
    expected = []
    for i in range(3):
        rho_w, rho_l, _ = pair_terms(i)
        expected.append(-log_sigmoid(BETA * (score(rho_w) - score(rho_l))))
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    # Rewards stay β · log-ratio whatever the divergence.
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.25, -1.0, -0.125], dtype=torch.float64))


def test_sigmoid_gradient_closed_form():
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    out = dpo_loss(chosen, rejected, torch.tensor(REF_CHOSEN).double(), torch.tensor(REF_REJECTED).double(), beta=BETA)
    out.losses.mean().backward()
    # d/dπ_w [-log σ(βΔ)] = -β σ(-βΔ); the mean divides by B; the rejected gradient is the negative.
    expected = torch.tensor([-BETA * sigmoid(-BETA * pair_terms(i)[2]) / 3 for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


def test_hinge_gradient_vanishes_past_the_margin():
    chosen = torch.tensor([-1.0, -1.0], requires_grad=True)
    out = dpo_loss(chosen, torch.tensor([-6.0, -1.5]), torch.zeros(2), torch.zeros(2), beta=0.5, loss_type="hinge")
    out.losses.sum().backward()
    # Δ = 5 gives β Δ = 2.5 > 1 (flat); Δ = 0.5 gives 0.25 < 1 (slope -β).
    torch.testing.assert_close(chosen.grad, torch.tensor([0.0, -0.5]))


def test_bf16_inputs_are_computed_in_float32():
    out = run("sigmoid", dtype=torch.bfloat16)
    assert out.losses.dtype == torch.float32
    rounded = [torch.tensor(v, dtype=torch.bfloat16).item() for v in (CHOSEN + REJECTED + REF_CHOSEN + REF_REJECTED)]
    assert rounded == CHOSEN + REJECTED + REF_CHOSEN + REF_REJECTED  # the inputs are exact in bf16
    torch.testing.assert_close(out.losses, torch.tensor([expected_pair_loss("sigmoid", i) for i in range(3)]))


def test_ld_dpo_logps_hand_example():
    # Pair 0: prompt of 2 tokens, chosen completion of 2 tokens, rejected of 4: shared length 2.
    token_logps = torch.tensor(
        [
            [-9.0, -9.0, -0.5, -1.0, -7.0, -7.0],  # chosen row: last two are padding
            [-9.0, -9.0, -0.25, -2.0, -3.0, -4.0],  # rejected row
        ]
    )
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    out = ld_dpo_logps(token_logps, mask, ld_alpha=0.25)
    torch.testing.assert_close(out, torch.tensor([-1.5, -2.25 + 0.25 * -7.0]))
    torch.testing.assert_close(ld_dpo_logps(token_logps, mask, 1.0), torch.tensor([-1.5, -9.25]))
    torch.testing.assert_close(ld_dpo_logps(token_logps, mask, 0.0), torch.tensor([-1.5, -2.25]))


def test_wpo_weights_hand_example():
    token_logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -0.4, -9.0], [-3.0, -1.0, -1.0], [-0.7, -0.3, -0.5]])
    log_sum_sq = torch.tensor([[-0.5, -0.25, -1.0], [-0.1, -0.3, -5.0], [-1.0, -1.0, -0.5], [-0.2, -0.2, -0.2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 1, 1]])
    # Rows are [chosen 0, chosen 1, rejected 0, rejected 1]. Masked row means of (logp - log Σp²):
    # (-0.5 - 0.25)/2, (-0.1 - 0.1 - 4.0)/3, (-0.5 + 0.0)/2, (-0.5 - 0.1 - 0.3)/3.
    chosen = [math.exp(-0.375), math.exp(-1.4)]
    rejected = [math.exp(-0.25), math.exp(-0.3)]
    weights = wpo_weights(token_logps.requires_grad_(), log_sum_sq, mask)
    torch.testing.assert_close(weights, torch.tensor([chosen[0] * rejected[0], chosen[1] * rejected[1]]))
    assert not weights.requires_grad


def test_dpo_sft_loss_is_token_mean():
    token_logps = torch.tensor([[-5.0, -1.0, -2.0], [-5.0, -5.0, -0.5]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert dpo_sft_loss(token_logps, mask).item() == pytest.approx(3.5 / 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "dpo"}, "Unknown `loss_type`.*'sigmoid'"),
        ({"loss_type": []}, "at least one"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, "one weight per"),
        ({"loss_type": "sigmoid", "beta": 0.0}, "`beta`"),
        ({"loss_type": "sigmoid", "label_smoothing": 1.0}, "`label_smoothing`"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "'robust'"),
        ({"loss_type": "exo_pair", "label_smoothing": 0.0}, "'exo_pair'"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "`discopop_tau`"),
        ({"loss_type": "sigmoid", "f_divergence_type": "kl"}, "Unknown `f_divergence_type`"),
        ({"loss_type": ["sigmoid", "bco_pair"], "f_divergence_type": "js_divergence"}, "bco_pair"),
        ({"loss_type": "ipo", "chosen_lengths": None}, "`chosen_lengths`"),
        ({"loss_type": "sft", "sft_loss": None}, "`sft_loss`"),
        ({"loss_type": "sft", "sft_loss": torch.ones(2)}, "scalar"),
        ({"loss_type": "aot", "weights": torch.ones(3)}, "`weights`"),
        ({"loss_type": "sigmoid", "weights": torch.ones(2)}, "`weights` must have the shape"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(**kwargs)


def test_helper_validation_errors():
    with pytest.raises(ValueError, match="`ld_alpha`"):
        ld_dpo_logps(torch.zeros(2, 3), torch.ones(2, 3), 1.5)
    with pytest.raises(ValueError, match="even number"):
        ld_dpo_logps(torch.zeros(3, 3), torch.ones(3, 3), 0.5)
    with pytest.raises(ValueError, match="\\[2B, T\\]"):
        wpo_weights(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="no completion token"):
        dpo_sft_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1))


# ------------------------------------------------------------------------------------------------------------------
# Parity with TRL: DPOTrainer._compute_loss run on a stand-in trainer whose "model" returns fixed per-token log-probs.
# ------------------------------------------------------------------------------------------------------------------


class _StandInModel:
    training = True

    def __init__(self, log_probs: torch.Tensor, log_sum_sq_probs: torch.Tensor):
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return types.SimpleNamespace(
            log_probs=self.log_probs,
            log_sum_sq_probs=self.log_sum_sq_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
        )


def _trl_dpo_loss(token_logps, log_sum_sq, completion_mask, ref_chosen, ref_rejected, **settings):
    trainer_module = pytest.importorskip("trl.trainer.dpo_trainer")
    model = _StandInModel(token_logps, log_sum_sq)
    identity = lambda x: x  # single process: every gather is the identity
    stand_in = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=settings.get("ld_alpha"),
        f_divergence_type=settings.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=settings.get("f_alpha_divergence_coef", 0.5),
        loss_types=settings["loss_type"],
        loss_weights=settings.get("loss_weights") or [1.0] * len(settings["loss_type"]),
        beta=settings["beta"],
        label_smoothing=settings.get("label_smoothing", 0.0),
        use_weighting=settings.get("use_weighting", False),
        args=types.SimpleNamespace(discopop_tau=settings.get("discopop_tau", 0.05)),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    n_rows, length = completion_mask.shape
    inputs = {
        "input_ids": torch.zeros(n_rows, length, dtype=torch.long),
        "attention_mask": torch.ones(n_rows, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trainer_module.DPOTrainer._compute_loss(stand_in, model, inputs, False)
    return loss, stand_in._metrics["train"]


def _ours(token_logps, log_sum_sq, completion_mask, ref_chosen, ref_rejected, **settings):
    shifted_mask = completion_mask[:, 1:]
    if settings.get("ld_alpha") is None:
        logps = (token_logps * shifted_mask).sum(dim=1)
    else:
        logps = ld_dpo_logps(token_logps, shifted_mask, settings["ld_alpha"])
    chosen, rejected = logps.chunk(2)
    chosen_lengths, rejected_lengths = shifted_mask.sum(dim=1).chunk(2)
    batch = chosen.shape[0]
    out = dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=settings["beta"],
        loss_type=settings["loss_type"],
        loss_weights=settings.get("loss_weights"),
        label_smoothing=settings.get("label_smoothing", 0.0),
        f_divergence_type=settings.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=settings.get("f_alpha_divergence_coef", 0.5),
        discopop_tau=settings.get("discopop_tau", 0.05),
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        sft_loss=dpo_sft_loss(token_logps[:batch], shifted_mask[:batch]),
        weights=wpo_weights(token_logps, log_sum_sq, shifted_mask) if settings.get("use_weighting") else None,
    )
    return out, chosen, rejected


TRL_CASES = [{"loss_type": [name]} for name in sorted(DPO_LOSSES)] + [
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["ipo"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["hinge", "sigmoid_norm"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": ["sigmoid"], "ld_alpha": 0.4},
    {"loss_type": ["sigmoid", "ipo"], "use_weighting": True},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
]


@pytest.mark.parametrize("settings", TRL_CASES, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_parity_with_trl(settings):
    settings = dict(beta=0.3, label_smoothing=0.15, **settings)
    torch.manual_seed(0)
    batch, length = 4, 9
    prompt_lengths = torch.tensor([2, 3, 1, 4, 3, 2, 2, 5])
    completion_lengths = torch.tensor([5, 2, 7, 3, 4, 6, 1, 3])
    position = torch.arange(length)
    completion_mask = (
        (position >= prompt_lengths[:, None]) & (position < (prompt_lengths + completion_lengths)[:, None])
    ).long()  # [2B, L]
    # What the fused LM head gives: log-probs at completion positions, 0 where the label is ignored.
    token_logps = -torch.rand(2 * batch, length - 1) * 3 * completion_mask[:, 1:]
    log_sum_sq = -torch.rand(2 * batch, length - 1) * 2
    ref_chosen, ref_rejected = -torch.rand(batch) * 12, -torch.rand(batch) * 12

    trl_loss, trl_metrics = _trl_dpo_loss(
        token_logps, log_sum_sq, completion_mask, ref_chosen, ref_rejected, **settings
    )
    out, chosen, rejected = _ours(token_logps, log_sum_sq, completion_mask, ref_chosen, ref_rejected, **settings)

    assert out.losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6, rel=1e-6)
    assert out.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"][0], abs=1e-6)
    assert out.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"][0], abs=1e-6)
    margins = out.chosen_rewards - out.rejected_rewards
    assert margins.mean().item() == pytest.approx(trl_metrics["rewards/margins"][0], abs=1e-6)
    assert (margins > 0).float().mean().item() == pytest.approx(trl_metrics["rewards/accuracies"][0], abs=1e-6)
    assert chosen.mean().item() == pytest.approx(trl_metrics["logps/chosen"][0], abs=1e-5)
    assert rejected.mean().item() == pytest.approx(trl_metrics["logps/rejected"][0], abs=1e-5)
