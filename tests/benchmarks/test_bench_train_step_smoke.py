"""The end-to-end training-step benchmark keeps working: its smoke mode runs every candidate on CPU."""

from __future__ import annotations

import pytest
from helpers import load_benchmark


def _load():
    return load_benchmark("bench_train_step")


@pytest.mark.slow
def test_smoke_runs_ours_and_trl(tmp_path):
    bench = _load()
    out = tmp_path / "train_step.json"
    results = bench.main(["--smoke", "--candidates", "ours_sft", "ours_sft_fused", "ours_dpo", "ours_dpo_nokernel",
                          "trl_dpo", "--warmup", "1", "--steps", "1", "--out", str(out)])
    by_name = {r["name"]: r for r in results}
    for name in ("ours_sft", "ours_sft_fused", "ours_dpo", "ours_dpo_nokernel"):
        assert "error" not in by_name[name], by_name[name]
        assert by_name[name]["tokens_per_s"] > 0
        assert by_name[name]["steps_timed"] == 1
    # DPO feeds chosen and rejected through the policy: twice the prompt plus a completion per example
    setup = bench.Setup.tiny()
    per_sequence = setup.prompt_tokens + setup.completion_tokens
    assert by_name["ours_dpo"]["tokens_per_step"] == pytest.approx(2 * setup.batch_size * per_sequence, rel=0.1)
    if "skipped" not in by_name["trl_dpo"]:
        # the same rows, tokenized by TRL, give the same number of tokens per step
        assert by_name["trl_dpo"]["tokens_per_step"] == by_name["ours_dpo"]["tokens_per_step"]
    assert out.is_file()


def test_rows_are_single_token_words():
    bench = _load()
    from lightning_llm.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    setup = bench.Setup.tiny()
    sft_rows, dpo_rows = bench.make_rows(setup, tokenizer)
    assert len(sft_rows) == setup.batch_size * (setup.warmup + setup.steps)
    assert len(tokenizer(dpo_rows[0]["prompt"])["input_ids"]) == setup.prompt_tokens
    assert len(tokenizer(dpo_rows[0]["chosen"])["input_ids"]) == setup.completion_tokens - 1
