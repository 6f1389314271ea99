"""The GRPO-step benchmark keeps working: its smoke mode runs ours (both engines) and TRL's GRPOTrainer on CPU."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


def _load():
    return load_benchmark("bench_grpo_step")


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
