"""The GRPO-step benchmark keeps working: its smoke mode runs ours (both engines) and TRL's GRPOTrainer on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_grpo_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_grpo_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_grpo_step"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_runs_ours_and_trl(tmp_path):
    bench = _load()
    out = tmp_path / "grpo.json"
    results = bench.main(["--smoke", "--out", str(out)])
    by_name = {r["name"]: r for r in results}
    assert set(by_name) == set(bench.CANDIDATES)
    setup = bench.Setup.smoke()
    for name in bench.CANDIDATES:
        if "skipped" in by_name[name]:
            continue
        assert "error" not in by_name[name], by_name[name]
        assert by_name[name]["steps_timed"] == setup.steps
        assert by_name[name]["mean_step_s"] > 0 and by_name[name]["memory_last_mib"] > 0
    assert json.loads(out.read_text())["results"] == results
    assert "vs TRL" in bench.format_table(results)


def test_rewards_differ_within_a_group():
    """The benchmark's reward gives a group of different completions different scores (non-zero advantages)."""
    bench = _load()
    assert bench.vowel_reward(["aaaa", "abcd", [{"role": "assistant", "content": "xyz"}]]) == [1.0, 0.25, 0.0]
