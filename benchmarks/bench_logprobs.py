"""Forward+backward of the mean token cross-entropy through the LM head: time, memory and accuracy, side by side.

Every candidate computes ``loss = mean_i -log softmax(hidden @ weight.T)[i, target_i]`` and its gradients for
``hidden`` and ``weight``:

- ``torch_eager``: full logits (``F.linear`` then ``F.cross_entropy`` in fp32), what a plain HF model does;
- ``torch_compile_chunked``: ``torch.compile`` of a token-chunked loop of the same;
- ``torch_linear_cross_entropy``: ``torch.nn.functional.linear_cross_entropy`` with chunking options, when the
  installed torch has it;
- ``liger_fused_linear_ce``: Liger-Kernel's fused linear cross-entropy, when importable;
- ``trl_chunked_logprob``: TRL 1.16's ``trl.kernels.ChunkedLogProbFunction``;
- ``ours_triton`` / ``ours_chunked``: ``lightning_llm.ops.linear_logprobs`` with ``impl="triton"`` / ``"chunked"``;
- ``ours_triton_bf16_tiles``: the Triton path with logits tiles in bf16 instead of fp32 (half the traffic);
- ``ours_triton_fused_gemm``: the Triton path with ``TileConfig(fused_gemm=True)``: the logits are computed
  inside the Triton kernels (``tl.dot``) and never written; the backward's tile holds only ``dL/dy`` in bf16;
- ``ours_chunked_fused_loss`` / ``ours_triton_fused_loss`` / ``ours_triton_fused_loss_gemm``:
  ``lightning_llm.ops.linear_token_loss``, the loss's head gradient computed in the forward (``6NHV`` instead
  of ``8NHV``), token-outer chunks of ``--fused-rows`` rows (the last one with the fused-GEMM kernels).

Correctness comes first: each candidate's loss and gradients are compared with an fp32 full-logits reference
on the same inputs. Then each is timed with CUDA events (warm-up, median of ``--reps``) and its incremental
peak memory is measured (peak minus what was allocated before the step: the logits machinery plus the
gradients it returns). The useful-FLOP rate is ``6 N H V / time`` and the floor ``6 N H V / matmul peak``,
with the peak measured by a large bf16 GEMM in the same run.

    python benchmarks/bench_logprobs.py --out results.json          # one GPU, the two shapes of issue 5
    python benchmarks/bench_logprobs.py --smoke                     # CPU, tiny sizes, for CI
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]

# (tokens, hidden, vocab): Qwen2.5-0.5B-like and Llama-3-8B-like heads
DEFAULT_SHAPES = ((16384, 896, 151936), (8192, 4096, 128256))
SMOKE_SHAPES = ((48, 32, 203),)
GIB = 1024**3


# ----------------------------------------------------------------------------------------------- candidates


def torch_eager(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def _chunked_ce(hidden: Tensor, weight: Tensor, targets: Tensor, rows: int = 4096) -> Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start : start + rows], weight).float()
        total = total + F.cross_entropy(logits, targets[start : start + rows], reduction="sum")
    return total / hidden.shape[0]


def make_compile_chunked() -> LossFn:
    return torch.compile(_chunked_ce, dynamic=False)


def make_torch_linear_cross_entropy() -> LossFn | None:
    if not hasattr(F, "linear_cross_entropy"):
        return None
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    options = options_cls() if options_cls is not None else None

    def loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        return F.linear_cross_entropy(hidden, weight, targets, options=options)

    return loss


def make_liger() -> LossFn | None:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        return loss_fn(weight, hidden, targets)  # Liger takes the weight first

    return loss


def make_trl() -> LossFn | None:
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError:
        return None

    def loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        # 32768 vocabulary columns per tile: TRL's own default (_CHUNKED_LOGPROB_CHUNK_SIZE)
        logps = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ())[0]
        return -logps.mean()

    return loss


def make_ours(impl: str) -> LossFn:
    from lightning_llm.ops import linear_logprobs

    def loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        return -linear_logprobs(hidden, weight, targets, impl=impl).logps.mean()

    return loss


def make_ours_fused_gemm() -> LossFn:
    from lightning_llm.kernels.linear_logprobs import TileConfig
    from lightning_llm.ops import linear_logprobs

    def loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        return -linear_logprobs(hidden, weight, targets, impl="triton", tiles=TileConfig(fused_gemm=True)).logps.mean()

    return loss


def make_ours_fused_loss(impl: str, rows: int | None, fused_gemm: bool = False) -> LossFn:
    from lightning_llm.kernels.linear_logprobs import TileConfig
    from lightning_llm.ops import linear_token_loss

    tiles = TileConfig(fused_gemm=True) if fused_gemm else None

    def loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        inv_n = 1.0 / targets.numel()
        return linear_token_loss(
            hidden, weight, targets, lambda logps, entropy: -logps * inv_n, chunk_size=rows, impl=impl, tiles=tiles
        ).loss

    return loss


def make_ours_bf16_tiles() -> LossFn:
    from lightning_llm.kernels.linear_logprobs import TileConfig, TritonLinearLogProbs, default_token_rows
    from lightning_llm.kernels.logit_transform import LogitTransform

    def loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        # The Triton path with logits tiles in the inputs' dtype (as TRL and Liger keep them): half the traffic
        tiles = TileConfig(logits_dtype=hidden.dtype)
        rows = default_token_rows(hidden.shape[0])
        no_extras = (False, False, False, False)
        logps = TritonLinearLogProbs.apply(
            hidden, weight, None, targets, LogitTransform(), hidden.dtype, rows, no_extras, tiles
        )[0]
        return -logps.mean()

    return loss


def candidates(
    device: torch.device, smoke: bool, fused_rows: int | None = None
) -> dict[str, tuple[Callable[[], LossFn | None], str | None]]:
    """name -> (factory, reason it cannot run here or None)."""
    from lightning_llm.kernels import triton_runs_on

    cuda = device.type == "cuda"
    triton_reason = None if triton_runs_on(device) else "Triton cannot run here"
    return {
        "torch_eager": (lambda: torch_eager, None),
        "torch_compile_chunked": (make_compile_chunked, None if cuda else "compile is only timed on CUDA"),
        "torch_linear_cross_entropy": (make_torch_linear_cross_entropy, None),
        "liger_fused_linear_ce": (make_liger, None if cuda else "Liger-Kernel needs CUDA"),
        "trl_chunked_logprob": (make_trl, None),
        "ours_triton": (lambda: make_ours("triton"), triton_reason),
        "ours_triton_bf16_tiles": (make_ours_bf16_tiles, None if cuda else "narrow tiles only pay on CUDA"),
        "ours_triton_fused_gemm": (make_ours_fused_gemm, triton_reason),
        "ours_triton_fused_loss": (lambda: make_ours_fused_loss("triton", fused_rows), triton_reason),
        "ours_triton_fused_loss_gemm": (lambda: make_ours_fused_loss("triton", fused_rows, True), triton_reason),
        "ours_chunked": (lambda: make_ours("chunked"), None),
        "ours_chunked_fused_loss": (lambda: make_ours_fused_loss("chunked", fused_rows), None),
    }


# ----------------------------------------------------------------------------------------------- measuring


@dataclass
class Result:
    impl: str
    status: str = "ok"  # ok | skipped | failed | inaccurate
    reason: str | None = None
    loss: float | None = None
    loss_rel_err: float | None = None
    grad_hidden_rel_err: float | None = None
    grad_weight_rel_err: float | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    useful_tflops: float | None = None
    extra_peak_gib: float | None = None


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|``."""
    scale = expected.float().abs().max().item()
    return (actual.float() - expected.float()).abs().max().item() / max(scale, 1e-30)


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=generator).to(dtype).requires_grad_()
    # std 0.02 like a fresh init, scaled up so the softmax is not flat: logits std ~ 2
    weight = (torch.randn(v, h, device=device, generator=generator) * (2.0 / math.sqrt(h))).to(dtype)
    targets = torch.randint(0, v, (n,), device=device, generator=generator)
    return hidden, weight.requires_grad_(), targets


