"""The online softmax-statistics kernel against its torch reference and against float64 full rows."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from triton_device import DEVICE, requires_triton  # noqa: E402

from lightning_llm.kernels.logit_transform import LogitTransform  # noqa: E402
from lightning_llm.kernels.softmax_stats import (  # noqa: E402
    SoftmaxStats,
    fold_softmax_stats,
    fold_softmax_stats_reference,
)

pytestmark = requires_triton


def fold_all(raw, bias, targets, transform, want, chunk, block=None, reference=False) -> SoftmaxStats:
    stats = SoftmaxStats.empty(raw.shape[0], raw.device)
    for v0 in range(0, raw.shape[1], chunk):
        v1 = min(v0 + chunk, raw.shape[1])
        tile = raw[:, v0:v1].contiguous()
        bias_chunk = bias[v0:v1] if bias is not None else None
        if reference:
            fold_softmax_stats_reference(tile, bias_chunk, targets, stats, v0, transform, want)
        else:
            fold_softmax_stats(tile, bias_chunk, targets, stats, v0, transform, want, block)
    return stats


TRANSFORMS = {
    "identity": LogitTransform(),
    "temperature": LogitTransform(temperature=0.6),
    "softcap-scale": LogitTransform(logit_scale=1.7, softcap=4.0, temperature=1.2),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_float64_rows(name: str, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 9, 53  # 53 = 3 chunks of 20 (the last partial), blocks of 8 (partial too)
    raw = (torch.randn(rows, vocab, generator=generator) * 4).to(DEVICE)
    bias = torch.randn(vocab, generator=generator).to(DEVICE) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(DEVICE)
    transform = TRANSFORMS[name]
    stats = fold_all(raw, bias, targets, transform, (True, True, True, True), chunk=20, block=8)
    log_z, logps, entropy, is_top1, mean_logits, log_sum_sq = stats.finish(vocab)

    z = transform.apply(raw.double() + (bias.double() if bias is not None else 0.0))
    log_p = torch.log_softmax(z, dim=-1)
    assert torch.allclose(log_z.double(), torch.logsumexp(z, -1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(logps.double(), log_p.gather(1, targets[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(entropy.double(), -(log_p.exp() * log_p).sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(is_top1, z.argmax(-1) == targets)
    assert torch.allclose(mean_logits.double(), z.mean(-1), rtol=1e-5, atol=1e-6)
    assert torch.allclose(log_sum_sq.double(), torch.logsumexp(2 * log_p, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("want", list(itertools.product([False, True], repeat=4)))
def test_kernel_matches_torch_reference_for_every_flag_set(want: tuple[bool, bool, bool, bool]) -> None:
    generator = torch.Generator().manual_seed(1)
    rows, vocab = 5, 37
    raw = (torch.randn(rows, vocab, generator=generator) * 3).to(DEVICE)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(DEVICE)
    transform = LogitTransform(softcap=5.0)
    kernel = fold_all(raw, None, targets, transform, want, chunk=16, block=16)
    reference = fold_all(raw, None, targets, transform, want, chunk=16, reference=True)
    for field in ("max", "sum_exp", "target_z") + tuple(
        name for name, on in zip(("x_sum_exp", "best_before", "z_sum", "sq_sum_exp"), want) if on
    ):
        assert torch.allclose(getattr(kernel, field), getattr(reference, field), rtol=1e-5, atol=1e-6), field
    # statistics nobody asked for are never written
    untouched = SoftmaxStats.empty(rows, DEVICE)
    for field, on in zip(("x_sum_exp", "best_before", "z_sum", "sq_sum_exp"), want):
        if not on:
            assert torch.equal(getattr(kernel, field), getattr(untouched, field)), field


def test_argmax_ties_across_chunks_go_to_the_first() -> None:
    # Columns 2 and 30 hold the same largest logit; 30 lies in a later chunk than 2
    raw = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    raw[:, 2] = raw[:, 30] = 10.0
    targets = torch.tensor([2, 30, 5])
    stats = fold_all(raw.to(DEVICE), None, targets.to(DEVICE), LogitTransform(), (False, True, False, False), 16, 8)
    is_top1 = stats.finish(40)[3]
    assert is_top1.cpu().tolist() == [True, False, False]


def test_rejects_a_float64_tile() -> None:
    tile = torch.randn(2, 8, device=DEVICE, dtype=torch.float64)
    stats = SoftmaxStats.empty(2, DEVICE)
    with pytest.raises(ValueError, match="tile"):
        fold_softmax_stats(tile, None, torch.tensor([0, 1], device=DEVICE), stats, 0, LogitTransform(), (True,) * 4)


def test_bf16_tile_matches_reference() -> None:
    generator = torch.Generator().manual_seed(3)
    raw = (torch.randn(6, 33, generator=generator) * 3).to(torch.bfloat16).to(DEVICE)
    targets = torch.randint(0, 33, (6,), generator=generator).to(DEVICE)
    kernel = fold_all(raw, None, targets, LogitTransform(temperature=0.9), (True,) * 4, chunk=16, block=8)
    reference = fold_all(raw, None, targets, LogitTransform(temperature=0.9), (True,) * 4, chunk=16, reference=True)
    for got, want in zip(kernel.finish(33), reference.finish(33)):
        assert torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-5)
