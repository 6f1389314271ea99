"""linear_logprobs (chunked and eager paths) against a float64 full-logits reference."""

from __future__ import annotations

import pytest
import torch
from logprob_reference import reference_grads, reference_outputs, rel_err

from lightning_llm.ops import TokenLogProbs, available_impls, linear_logprobs
from lightning_llm.ops.chunked import default_chunk_rows

OUTPUTS = ("logps", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")
ALL_OUTPUTS = dict(return_entropy=True, return_is_top1=True, return_mean_logits=True, return_log_sum_sq_probs=True)

# shape: targets' shape; hidden is shape + (H,). Vocab sizes are odd on purpose.
CASES = {
    "plain": dict(shape=(13,), vocab=37, hidden=16),
    "3d-ignored-bias": dict(shape=(3, 7), vocab=61, hidden=24, bias=True, ignore_frac=0.3),
    "temperature-chunks": dict(shape=(2, 9), vocab=53, hidden=8, temperature=0.7, chunk_size=4),
    "softcap-scale": dict(shape=(11,), vocab=29, hidden=12, softcap=5.0, logit_scale=2.5),
    "everything": dict(
        shape=(2, 5, 3), vocab=45, hidden=20, bias=True, ignore_frac=0.25, temperature=1.3, softcap=4.0,
        logit_scale=0.8, chunk_size=7,
    ),
}


def make_inputs(case: dict, dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape, vocab, width = case["shape"], case["vocab"], case["hidden"]
    hidden = torch.randn(*shape, width, generator=generator).to(dtype)
    weight = (torch.randn(vocab, width, generator=generator) / width**0.25).to(dtype)
    bias = torch.randn(vocab, generator=generator).to(dtype) if case.get("bias") else None
    targets = torch.randint(0, vocab, shape, generator=generator)
    if case.get("ignore_frac"):
        ignored = torch.rand(shape, generator=generator) < case["ignore_frac"]
        ignored.view(-1)[0] = True  # at least one
        targets = targets.masked_fill(ignored, -100)
    grad_logps = torch.randn(shape, generator=generator)
    grad_entropy = torch.randn(shape, generator=generator)
    return hidden, weight, bias, targets, grad_logps, grad_entropy


def options(case: dict) -> dict:
    return {k: case[k] for k in ("temperature", "logit_scale", "softcap") if k in case}


def run(impl, hidden, weight, bias, targets, case, **extra) -> TokenLogProbs:
    return linear_logprobs(
        hidden, weight, targets, bias=bias, impl=impl, chunk_size=case.get("chunk_size"), **options(case), **extra
    )


@pytest.mark.parametrize("impl", ["chunked", "eager"])
@pytest.mark.parametrize("name", list(CASES))
def test_values_and_grads_match_float64(impl: str, name: str) -> None:
    case = CASES[name]
    hidden, weight, bias, targets, grad_logps, grad_entropy = make_inputs(case)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = run(impl, hidden, weight, bias, targets, case, **ALL_OUTPUTS)
    expected = reference_outputs(hidden.detach(), weight.detach(), targets, bias=bias, **options(case))

    for key in OUTPUTS:
        value = getattr(out, key)
        assert value.shape == targets.shape, key
        if key == "is_top1":
            assert value.dtype == torch.bool
            assert torch.equal(value, expected[key])
        else:
            assert value.dtype == torch.float32
            assert rel_err(value, expected[key]) <= 1e-5, key
    ignored = targets == -100
    assert torch.all(out.logps[ignored] == 0) and torch.all(out.entropy[ignored] == 0)
    assert not out.is_top1.requires_grad and not out.mean_logits.requires_grad
    assert not out.log_sum_sq_probs.requires_grad

    got = torch.autograd.grad((out.logps * grad_logps).sum() + (out.entropy * grad_entropy).sum(), leaves)
    want = reference_grads(hidden, weight, targets, grad_logps, grad_entropy, bias=bias, **options(case))
    for actual, reference in zip(got, want):
        assert actual.dtype == torch.float32
        assert rel_err(actual, reference) <= 1e-4


@pytest.mark.parametrize("impl", ["chunked", "eager"])
@pytest.mark.parametrize("upstream", ["logps", "entropy"])
def test_grads_from_a_single_output(impl: str, upstream: str) -> None:
    case = CASES["everything"]
    hidden, weight, bias, targets, grad_logps, grad_entropy = make_inputs(case, seed=1)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = run(impl, hidden, weight, bias, targets, case, return_entropy=True)
    upstream_grad = grad_logps if upstream == "logps" else grad_entropy
    got = torch.autograd.grad((getattr(out, upstream) * upstream_grad).sum(), (hidden, weight))
    want = reference_grads(
        hidden,
        weight,
        targets,
        grad_logps if upstream == "logps" else None,
        grad_entropy if upstream == "entropy" else None,
        bias=bias,
        **options(case),
    )
    assert rel_err(got[0], want[0]) <= 1e-4
    assert rel_err(got[1], want[1]) <= 1e-4


@pytest.mark.parametrize("impl", ["chunked", "eager"])
def test_bf16_inputs_within_bf16_tolerance(impl: str) -> None:
    case = CASES["3d-ignored-bias"]
    hidden, weight, bias, targets, grad_logps, _ = make_inputs(case, dtype=torch.bfloat16, seed=2)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = run(impl, hidden, weight, bias, targets, case, return_entropy=True)
    expected = reference_outputs(hidden.detach(), weight.detach(), targets, bias=bias)
    assert out.logps.dtype == torch.float32
    assert rel_err(out.logps, expected["logps"]) <= 1e-2
    assert rel_err(out.entropy, expected["entropy"]) <= 1e-2
    got = torch.autograd.grad((out.logps * grad_logps).sum(), (hidden, weight))
    want = reference_grads(hidden, weight, targets, grad_logps, None, bias=bias)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    assert rel_err(got[0], want[0]) <= 2e-2
    assert rel_err(got[1], want[1]) <= 2e-2


@pytest.mark.parametrize("impl", ["chunked", "eager"])
def test_tied_embeddings_accumulate_both_gradients(impl: str) -> None:
    torch.manual_seed(3)
    vocab, width = 41, 12
    embedding = torch.randn(vocab, width, requires_grad=True)
    mixer = torch.randn(width, width) / width**0.5
    ids = torch.randint(0, vocab, (2, 6))
    targets = torch.roll(ids, shifts=-1, dims=1)
    targets[:, -1] = -100

    def forward(emb: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(emb[ids] @ mixer.to(emb.dtype)) * 3.0
        return hidden

    out = linear_logprobs(forward(embedding), embedding, targets, impl=impl)
    (grad,) = torch.autograd.grad(out.logps.sum(), embedding)

    emb64 = embedding.detach().double().requires_grad_()
    expected = reference_outputs(forward(emb64), emb64, targets)["logps"]
    (grad64,) = torch.autograd.grad(expected.sum(), emb64)
    assert rel_err(out.logps, expected) <= 1e-5
    assert rel_err(grad, grad64) <= 1e-4


def test_ignored_rows_do_no_head_work() -> None:
    # NaN hidden states at ignored positions would poison any computation that touched them
    case = CASES["3d-ignored-bias"]
    hidden, weight, bias, targets, grad_logps, grad_entropy = make_inputs(case, seed=4)
    ignored = targets == -100
    hidden[ignored] = float("nan")
    hidden.requires_grad_()
    weight.requires_grad_()
    out = run("chunked", hidden, weight, bias, targets, case, return_entropy=True)
    assert torch.isfinite(out.logps).all() and torch.isfinite(out.entropy).all()
    grad_hidden, grad_weight = torch.autograd.grad((out.logps * grad_logps + out.entropy * grad_entropy).sum(),
                                                   (hidden, weight))
    assert torch.all(grad_hidden[ignored] == 0) and torch.isfinite(grad_weight).all()
    clean = hidden.detach().clone()
    clean[ignored] = 0.0
    expected = reference_outputs(clean, weight.detach(), targets, bias=bias)
    assert rel_err(out.logps, expected["logps"]) <= 1e-5


@pytest.mark.parametrize("impl", ["chunked", "eager"])
def test_all_targets_ignored(impl: str) -> None:
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(19, 8, requires_grad=True)
    targets = torch.full((2, 3), -100)
    out = linear_logprobs(hidden, weight, targets, impl=impl, return_entropy=True)
    assert torch.equal(out.logps, torch.zeros(2, 3)) and torch.equal(out.entropy, torch.zeros(2, 3))
    out.logps.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("impl", ["chunked", "eager"])
def test_is_top1_first_maximum_wins(impl: str) -> None:
    # Rows 3 and 7 of the head are identical, so both tokens share the largest logit
    torch.manual_seed(5)
    weight = torch.randn(11, 6) * 0.1
    weight[7] = weight[3] = torch.tensor([1.0, -2.0, 0.5, 1.5, -1.0, 2.0])
    hidden = weight[3].repeat(4, 1) * 3.0
    targets = torch.tensor([3, 7, 3, 1])
    out = linear_logprobs(hidden, weight, targets, impl=impl, return_is_top1=True)
    assert out.is_top1.tolist() == [True, False, True, False]


def test_autocast_keeps_parameter_dtypes() -> None:
    case = CASES["plain"]
    hidden, weight, bias, targets, grad_logps, _ = make_inputs(case, seed=6)
    weight.requires_grad_()
    hidden.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_logprobs(hidden, weight, targets, impl="chunked")
    (out.logps * grad_logps).sum().backward()
    assert out.logps.dtype == torch.float32
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    expected = reference_outputs(hidden.detach(), weight.detach(), targets)["logps"]
    assert rel_err(out.logps, expected) <= 1e-2


def test_chunked_matches_eager_in_a_single_chunk_and_many() -> None:
    case = dict(shape=(23,), vocab=31, hidden=8)
    hidden, weight, _, targets, _, _ = make_inputs(case, seed=7)
    one = linear_logprobs(hidden, weight, targets, impl="chunked", return_entropy=True)
    many = linear_logprobs(hidden, weight, targets, impl="chunked", chunk_size=2, return_entropy=True)
    assert rel_err(one.logps, many.logps) <= 1e-6
    assert rel_err(one.entropy, many.entropy) <= 1e-6


def test_default_chunk_rows_respects_the_budget() -> None:
    assert default_chunk_rows(1000, budget=10_000) == 10
    assert default_chunk_rows(151_936) * 151_936 <= 1 << 24
    assert default_chunk_rows(10**9) == 1


def test_available_impls() -> None:
    impls = available_impls()
    assert "chunked" in impls and "eager" in impls


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(impl="fast"), "impl"),
        (dict(temperature=0.0), "temperature"),
        (dict(softcap=-1.0), "softcap"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(bias=torch.zeros(5)), "bias"),
        (dict(logit_scale=float("nan")), "logit_scale"),
    ],
)
def test_bad_options_raise(kwargs: dict, argument: str) -> None:
    hidden, weight, targets = torch.randn(4, 8), torch.randn(9, 8), torch.randint(0, 9, (4,))
    with pytest.raises(ValueError, match=argument):
        linear_logprobs(hidden, weight, targets, **kwargs)


