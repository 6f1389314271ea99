"""The online-step benchmark keeps working: its smoke mode runs ours (both engines) and TRL's trainer on CPU, for
GRPO (GRPOTrainer) and Online DPO (the experimental OnlineDPOTrainer); PPO has ours alone (TRL 1.16 has none)."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


def _load():
    return load_benchmark("bench_grpo_step")


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "online_dpo", "ppo_value_head"])
def test_smoke_runs_ours_and_trl(tmp_path, algo):
    bench = _load()
    out = tmp_path / f"{algo}.json"
    argv = ["--smoke", "--out", str(out)] + ([] if algo == "grpo" else ["--algo", algo])
    results = bench.main(argv)
    by_name = {r["name"]: r for r in results}
    assert set(by_name) == set(bench.CANDIDATES)
    setup = bench.Setup.smoke(algo)
    for name in bench.CANDIDATES:
        if "skipped" in by_name[name]:
            continue
        assert "error" not in by_name[name], by_name[name]
        assert by_name[name]["steps_timed"] == setup.steps
        assert by_name[name]["mean_step_s"] > 0 and by_name[name]["memory_last_mib"] > 0
    record = json.loads(out.read_text())
    assert record["results"] == results
    assert record["setup"]["algo"] == algo
    assert "vs TRL" in bench.format_table(results)
    if algo.startswith("ppo"):
        assert by_name["trl"] == {"name": "trl", "skipped": "TRL 1.16 has no PPO"}
        assert "error" not in by_name["ours_fast"] and "error" not in by_name["ours_hf"]


def test_online_dpo_setups_pair_the_completions():
    """Online DPO draws two completions per prompt in every preset; the GRPO presets are those of before."""
    bench = _load()
    for preset in (bench.Setup.gpu, bench.Setup.cpu, bench.Setup.smoke):
        assert preset("online_dpo").num_generations == 2 and preset("online_dpo").algo == "online_dpo"
    assert bench.Setup.gpu() == bench.Setup()
    assert (bench.Setup.cpu().prompts_per_step, bench.Setup.cpu().num_generations) == (2, 4)
    assert set(bench.BUILDERS) == set(bench.ALGOS)


def test_rewards_differ_within_a_group():
    """The benchmark's reward gives a group of different completions different scores (non-zero advantages)."""
    bench = _load()
    assert bench.vowel_reward(["aaaa", "abcd", [{"role": "assistant", "content": "xyz"}]]) == [1.0, 0.25, 0.0]
