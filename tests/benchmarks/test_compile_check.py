"""Every Triton kernel compiles for a Hopper GPU (sm_90a) on a machine without one.

The interpreter tests check what the kernels compute; this checks that the GPU backend accepts them, that the
bf16 path uses Hopper's wgmma, and that ptxas reports their registers. It runs the script in a process without
TRITON_INTERPRET (the root conftest sets it for this one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compile_check.py"
PTXAS_DIR = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not any((PTXAS_DIR / n).is_file() for n in ("ptxas", "ptxas-blackwell")),
                    reason="this Triton ships no ptxas")
def test_kernels_compile_for_hopper(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--first", "--json", str(out)], capture_output=True, text=True,
                         timeout=600, check=False, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())
    gemm_rows = [r for r in rows if r["kernel"] in ("stats", "grad")]
    expected = {(k, e) for k in ("stats", "grad") for e in (False, True)}
    assert {(r["kernel"], r["entropy"]) for r in gemm_rows} == expected
    for row in gemm_rows:
        assert row["wgmma"] is True, row
        assert row["shared_bytes"] > 0, row
    assert {r["kernel"] for r in rows} - {"stats", "grad"} == {"fold", "rowgrad"}
    for row in rows:
        # -1: the Triton in use emits PTX newer than its own ptxas reads; compiling to PTX is then the check
        assert row["registers"] == -1 or 0 < row["registers"] <= 255, row


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(SCRIPT), "--first"], capture_output=True, text=True, timeout=120,
                         check=False, env=env)
    assert run.returncode != 0 and "unset TRITON_INTERPRET" in run.stderr
