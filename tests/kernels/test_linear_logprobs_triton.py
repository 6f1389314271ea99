"""The Triton log-prob path end to end (values and gradients) against the float64 full-logits reference."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from logprob_reference import reference_grads, reference_outputs, rel_err  # noqa: E402
from triton_device import DEVICE, requires_triton  # noqa: E402

from lightning_llm.kernels.linear_logprobs import TileConfig, TritonLinearLogProbs, default_token_rows  # noqa: E402
from lightning_llm.kernels.logit_transform import LogitTransform  # noqa: E402
from lightning_llm.ops import linear_logprobs  # noqa: E402

pytestmark = requires_triton

ALL = (True, True, True, True)
OUTPUTS = ("logps", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")

# (rows, vocab, hidden, options, token_rows, tiles): odd sizes, partial tiles and partial blocks everywhere
CASES = {
    "one-tile": (11, 37, 16, {}, 64, TileConfig(vocab_chunk=64, block=16)),
    "vocab-chunks": (13, 53, 12, dict(temperature=0.7), 64, TileConfig(vocab_chunk=16, block=8)),
    "token-chunks": (17, 45, 8, dict(softcap=4.0, logit_scale=1.6), 5, TileConfig(vocab_chunk=20, block=8)),
    "bias-everything": (
        9, 61, 20, dict(temperature=1.3, softcap=6.0, logit_scale=0.9), 4, TileConfig(vocab_chunk=24, block=16),
    ),
}


def make_inputs(rows, vocab, width, seed, dtype=torch.float32, with_bias=False):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) / width**0.25
    bias = torch.randn(vocab, generator=generator) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    grad_logps = torch.randn(rows, generator=generator)
    grad_entropy = torch.randn(rows, generator=generator)
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), targets, grad_logps, grad_entropy


def apply(hidden, weight, bias, targets, options, token_rows, tiles, want=ALL):
    transform = LogitTransform(**options)
    on_device = [t.to(DEVICE).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    outputs = TritonLinearLogProbs.apply(
        *on_device[:2], on_device[2], targets.to(DEVICE), transform, hidden.dtype, token_rows, want, tiles
    )
    return on_device, outputs


@pytest.mark.parametrize("fused", [False, True], ids=["tiles", "fused_gemm"])
@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_match_float64(name: str, fused: bool) -> None:
    rows, vocab, width, options, token_rows, tiles = CASES[name]
    tiles = replace(tiles, fused_gemm=fused)
    hidden, weight, bias, targets, grad_logps, grad_entropy = make_inputs(
        rows, vocab, width, seed=len(name), with_bias=name.startswith("bias")
    )
    leaves, outputs = apply(hidden, weight, bias, targets, options, token_rows, tiles)
    expected = reference_outputs(hidden, weight, targets, bias=bias, **options)
    for key, value in zip(OUTPUTS, outputs):
        if key == "is_top1":
            assert torch.equal(value.cpu(), expected[key])
        else:
            assert value.dtype == torch.float32 and rel_err(value.cpu(), expected[key]) <= 1e-5, key

    logps, entropy = outputs[:2]
    objective = (logps * grad_logps.to(DEVICE)).sum() + (entropy * grad_entropy.to(DEVICE)).sum()
    got = torch.autograd.grad(objective, [t for t in leaves if t is not None])
    want = reference_grads(hidden, weight, targets, grad_logps, grad_entropy, bias=bias, **options)
    for actual, reference in zip(got, [w for w in want if w is not None]):
        assert actual.dtype == torch.float32
        assert rel_err(actual.cpu(), reference) <= 1e-4


@pytest.mark.parametrize("fused", [False, True], ids=["tiles", "fused_gemm"])
@pytest.mark.parametrize("upstream", ["logps", "entropy"])
def test_single_upstream_gradient(upstream: str, fused: bool) -> None:
    rows, vocab, width, options, token_rows, tiles = CASES["token-chunks"]
    tiles = replace(tiles, fused_gemm=fused)
    hidden, weight, _, targets, grad_logps, grad_entropy = make_inputs(rows, vocab, width, seed=5)
    want = (upstream == "entropy", False, False, False)
    leaves, outputs = apply(hidden, weight, None, targets, options, token_rows, tiles, want)
    upstream_grad = grad_logps if upstream == "logps" else grad_entropy
    value = outputs[0] if upstream == "logps" else outputs[1]
    got = torch.autograd.grad((value * upstream_grad.to(DEVICE)).sum(), leaves[:2])
    reference = reference_grads(
        hidden,
        weight,
        targets,
        grad_logps if upstream == "logps" else None,
        grad_entropy if upstream == "entropy" else None,
        **options,
    )
    assert rel_err(got[0].cpu(), reference[0]) <= 1e-4
    assert rel_err(got[1].cpu(), reference[1]) <= 1e-4


@pytest.mark.parametrize("fused", [False, True], ids=["tiles", "fused_gemm"])
@pytest.mark.parametrize("token_rows", [3, 64])
def test_bf16_inputs_and_narrow_gradient_tiles(token_rows: int, fused: bool) -> None:
    # grad_dtype=bf16 exercises the in-place narrow write even where matmuls run in fp32 (CPU)
    rows, vocab, width = 10, 43, 16
    hidden, weight, bias, targets, grad_logps, grad_entropy = make_inputs(
        rows, vocab, width, seed=6, dtype=torch.bfloat16, with_bias=True
    )
    tiles = TileConfig(vocab_chunk=16, block=8, grad_dtype=torch.bfloat16, fused_gemm=fused)
    options = dict(softcap=5.0)
    leaves, outputs = apply(hidden, weight, bias, targets, options, token_rows, tiles)
    expected = reference_outputs(hidden, weight, targets, bias=bias, **options)
    assert rel_err(outputs[0].cpu(), expected["logps"]) <= 1e-2
    assert rel_err(outputs[1].cpu(), expected["entropy"]) <= 1e-2
    objective = (outputs[0] * grad_logps.to(DEVICE)).sum() + (outputs[1] * grad_entropy.to(DEVICE)).sum()
    got = torch.autograd.grad(objective, leaves)
    want = reference_grads(hidden, weight, targets, grad_logps, grad_entropy, bias=bias, **options)
    for actual, reference in zip(got, want):
        assert actual.dtype == torch.bfloat16
        assert rel_err(actual.cpu(), reference) <= 2e-2


def test_bf16_logits_tiles() -> None:
    rows, vocab, width = 12, 41, 16
    hidden, weight, _, targets, grad_logps, grad_entropy = make_inputs(rows, vocab, width, seed=9,
                                                                        dtype=torch.bfloat16)
    tiles = TileConfig(vocab_chunk=16, block=8, logits_dtype=torch.bfloat16)
    leaves, outputs = apply(hidden, weight, None, targets, dict(temperature=0.8), 5, tiles)
    expected = reference_outputs(hidden, weight, targets, temperature=0.8)
    for key, value in zip(OUTPUTS, outputs):
        if key != "is_top1":
            assert rel_err(value.cpu(), expected[key]) <= 1e-2, key
    objective = (outputs[0] * grad_logps.to(DEVICE)).sum() + (outputs[1] * grad_entropy.to(DEVICE)).sum()
    got = torch.autograd.grad(objective, leaves[:2])
    want = reference_grads(hidden, weight, targets, grad_logps, grad_entropy, temperature=0.8)
    assert rel_err(got[0].cpu(), want[0]) <= 2e-2
    assert rel_err(got[1].cpu(), want[1]) <= 2e-2


@pytest.mark.parametrize("fused", [False, True], ids=["tiles", "fused_gemm"])
def test_dispatch_through_linear_logprobs_with_ignored_tokens(fused: bool) -> None:
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 5, 12, generator=generator)
    weight = torch.randn(47, 12, generator=generator) / 12**0.25
    targets = torch.randint(0, 47, (3, 5), generator=generator)
    targets[0, :2] = -100
    targets[2, 4] = -100
    hidden_d = hidden.to(DEVICE).requires_grad_()
    weight_d = weight.to(DEVICE).requires_grad_()
    kwargs = dict(temperature=0.9, return_entropy=True, return_is_top1=True, return_mean_logits=True,
                  return_log_sum_sq_probs=True)
    out = linear_logprobs(hidden_d, weight_d, targets.to(DEVICE), impl="triton", chunk_size=4,
                          tiles=TileConfig(vocab_chunk=16, fused_gemm=fused), **kwargs)
    chunked = linear_logprobs(hidden.requires_grad_(), weight.requires_grad_(), targets, impl="chunked", **kwargs)
    expected = reference_outputs(hidden.detach(), weight.detach(), targets, temperature=0.9)
    for key in OUTPUTS:
        value = getattr(out, key).cpu()
        assert value.shape == (3, 5)
        if key == "is_top1":
            assert torch.equal(value, expected[key]) and torch.equal(value, chunked.is_top1)
        else:
            assert rel_err(value, expected[key]) <= 1e-5 and rel_err(value, getattr(chunked, key)) <= 1e-5, key
    assert torch.all(out.logps.cpu()[targets == -100] == 0)

    upstream = torch.randn(3, 5, generator=generator)
    grads = torch.autograd.grad((out.logps * upstream.to(DEVICE)).sum(), (hidden_d, weight_d))
    grads_chunked = torch.autograd.grad((chunked.logps * upstream).sum(), (hidden, weight))
    assert rel_err(grads[0].cpu(), grads_chunked[0]) <= 1e-4
    assert rel_err(grads[1].cpu(), grads_chunked[1]) <= 1e-4
    assert torch.all(grads[0].cpu()[targets == -100] == 0)


def test_tiles_are_refused_off_the_triton_path() -> None:
    with pytest.raises(ValueError, match="configures the Triton path"):
        linear_logprobs(torch.randn(3, 8), torch.randn(11, 8), torch.zeros(3, dtype=torch.long), impl="chunked",
                        tiles=TileConfig(fused_gemm=True))


def test_default_token_rows() -> None:
    assert default_token_rows(100) == 100
    assert default_token_rows(10**6, vocab_chunk=4096, budget=1 << 25) == 8192
    assert default_token_rows(0) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True], ids=["tiles", "fused_gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_at_a_realistic_vocab(dtype: torch.dtype, fused: bool) -> None:
    torch.manual_seed(8)
    rows, vocab, width = 1000, 32_011, 256
    hidden = torch.randn(rows, width, device="cuda").to(dtype)
    weight = (torch.randn(vocab, width, device="cuda") / width**0.25).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    targets[::7] = -100
    hidden.requires_grad_()
    weight.requires_grad_()
    out = linear_logprobs(hidden, weight, targets, impl="triton", softcap=30.0, return_entropy=True,
                          tiles=TileConfig(fused_gemm=fused))
    expected = reference_outputs(hidden.detach(), weight.detach(), targets, softcap=30.0)
    value_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 2e-2)
    assert rel_err(out.logps, expected["logps"]) <= value_tol
    assert rel_err(out.entropy, expected["entropy"]) <= value_tol
    upstream = torch.randn(rows, device="cuda")
    got = torch.autograd.grad((out.logps * upstream).sum(), (hidden, weight))
    want = reference_grads(hidden, weight, targets, upstream, None, softcap=30.0)
    assert rel_err(got[0], want[0]) <= grad_tol
    assert rel_err(got[1], want[1]) <= grad_tol


def test_all_targets_ignored() -> None:
    hidden = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(19, 8, device=DEVICE, requires_grad=True)
    targets = torch.full((2, 3), -100, device=DEVICE)
    out = linear_logprobs(hidden, weight, targets, impl="triton", return_entropy=True)
    assert torch.equal(out.logps.cpu(), torch.zeros(2, 3)) and torch.equal(out.entropy.cpu(), torch.zeros(2, 3))
    (out.logps.sum() + out.entropy.sum()).backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0
