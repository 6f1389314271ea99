"""linear_token_loss (gradients computed in the forward) against float64 autograd through full logits."""

from __future__ import annotations

import pytest
import torch
from logprob_reference import reference_outputs, rel_err
from test_linear_logprobs import make_inputs as head_inputs

from lightning_llm.kernels import triton_runs_on
from lightning_llm.ops import linear_logprobs, linear_token_loss

IMPLS = ["chunked", "eager"] + (["triton"] if triton_runs_on(torch.device("cpu")) else [])

CASES = {
    "plain": dict(shape=(13,), vocab=37, hidden=16, chunk_size=64),
    "3d-ignored-bias-chunks": dict(shape=(3, 7), vocab=61, hidden=24, bias=True, ignore_frac=0.3, chunk_size=4),
    "transform-chunks": dict(
        shape=(2, 9), vocab=53, hidden=12, temperature=0.7, softcap=5.0, logit_scale=1.5, chunk_size=5
    ),
}


def nll(logps, entropy, weight):
    return -weight * logps


def dft(logps, entropy):
    return -logps.detach().exp() * logps


def entropy_bonus(logps, entropy, weight):
    return -weight * logps - 0.3 * entropy


def clipped_objective(logps, entropy, advantages, old_logps):
    # GRPO/PPO's per-token clipped surrogate, epsilon 0.2, with constants known before the forward
    ratio = torch.exp(logps - old_logps)
    return -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)


LOSSES = {
    "nll": (nll, False),
    "dft": (dft, False),
    "entropy_bonus": (entropy_bonus, True),
    "clipped_objective": (clipped_objective, False),
}