def fwd_bwd(fn: LossFn, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    hidden.grad = None
    weight.grad = None
    loss = fn(hidden, weight, targets)
    loss.backward()
    return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds per call, CUDA events on GPU and perf_counter on CPU, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def extra_peak_gib(step: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one step above what was allocated before it (inputs), gradients included."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / GIB


def matmul_peak_tflops(device: torch.device, size: int, reps: int) -> float | None:
    """Measured bf16 GEMM throughput (``size^3``), the practical ceiling for every candidate."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    times = time_steps(lambda: torch.mm(a, b), device, warmup=3, reps=reps)
    return 2 * size**3 / (statistics.median(times) * 1e-3) / 1e12


def reference(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 full-logits loss and gradients (inputs upcast), the yardstick for every candidate."""
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), grad_h.to(hidden.dtype), grad_w.to(weight.dtype)


def run_shape(
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    names: list[str],
    warmup: int,
    reps: int,
    smoke: bool,
    tolerance: dict[str, float],
    fused_rows: int | None = None,
) -> list[Result]:
    n, h, v = shape
    hidden, weight, targets = make_inputs(n, h, v, dtype, device)
    ref_loss, ref_grad_h, ref_grad_w = reference(hidden, weight, targets)
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    flops = 6 * n * h * v
    table = candidates(device, smoke, fused_rows)
    results = []
    for name in names:
        factory, reason = table[name]
        result = Result(name)
        results.append(result)
        fn = factory() if reason is None else None
        if fn is None:
            result.status, result.reason = "skipped", reason or "not installed in this environment"
            continue
        try:
            loss = fwd_bwd(fn, hidden, weight, targets)
            result.loss = loss.item()
            result.loss_rel_err = abs(result.loss - ref_loss.item()) / abs(ref_loss.item())
            result.grad_hidden_rel_err = rel_err(hidden.grad, ref_grad_h)
            result.grad_weight_rel_err = rel_err(weight.grad, ref_grad_w)
            accurate = (
                result.loss_rel_err <= tolerance["loss"]
                and result.grad_hidden_rel_err <= tolerance["grad"]
                and result.grad_weight_rel_err <= tolerance["grad"]
            )
            if not accurate:
                result.status, result.reason = "inaccurate", f"beyond tolerance {tolerance}"

            def step() -> Tensor:
                return fwd_bwd(fn, hidden, weight, targets)

            result.times_ms = time_steps(step, device, warmup, reps)
            result.median_ms = statistics.median(result.times_ms)
            result.min_ms = min(result.times_ms)
            result.useful_tflops = flops / (result.median_ms * 1e-3) / 1e12
            result.extra_peak_gib = extra_peak_gib(step, device)
        except Exception as error:  # a candidate that breaks is reported, not fatal to the run
            result.status, result.reason = "failed", f"{type(error).__name__}: {error}"[:500]
        finally:
            hidden.grad = weight.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------------------------- reporting


def format_table(shape: dict[str, Any]) -> str:
    n, h, v = shape["tokens"], shape["hidden"], shape["vocab"]
    floor = shape["floor_ms"]
    lines = [
        f"N={n} H={h} V={v} {shape['dtype']}  floor (6NHV at measured peak) = "
        + (f"{floor:.1f} ms" if floor is not None else "n/a"),
        f"{'impl':<28}{'status':<11}{'median ms':>10}{'TFLOP/s':>9}{'extra GiB':>10}"
        f"{'loss err':>10}{'dh err':>10}{'dW err':>10}",
    ]

    def cell(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    for r in shape["results"]:
        lines.append(
            f"{r['impl']:<28}{r['status']:<11}{cell(r['median_ms'], '10.2f'):>10}{cell(r['useful_tflops'], '9.1f'):>9}"
            f"{cell(r['extra_peak_gib'], '10.3f'):>10}{cell(r['loss_rel_err'], '10.1e'):>10}"
            f"{cell(r['grad_hidden_rel_err'], '10.1e'):>10}{cell(r['grad_weight_rel_err'], '10.1e'):>10}"
        )
        if r["reason"] and r["status"] != "ok":
            lines.append(f"{'':<28}({r['reason']})")
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"shape must look like 16384x896x151936, got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, few reps (CI keeps the script alive)")
    parser.add_argument("--cpu", action="store_true", help="time on the CPU at the given --shapes (fp32 default)")
    parser.add_argument("--fused-rows", type=int, default=None,
                        help="token rows per chunk of the *_fused_loss candidates (default: their memory budget)")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", help="NxHxV shapes (default: issue 5's two)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 (fp32 smoke)")
    parser.add_argument("--impls", nargs="+", help="subset of candidates to run (default: all)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per candidate (default 5, smoke 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per candidate (default 30, smoke 2)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the GEMM that measures the peak")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or args.cpu or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and "triton" not in sys.modules:
        # Triton reads this at import: on CPU its kernels run (slowly) in the interpreter, enough for a smoke run
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if device.type == "cpu" and not (args.smoke or args.cpu):
        print("no CUDA device: running the smoke configuration instead", file=sys.stderr)
        args.smoke = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if device.type == "cpu" else "bf16")
    ]
    shapes = args.shapes or (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    reps = args.reps if args.reps is not None else (2 if args.smoke else 30)
    names = list(candidates(device, args.smoke, args.fused_rows))
    if args.impls:
        unknown = sorted(set(args.impls) - set(names))
        if unknown:
            raise SystemExit(f"unknown --impls {unknown}; choose from {names}")
        names = [n for n in names if n in args.impls]
    # fp32 must agree tightly; bf16 loses ~3 significant digits in the logits of the candidates that round them
    tolerance = {"loss": 1e-5, "grad": 1e-4} if dtype == torch.float32 else {"loss": 5e-3, "grad": 5e-2}

    peak = matmul_peak_tflops(device, args.matmul_size, reps=10)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "smoke": args.smoke,
        "matmul_peak_tflops": peak,
        "warmup": warmup,
        "reps": reps,
        "tolerance": tolerance,
        "shapes": [],
    }
    if peak is not None:
        print(f"{report['device']}: measured bf16 matmul peak {peak:.0f} TFLOP/s")
    for n, h, v in shapes:
        results = run_shape((n, h, v), dtype, device, names, warmup, reps, args.smoke, tolerance, args.fused_rows)
        floor = 6 * n * h * v / (peak * 1e12) * 1e3 if peak else None
        entry = {
            "tokens": n, "hidden": h, "vocab": v, "dtype": str(dtype).removeprefix("torch."), "floor_ms": floor,
            "results": [asdict(r) for r in results],
        }
        report["shapes"].append(entry)
        print(format_table(entry), flush=True)
        print()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
