"""The in-place logits-gradient kernel against its torch reference and against float64 autograd."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_device import DEVICE, requires_triton  # noqa: E402

from lightning_llm.kernels.logit_transform import LogitTransform  # noqa: E402
from lightning_llm.kernels.logits_grad import logits_grad_, logits_grad_reference, narrow_view  # noqa: E402

pytestmark = requires_triton

TRANSFORM = LogitTransform(logit_scale=1.4, softcap=3.5, temperature=0.8)


def make_tile(rows: int = 6, vocab: int = 41, seed: int = 0, with_bias: bool = True):
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(rows, vocab, generator=generator) * 3
    bias = torch.randn(vocab, generator=generator) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    grad_logps = torch.randn(rows, generator=generator)
    grad_entropy = torch.randn(rows, generator=generator)
    return raw, bias, targets, grad_logps, grad_entropy


def float64_grad(raw, bias, targets, grad_logps, grad_entropy, transform):
    """d/dy of sum(g * log p_t + h * H) by autograd in float64 over the full rows."""
    y = raw.double().requires_grad_()
    z = transform.apply(y + (bias.double() if bias is not None else 0.0))
    log_p = torch.log_softmax(z, dim=-1)
    objective = torch.zeros((), dtype=torch.float64)
    if grad_logps is not None:
        objective = objective + (grad_logps.double() * log_p.gather(1, targets[:, None])[:, 0]).sum()
    if grad_entropy is not None:
        objective = objective + (grad_entropy.double() * -(log_p.exp() * log_p).sum(-1)).sum()
    (grad,) = torch.autograd.grad(objective, y)
    return grad, torch.logsumexp(z, -1).detach(), (-(log_p.exp() * log_p).sum(-1)).detach()


@pytest.mark.parametrize("upstream", ["logps", "entropy", "both"])
def test_fp32_in_place_gradient_matches_float64(upstream: str) -> None:
    raw, bias, targets, grad_logps, grad_entropy = make_tile()
    grad_logps = grad_logps if upstream in ("logps", "both") else None
    grad_entropy = grad_entropy if upstream in ("entropy", "both") else None
    expected, log_z, entropy = float64_grad(raw, bias, targets, grad_logps, grad_entropy, TRANSFORM)
    # Split the vocabulary in two tiles at an odd column to check vocab_start handling
    for v0, v1 in ((0, 17), (17, raw.shape[1])):
        tile = raw[:, v0:v1].contiguous().to(DEVICE)
        result = logits_grad_(
            tile,
            tile,
            bias[v0:v1].to(DEVICE),
            targets.to(DEVICE),
            log_z.float().to(DEVICE),
            entropy.float().to(DEVICE),
            grad_logps.to(DEVICE) if grad_logps is not None else None,
            grad_entropy.to(DEVICE) if grad_entropy is not None else None,
            v0,
            TRANSFORM,
            block=8,
        )
        assert result.data_ptr() == tile.data_ptr()
        assert torch.allclose(result.double().cpu(), expected[:, v0:v1], rtol=1e-5, atol=1e-6)


def test_narrow_in_place_write_matches_reference_rounded() -> None:
    raw, bias, targets, grad_logps, grad_entropy = make_tile(rows=5, vocab=29, seed=1)
    log_z = torch.logsumexp(TRANSFORM.apply(raw + bias), -1)
    entropy = torch.rand(5) + 1.0
    reference = logits_grad_reference(raw, bias, targets, log_z, entropy, grad_logps, grad_entropy, 0, TRANSFORM)

    # The tile sits inside a larger buffer with padding columns that must stay untouched
    buffer = torch.randn(5, 32)
    tile = buffer[:, :29]
    tile.copy_(raw)
    padding = buffer[:, 29:].clone()
    buffer, tile = buffer.to(DEVICE), None
    tile = buffer[:, :29]
    grad = narrow_view(tile, torch.bfloat16)
    assert grad.shape == (5, 29) and grad.data_ptr() == tile.data_ptr() and grad.stride() == (64, 1)
    logits_grad_(
        tile, grad, bias.to(DEVICE), targets.to(DEVICE), log_z.to(DEVICE), entropy.to(DEVICE),
        grad_logps.to(DEVICE), grad_entropy.to(DEVICE), 0, TRANSFORM, block=8,
    )
    # within one bf16 ulp of the fp32 reference (the GPU rounds to nearest, Triton's interpreter truncates)
    assert torch.allclose(grad.float().cpu(), reference, rtol=2**-7, atol=1e-6)
    assert torch.equal(buffer[:, 29:].cpu(), padding)


def test_reference_matches_float64() -> None:
    raw, bias, targets, grad_logps, grad_entropy = make_tile(seed=2)
    expected, log_z, entropy = float64_grad(raw, bias, targets, grad_logps, grad_entropy, TRANSFORM)
    got = logits_grad_reference(
        raw, bias, targets, log_z.float(), entropy.float(), grad_logps, grad_entropy, 0, TRANSFORM
    )
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_narrow_view_rejects_odd_requests() -> None:
    with pytest.raises(ValueError, match="narrow_view"):
        narrow_view(torch.randn(3, 4).to(torch.float16), torch.bfloat16)
    assert narrow_view(torch.randn(3, 4), torch.float32).dtype == torch.float32
