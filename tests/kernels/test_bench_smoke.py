"""benchmarks/bench_logprobs.py keeps working: its --smoke mode runs in-process on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_logprobs.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_logprobs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_checks_and_times_every_runnable_candidate(tmp_path: Path) -> None:
    bench = load_bench()
    out = tmp_path / "bench.json"
    report = bench.main(["--smoke", "--warmup", "0", "--reps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (shape,) = report["shapes"]
    results = {r["impl"]: r for r in shape["results"]}
    assert set(results) == set(bench.candidates(bench.torch.device("cpu"), smoke=True))
    for name in ("torch_eager", "ours_chunked", "ours_chunked_fused_loss", "ours_triton_fused_gemm"):
        assert results[name]["status"] == "ok", results[name]
    for result in results.values():
        assert result["status"] in ("ok", "skipped"), result
        if result["status"] == "ok":
            # fp32 on CPU: every candidate agrees with the fp32 reference to fp32 accuracy
            assert result["loss_rel_err"] <= 1e-5 and result["grad_weight_rel_err"] <= 1e-4
            assert result["median_ms"] > 0 and len(result["times_ms"]) == 1
    assert results["liger_fused_linear_ce"]["status"] == "skipped"


def test_rejects_a_malformed_shape() -> None:
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--shapes", "12x34"])