def make_inputs(case: dict, seed: int, dtype: torch.dtype = torch.float32):
    """The head inputs of test_linear_logprobs' make_inputs, plus per-token constants for the losses."""
    hidden, weight, bias, targets, _, _ = head_inputs(case, dtype=dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    shape = case["shape"]
    inputs = {
        "weight": torch.rand(shape, generator=generator) + 0.5,
        "advantages": torch.randn(shape, generator=generator),
        # old log-probs near the current ones so some ratios fall inside the clip range and some outside
        "old_logps": reference_outputs(hidden, weight, targets, bias=bias, **options(case))["logps"].float()
        + 0.4 * torch.randn(shape, generator=generator),
    }
    return hidden, weight, bias, targets, inputs


def options(case: dict) -> dict:
    return {k: case[k] for k in ("temperature", "logit_scale", "softcap") if k in case}


def inputs_for(fn, inputs: dict) -> dict:
    names = fn.__code__.co_varnames[2 : fn.__code__.co_argcount]
    return {name: inputs[name] for name in names}


def reference(fn, hidden, weight, bias, targets, inputs, case):
    """Loss and float64 gradients through full logits (the per-token loss evaluated in float64)."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = reference_outputs(leaves[0], leaves[1], targets, bias=leaves[2] if bias is not None else None,
                            **options(case))
    valid = targets != -100
    per_token = fn(out["logps"], out["entropy"], **{k: v.double() for k, v in inputs.items()})
    loss = torch.where(valid, per_token, 0.0).sum()
    return loss, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("case_name", list(CASES))
def test_loss_and_gradients_match_float64(impl: str, loss_name: str, case_name: str) -> None:
    case = CASES[case_name]
    fn, with_entropy = LOSSES[loss_name]
    hidden, weight, bias, targets, all_inputs = make_inputs(case, seed=len(case_name) + len(loss_name))
    inputs = inputs_for(fn, all_inputs)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = linear_token_loss(
        hidden, weight, targets, fn, token_inputs=inputs, bias=bias, return_entropy=with_entropy,
        return_is_top1=True, chunk_size=case["chunk_size"], impl=impl, **options(case),
    )
    expected_loss, expected_grads = reference(fn, hidden, weight, bias, targets, inputs, case)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert abs(out.loss.item() - expected_loss.item()) <= 1e-5 * max(1.0, abs(expected_loss.item()))

    # The upstream gradient of the scalar scales every gradient
    got = torch.autograd.grad(out.loss * 0.37, leaves)
    for actual, want in zip(got, expected_grads):
        assert actual.dtype == torch.float32
        assert rel_err(actual, want * 0.37) <= 1e-4

    per_token = reference_outputs(hidden.detach(), weight.detach(), targets, bias=bias, **options(case))
    assert rel_err(out.logps, per_token["logps"]) <= 1e-5 and not out.logps.requires_grad
    assert torch.equal(out.is_top1, per_token["is_top1"])
    if with_entropy:
        assert rel_err(out.entropy, per_token["entropy"]) <= 1e-5
    else:
        assert out.entropy is None


@pytest.mark.skipif("triton" not in IMPLS, reason="Triton cannot run here")
@pytest.mark.parametrize("loss_name", ["nll", "entropy_bonus"])
def test_triton_fused_gemm_matches_float64(loss_name: str) -> None:
    from lightning_llm.kernels.linear_logprobs import TileConfig

    case = CASES["3d-ignored-bias-chunks"]
    fn, with_entropy = LOSSES[loss_name]
    hidden, weight, bias, targets, all_inputs = make_inputs(case, seed=21)
    inputs = inputs_for(fn, all_inputs)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    out = linear_token_loss(hidden, weight, targets, fn, token_inputs=inputs, bias=bias, return_entropy=with_entropy,
                            chunk_size=4, impl="triton", tiles=TileConfig(fused_gemm=True))
    expected_loss, expected_grads = reference(fn, hidden, weight, bias, targets, inputs, case)
    assert abs(out.loss.item() - expected_loss.item()) <= 1e-5 * abs(expected_loss.item())
    for actual, want in zip(torch.autograd.grad(out.loss, leaves), expected_grads):
        assert rel_err(actual, want) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_same_gradients_as_differentiating_linear_logprobs(impl: str) -> None:
    # The fused gradient equals the one linear_logprobs' recomputing backward gives for the same loss
    case = CASES["3d-ignored-bias-chunks"]
    hidden, weight, bias, targets, inputs = make_inputs(case, seed=11)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    fused = linear_token_loss(hidden, weight, targets, nll, token_inputs={"weight": inputs["weight"]}, bias=bias,
                              chunk_size=4, impl=impl)
    fused_grads = torch.autograd.grad(fused.loss, leaves)
    plain = linear_logprobs(hidden, weight, targets, bias=bias, chunk_size=4, impl=impl)
    plain_grads = torch.autograd.grad((-inputs["weight"] * plain.logps).sum(), leaves)
    for a, b in zip(fused_grads, plain_grads):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs_within_bf16_tolerance(impl: str) -> None:
    case = CASES["3d-ignored-bias-chunks"]
    hidden, weight, bias, targets, inputs = make_inputs(case, seed=3, dtype=torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = linear_token_loss(hidden, weight, targets, nll, token_inputs={"weight": inputs["weight"]}, bias=bias,
                            chunk_size=4, impl=impl)
    expected_loss, expected_grads = reference(nll, hidden, weight, bias, targets, {"weight": inputs["weight"]}, case)
    grad_hidden, grad_weight = torch.autograd.grad(out.loss, (hidden, weight))
    assert grad_hidden.dtype == torch.bfloat16 and grad_weight.dtype == torch.bfloat16
    assert abs(out.loss.item() - expected_loss.item()) <= 1e-2 * abs(expected_loss.item())
    assert rel_err(grad_hidden, expected_grads[0]) <= 2e-2
    assert rel_err(grad_weight, expected_grads[1]) <= 2e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_and_no_grad(impl: str) -> None:
    case = CASES["plain"]
    hidden, weight, _, targets, inputs = make_inputs(case, seed=4)
    hidden.requires_grad_()
    out = linear_token_loss(hidden, weight, targets, nll, token_inputs={"weight": inputs["weight"]}, impl=impl)
    (grad_hidden,) = torch.autograd.grad(out.loss, hidden)
    _, expected = reference(nll, hidden, weight, None, targets, {"weight": inputs["weight"]}, case)
    assert weight.grad is None and rel_err(grad_hidden, expected[0]) <= 1e-4
    with torch.no_grad():
        evaluated = linear_token_loss(hidden, weight, targets, nll, token_inputs={"weight": inputs["weight"]},
                                      impl=impl)
    assert not evaluated.loss.requires_grad
    assert evaluated.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_all_targets_ignored() -> None:
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(19, 8, requires_grad=True)
    out = linear_token_loss(hidden, weight, torch.full((2, 3), -100), lambda lp, ent: -lp, impl="chunked")
    assert out.loss.item() == 0.0 and torch.equal(out.logps, torch.zeros(2, 3))
    out.loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_backward_twice_raises() -> None:
    hidden = torch.randn(5, 8, requires_grad=True)
    out = linear_token_loss(hidden, torch.randn(11, 8), torch.randint(0, 11, (5,)), lambda lp, ent: -lp)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated twice"):
        out.loss.backward()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(token_loss=lambda lp, ent: -lp.sum()), "one floating-point loss per token"),
        (dict(token_loss=lambda lp, ent, w: -w * lp, token_inputs={"w": torch.ones(4)}), r"token_inputs\['w'\]"),
        (
            dict(token_loss=lambda lp, ent, w: -w * lp, token_inputs={"w": torch.ones(5, requires_grad=True)}),
            "requires grad",
        ),
        (dict(token_loss="nll"), "token_loss must be callable"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    hidden = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        linear_token_loss(hidden, torch.randn(11, 8), torch.randint(0, 11, (5,)), **kwargs)