@pytest.mark.parametrize(
    ("hidden", "weight", "targets", "argument"),
    [
        (torch.randn(4, 8), torch.randn(9, 7), torch.randint(0, 9, (4,)), "weight"),
        (torch.randn(4, 8), torch.randn(9, 8), torch.randint(0, 9, (5,)), "targets"),
        (torch.randn(4, 8), torch.randn(9, 8), torch.rand(4), "targets"),
        (torch.randn(4, 8), torch.randn(9, 8), torch.tensor([0, 9, 1, 2]), "targets"),
        (torch.randn(4, 8), torch.randn(9, 8), torch.tensor([0, -3, 1, 2]), "targets"),
        (torch.randint(0, 3, (4, 8)), torch.randn(9, 8), torch.randint(0, 9, (4,)), "hidden"),
    ],
)
def test_bad_tensors_raise(hidden, weight, targets, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        linear_logprobs(hidden, weight, targets, impl="chunked")


_DTENSOR_CHECK = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {ops_tests!r})
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from logprob_reference import reference_grads, reference_outputs, rel_err
from test_linear_logprobs import CASES, make_inputs
from lightning_llm.ops import linear_logprobs

dist.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
hidden, weight, _, targets, grad_logps, _ = make_inputs(CASES["plain"], seed=8)
sharded = torch.nn.Parameter(distribute_tensor(weight, init_device_mesh("cpu", (1,)), [Shard(0)]))
out = linear_logprobs(hidden, sharded, targets, impl="chunked")
(out.logps * grad_logps).sum().backward()
print(isinstance(sharded.grad, DTensor))
print(rel_err(sharded.grad.full_tensor(), reference_grads(hidden, weight, targets, grad_logps, None)[1]))
print(rel_err(out.logps, reference_outputs(hidden, weight, targets)["logps"]))
dist.destroy_process_group()
"""


def test_sharded_dtensor_weight_is_gathered(tmp_path) -> None:
    # In a fresh process: the default process group it needs may already exist in this one.
    import subprocess
    import sys
    from pathlib import Path

    script = _DTENSOR_CHECK.format(ops_tests=str(Path(__file__).parent), store=str(tmp_path / "store"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    is_dtensor, grad_err, logp_err = done.stdout.split()[-3:]
    assert is_dtensor == "True"  # the gradient comes back sharded like the weight
    assert float(grad_err) <= 1e-4
    assert float(logp_err) <= 1e-5
