"""The fused head-GEMM kernels (logits never written) against float64 and against the torch references."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from logprob_reference import reference_outputs, rel_err  # noqa: E402
from triton_device import DEVICE, requires_triton  # noqa: E402

from lightning_llm.kernels.gemm import gemm_logits_grad, gemm_softmax_stats, vocab_splits  # noqa: E402
from lightning_llm.kernels.logit_transform import LogitTransform  # noqa: E402
from lightning_llm.kernels.logits_grad import logits_grad_reference  # noqa: E402
from lightning_llm.kernels.softmax_stats import SoftmaxStats  # noqa: E402

pytestmark = requires_triton

OUTPUTS = ("logps", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")

# (rows, vocab, hidden, transform options, bias): sizes that leave partial blocks of rows, columns and hidden
CASES = {
    "plain": (19, 300, 24, {}, False),
    "bias-temperature": (33, 517, 40, dict(temperature=0.7), True),
    "softcap-scale": (7, 611, 17, dict(softcap=4.0, logit_scale=1.7), True),
}


def make_inputs(rows, vocab, width, with_bias, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator).to(dtype)
    weight = (torch.randn(vocab, width, generator=generator) / width**0.25).to(dtype)
    bias = torch.randn(vocab, generator=generator).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return hidden, weight, bias, targets


def on_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


@pytest.mark.parametrize("splits", [1, 2, None])
@pytest.mark.parametrize("name", list(CASES))
def test_stats_match_float64(name: str, splits: int | None) -> None:
    rows, vocab, width, options, with_bias = CASES[name]
    hidden, weight, bias, targets = make_inputs(rows, vocab, width, with_bias, seed=len(name))
    stats = gemm_softmax_stats(*on_device(hidden, weight, bias, targets), LogitTransform(**options),
                               (True, True, True, True), splits=splits)
    outputs = stats.finish(vocab)[1:]
    expected = reference_outputs(hidden, weight, targets, bias=bias, **options)
    for key, value in zip(OUTPUTS, outputs):
        if key == "is_top1":
            assert torch.equal(value.cpu(), expected[key]), key
        else:
            assert value.dtype == torch.float32 and rel_err(value.cpu(), expected[key]) <= 1e-5, key


def test_split_merge_equals_one_pass() -> None:
    # Merging the statistics of 3 vocabulary ranges gives those of the whole row (module docstring's formulas)
    hidden, weight, bias, targets = make_inputs(11, 700, 16, True, seed=3)
    want = (True, True, True, True)
    whole = gemm_softmax_stats(*on_device(hidden, weight, bias, targets), LogitTransform(), want, splits=1)
    merged = gemm_softmax_stats(*on_device(hidden, weight, bias, targets), LogitTransform(), want, splits=3)
    assert merged.max.shape == (11,)
    for a, b in zip(whole.finish(700), merged.finish(700)):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_combine_of_an_empty_split_is_harmless() -> None:
    seen = SoftmaxStats(*(torch.tensor([[v], [v]]) for v in (1.5, 2.0, 0.3, 1.1, 4.0, 0.5, 1.0)))
    seen.max[1] = float("-inf")  # split 1 saw no column
    for field in ("sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum", "target_z"):
        getattr(seen, field)[1] = 0.0
    seen.best_before[1] = float("-inf")
    merged = SoftmaxStats.combine(seen)
    assert merged.sum_exp.item() == 2.0 and merged.x_sum_exp.item() == pytest.approx(0.3)
    assert torch.isfinite(merged.x_sum_exp).all()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_grad_matches_the_torch_reference(name: str) -> None:
    rows, vocab, width, options, with_bias = CASES[name]
    hidden, weight, bias, targets = make_inputs(rows, vocab, width, with_bias, seed=10 + len(name))
    transform = LogitTransform(**options)
    stats = gemm_softmax_stats(*on_device(hidden, weight, bias, targets), transform, (True, False, False, False))
    log_z, _, entropy, *_ = stats.finish(vocab)
    generator = torch.Generator().manual_seed(1)
    grad_logps, grad_entropy = torch.randn(rows, generator=generator), torch.randn(rows, generator=generator)
    v0, v1 = 37, vocab - 50  # a chunk that starts and ends mid-block, some targets outside it
    chunk_bias = bias[v0:v1] if bias is not None else None
    expected = logits_grad_reference(hidden @ weight[v0:v1].T, chunk_bias, targets, log_z.cpu(), entropy.cpu(),
                                     grad_logps, grad_entropy, v0, transform)
    for upstream in ("both", "logps", "entropy"):
        g_logps = grad_logps if upstream != "entropy" else None
        g_entropy = grad_entropy if upstream != "logps" else None
        out = torch.empty(rows, v1 - v0, device=DEVICE)
        gemm_logits_grad(*on_device(hidden, weight[v0:v1], chunk_bias, targets, log_z, entropy, g_logps, g_entropy),
                         v0, transform, out=out)
        want = expected if upstream == "both" else logits_grad_reference(
            hidden @ weight[v0:v1].T, chunk_bias, targets, log_z.cpu(), entropy.cpu(), g_logps, g_entropy, v0,
            transform)
        assert rel_err(out.cpu(), want) <= 1e-5, upstream


def test_bf16_operands_and_fp32_master_weights() -> None:
    # bf16 activations with an fp32 weight: the kernel rounds the weight blocks to bf16 as a cast would
    hidden, weight, _, targets = make_inputs(21, 333, 32, False, seed=4)
    hidden16 = hidden.to(torch.bfloat16)
    transform = LogitTransform()
    want = (True, False, False, False)
    mixed = gemm_softmax_stats(*on_device(hidden16, weight, None, targets), transform, want).finish(333)
    cast = gemm_softmax_stats(*on_device(hidden16, weight.to(torch.bfloat16), None, targets), transform,
                              want).finish(333)
    expected = reference_outputs(hidden16.float(), weight.to(torch.bfloat16).float(), targets)
    assert rel_err(cast[1].cpu(), expected["logps"]) <= 1e-5  # fp32 accumulation of bf16 products
    if DEVICE.type == "cuda":
        assert torch.allclose(mixed[1], cast[1], rtol=0, atol=1e-5)
    else:  # the interpreter's fp32 -> bf16 conversion does not round to nearest like torch's
        assert rel_err(mixed[1].cpu(), expected["logps"]) <= 1e-2
    out = torch.empty(21, 333, device=DEVICE, dtype=torch.bfloat16)
    gemm_logits_grad(*on_device(hidden16, weight.to(torch.bfloat16), None, targets, cast[0]), None,
                     on_device(torch.ones(21))[0], None, 0, transform, out=out)
    reference = logits_grad_reference(hidden16.float() @ weight.to(torch.bfloat16).float().T, None, targets,
                                      cast[0].cpu(), None, torch.ones(21), None, 0, transform)
    assert out.dtype == torch.bfloat16 and rel_err(out.float().cpu(), reference) <= 1e-2


def test_vocab_splits_cover_the_vocabulary_without_empty_splits() -> None:
    for n_rows, n_vocab in [(1, 100), (16384, 151936), (100, 151936), (8192, 128256), (5, 257)]:
        splits, cols = vocab_splits(n_rows, n_vocab)
        assert cols % 256 == 0 and splits * cols >= n_vocab > (splits - 1) * cols
    assert vocab_splits(16384, 151936)[0] == 8  # 128 row blocks x 8 splits = 1024 programs


def test_bad_operands_are_refused() -> None:
    hidden = torch.randn(4, 8, device=DEVICE)
    weight = torch.randn(10, 8, device=DEVICE)
    targets = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        gemm_softmax_stats(hidden.double(), weight, None, targets, LogitTransform(), (False,) * 4)
    with pytest.raises(ValueError, match="out must be"):
        gemm_logits_grad(hidden, weight, None, targets, torch.zeros(4, device=DEVICE), None, None, None, 0,
                         LogitTransform(), out=torch.empty(4, 9, device=DEVICE))
