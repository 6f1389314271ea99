"""The rollout benchmark keeps working: its smoke mode runs every CPU candidate."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


def _load():
    return load_benchmark("bench_rollout")


@pytest.mark.slow
def test_smoke_runs_every_cpu_candidate(tmp_path):
    bench = _load()
    out = tmp_path / "rollout.json"
    results = bench.main(["--smoke", "--candidates", "hf_generate", "hf_generate_static", "engine_hf", "engine_fast",
                          "engine_fast_static", "engine_fast_nolean", "--out", str(out)])
    by_name = {r["name"]: r for r in results}
    assert "skipped" in by_name["hf_generate_static"]  # CUDA only
    setup = bench.Setup.smoke()
    for name in ("hf_generate", "engine_hf", "engine_fast", "engine_fast_static", "engine_fast_nolean"):
        assert "error" not in by_name[name], by_name[name]
        # EOS never occurs: every call generates exactly new_tokens per prompt
        assert by_name[name]["tokens_per_call"] == setup.batch_sizes[0] * setup.new_tokens
        assert by_name[name]["tokens_per_s"] > 0 and by_name[name]["memory_call_last_mib"] > 0
    assert json.loads(out.read_text())["results"] == results
    assert "vs HF" in bench.format_table(results)
