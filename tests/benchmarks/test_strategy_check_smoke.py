"""The strategies check (``benchmarks/strategy_check.py``, device_check's ``strategies`` stage) keeps working: its
CPU rehearsal runs SFT and DPO plain and under FSDP2 (world size 1) and finds them equal; the strategies that need a
GPU or DeepSpeed are reported as skipped, with the reason."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


def _load():
    return load_benchmark("strategy_check")


def test_what_cannot_run_on_a_cpu_is_skipped_by_name():
    bench = _load()
    assert bench.skip_reason("single", "cpu") is None and bench.skip_reason("fsdp2", "cpu") is None
    assert "GPU" in bench.skip_reason("fsdp1", "cpu")
    for name in ("deepspeed_stage_2", "deepspeed_stage_3"):
        assert bench.skip_reason(name, "cpu") is not None
    assert bench.skip_reason("fsdp1", "gpu") is None
    assert "refuses FSDP1" in bench.skip_reason("fsdp1", "gpu", "ppo")
    assert type(bench.build_strategy("fsdp2")).__name__ == "ModelParallelStrategy"
    assert bench.build_strategy("deepspeed_stage_3") == "deepspeed_stage_3"


@pytest.mark.slow
def test_smoke_runs_plain_and_fsdp2_and_they_agree(tmp_path):
    """``--smoke`` for DPO and PPO (SFT runs through the same code as DPO; each takes 70 s to 2 minutes on a loaded
    2-core machine, each run starting a process)."""
    bench = _load()
    bench.ALGOS = ("dpo", "ppo")
    out = tmp_path / "strategies.json"
    results = bench.main(["--smoke", "--out", str(out)])
    by_run = {(r["algo"], r["strategy"]): r for r in results}
    assert set(by_run) == {(a, s) for a in bench.ALGOS for s in bench.STRATEGIES}
    for algo in bench.ALGOS:
        single, fsdp2 = by_run[algo, "single"], by_run[algo, "fsdp2"]
        for record in (single, fsdp2):
            assert "error" not in record and "skipped" not in record, record
            assert len(record["losses"]) == 3, record  # one loss per optimizer step
        assert single["strategy_class"] == "SingleDeviceStrategy"
        assert fsdp2["strategy_class"] == "ModelParallelStrategy"
        assert fsdp2["same_keys"] and fsdp2["max_rel_loss_diff"] <= 1e-5 and fsdp2["max_weight_diff"] <= 1e-4, fsdp2
        for strategy in ("fsdp1", "deepspeed_stage_2", "deepspeed_stage_3"):
            assert by_run[algo, strategy]["skipped"], by_run[algo, strategy]
    written = json.loads(out.read_text())
    assert len(written) == len(results) and all("export" not in record for record in written)
