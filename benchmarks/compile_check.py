"""Compile the Triton kernels for a GPU target without a GPU, and report their resource use.

Triton's interpreter (how the kernels are tested on CPU) accepts programs the GPU backend may reject, and it
says nothing about registers. This script lowers each kernel of :mod:`lightning_llm.kernels.gemm` for every
autotuned block shape, and the two row kernels of the tile path, to PTX for ``sm_90a`` (Hopper), assembles it
with the ``ptxas`` that ships with Triton, and prints registers per thread, spilled bytes, shared memory and
whether Hopper's ``wgmma`` instructions are used. Spills in a configuration mean it is unlikely to win the
autotuning.

    python benchmarks/compile_check.py            # every config, bf16, statistics with and without entropy
    python benchmarks/compile_check.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lightning_llm.kernels import gemm, logits_grad, softmax_stats

_STATS_CONSTEXPRS = ("HAS_BIAS", "HAS_SOFTCAP", "WANT_ENTROPY", "WANT_TOP1", "WANT_MEAN", "WANT_SQ", "DOT_PRECISION",
                     "BM", "BN", "BK")
_GRAD_CONSTEXPRS = ("HAS_BIAS", "HAS_SOFTCAP", "HAS_GRAD_LOGPS", "HAS_GRAD_ENTROPY", "DOT_PRECISION", "BM", "BN", "BK")


def _signature(kernel: str, dtype: str) -> dict[str, str]:
    sig = {"h_ptr": f"*{dtype}", "stride_h": "i32", "w_ptr": f"*{dtype}", "stride_w": "i32", "bias_ptr": f"*{dtype}",
           "targets_ptr": "*i64"}
    if kernel == "stats":
        sig.update(partial_ptr="*fp32", n_rows="i32", n_vocab="i32", n_hidden="i32", cols_per_split="i32")
        names = _STATS_CONSTEXPRS
    else:
        sig.update(log_z_ptr="*fp32", entropy_ptr="*fp32", grad_logps_ptr="*fp32", grad_entropy_ptr="*fp32",
                   grad_ptr=f"*{dtype}", stride_g="i32", n_rows="i32", n_cols="i32", n_hidden="i32",
                   vocab_start="i32")
        names = _GRAD_CONSTEXPRS
    sig.update(logit_scale="fp32", softcap="fp32", inv_temperature="fp32")
    sig.update({name: "constexpr" for name in names})
    return sig


def _divisibility(sig: dict[str, str]) -> dict[tuple[int, ...], list[list[Any]]]:
    # What the JIT infers at launch for 16-aligned pointers, strides and hidden sizes (e.g. H = 896 or 4096)
    names = list(sig)
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride") or n == "n_hidden"]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def _ptxas() -> str:
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one accepts the PTX version recent Triton emits
        if (folder / name).is_file():
            return str(folder / name)
    raise FileNotFoundError(f"no ptxas under {folder}")


def resources(ptx: str, arch: str = "sm_90a") -> dict[str, int]:
    """Registers and spill bytes that ``ptxas -v`` reports for ``ptx`` (-1 when no shipped ptxas reads it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        Path(path).write_text(ptx)
        run = subprocess.run([_ptxas(), "-v", "--gpu-name", arch, path, "-o", os.devnull], capture_output=True,
                             text=True, check=False)
    if run.returncode != 0 and "Unsupported .version" in run.stderr:
        # this Triton emits PTX newer than the ptxas it ships: the kernels compiled, their resources are unknown
        return {"registers": -1, "spill_bytes": -1}
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed: {run.stderr[-2000:]}")
    registers = re.findall(r"Used (\d+) registers", run.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", run.stderr)
    return {"registers": int(registers[0]) if registers else -1, "spill_bytes": int(spills[0]) if spills else 0}


def compile_one(kernel: str, config: triton.Config, dtype: str = "bf16", entropy: bool = False) -> dict[str, Any]:
    """Compile one kernel for sm_90 with one block configuration; its resource use."""
    sig = _signature(kernel, dtype)
    precision = "ieee" if dtype == "fp32" else None
    if kernel == "stats":
        constexprs = dict(HAS_BIAS=False, HAS_SOFTCAP=False, WANT_ENTROPY=entropy, WANT_TOP1=entropy, WANT_MEAN=False,
                          WANT_SQ=False, DOT_PRECISION=precision, **config.kwargs)
        fn = gemm._gemm_stats_kernel
    else:
        constexprs = dict(HAS_BIAS=False, HAS_SOFTCAP=False, HAS_GRAD_LOGPS=True, HAS_GRAD_ENTROPY=entropy,
                          DOT_PRECISION=precision, **config.kwargs)
        fn = gemm._gemm_logits_grad_kernel
    source = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=_divisibility(sig))
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    ptx = compiled.asm["ptx"]
    return {
        "kernel": kernel, "dtype": dtype, "entropy": entropy, **config.kwargs, "num_warps": config.num_warps,
        "num_stages": config.num_stages, "shared_bytes": compiled.metadata.shared, "wgmma": "wgmma" in ptx,
        **resources(ptx),
    }


def compile_row_kernels(dtype: str = "bf16") -> list[dict[str, Any]]:
    """The tile path's row kernels (statistics fold, in-place gradient) with every option on, BLOCK = 1024."""
    stats = ["max_ptr", "sum_exp_ptr", "x_sum_exp_ptr", "sq_sum_exp_ptr", "z_sum_ptr", "best_before_ptr",
             "target_z_ptr"]
    fold_sig = {"tile_ptr": f"*{dtype}", "tile_stride": "i32", "bias_ptr": f"*{dtype}", "targets_ptr": "*i64",
                **{name: "*fp32" for name in stats}, "vocab_start": "i32", "n_cols": "i32"}
    grad_sig = {"tile_ptr": f"*{dtype}", "tile_stride": "i32", "grad_ptr": f"*{dtype}", "grad_stride": "i32",
                "bias_ptr": f"*{dtype}", "targets_ptr": "*i64", "log_z_ptr": "*fp32", "entropy_ptr": "*fp32",
                "grad_logps_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "vocab_start": "i32", "n_cols": "i32"}
    scalars = dict(logit_scale="fp32", softcap="fp32", inv_temperature="fp32")
    kernels = [
        ("fold", softmax_stats._fold_stats_kernel, {**fold_sig, **scalars},
         dict(HAS_BIAS=True, HAS_SOFTCAP=True, WANT_ENTROPY=True, WANT_TOP1=True, WANT_MEAN=True, WANT_SQ=True)),
        ("rowgrad", logits_grad._logits_grad_kernel, {**grad_sig, **scalars},
         dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_GRAD_LOGPS=True, HAS_GRAD_ENTROPY=True)),
    ]
    report = []
    for name, fn, sig, flags in kernels:
        constexprs = dict(flags, BLOCK=1024)
        sig = {**sig, **{flag: "constexpr" for flag in constexprs}}
        source = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=_divisibility(sig))
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
        report.append({"kernel": name, "dtype": dtype, "entropy": True, "BLOCK": 1024, "num_warps": 8,
                       "shared_bytes": compiled.metadata.shared, **resources(compiled.asm["ptx"])})
    return report


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--first", action="store_true", help="only the first autotuned config (a quick check)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")
    report = []
    for config in gemm._CUDA_CONFIGS[:1] if args.first else gemm._CUDA_CONFIGS:
        for kernel in ("stats", "grad"):
            for entropy in (False, True):
                row = compile_one(kernel, config, args.dtype, entropy)
                report.append(row)
                print(f"{kernel:<6}{'+entropy' if entropy else '':<9}BM={row['BM']:<4}BN={row['BN']:<4}"
                      f"BK={row['BK']:<3}warps={row['num_warps']} stages={row['num_stages']}  "
                      f"registers={row['registers']:<4}spills={row['spill_bytes']:<5}"
                      f"shared={row['shared_bytes'] // 1024} KiB  wgmma={row['wgmma']}", flush=True)
    for row in compile_row_kernels(args.dtype):
        report.append(row)
        print(f"{row['kernel']:<15}BLOCK={row['BLOCK']} warps={row['num_warps']}  registers={row['registers']:<4}"
              f"spills={row['spill_bytes']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
