"""The offline demo runs end to end (tiny step counts) and writes what the README promises."""

from __future__ import annotations

import json

import pytest

from lightning_llm.demo import DemoSettings, main, run


@pytest.mark.slow
def test_demo_writes_checkpoints_exports_curves_and_summary(tmp_path, capsys):
    settings = DemoSettings(sft_steps=4, reward_steps=3, dpo_steps=3, num_samples=4, grpo_steps=3, num_generations=2,
                            grpo_questions=4)
    summary = run(str(tmp_path), settings)
    for stage in ("sft", "reward", "dpo", "grpo"):
        assert (tmp_path / stage / "checkpoints" / "last.ckpt").is_file()
        assert (tmp_path / stage / "hf" / "config.json").is_file()
        assert (tmp_path / stage / "metrics.csv").is_file()
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["comparison"] == summary["comparison"]
    assert saved["comparison"]["questions"] == 4
    assert "loss" in saved["sft"] and "val/accuracy" in saved["reward"] and "rewards/margins" in saved["dpo"]
    assert "reward" in saved["grpo"] and "val/reward" in saved["grpo"]
    grpo = saved["comparison"]["grpo"]
    assert grpo["trained"]["questions"] == 4 and grpo["held_out"]["questions"] == 26
    for side in ("before", "after"):
        assert 0 <= grpo["trained"][side]["sampled"] <= 1 and 0 <= grpo["held_out"][side]["greedy"] <= 26
    printed = capsys.readouterr().out
    assert "exact answers SFT" in printed and "the reward model prefers the DPO answer" in printed
    assert "GRPO, 4 trained questions" in printed and "Answer accuracy on the questions GRPO trained on" in printed


def test_sampled_gain_and_its_noise():
    """Two standard errors of a difference of two binomial shares, by hand: p=0.5 and 0.6 over 100 answers each."""
    from lightning_llm.demo import sampled_gain

    gain, noise = sampled_gain({"sampled": 0.5}, {"sampled": 0.6}, 100)
    assert gain == pytest.approx(0.1)
    assert noise == pytest.approx(2 * (0.25 / 100 + 0.24 / 100) ** 0.5)


def test_exact_answer_reward_reads_the_last_word():
    from lightning_llm.demo import exact_answer_reward

    completions = ["The capital of France is Paris.", [{"role": "assistant", "content": "3 plus 4 is 7"}], "Paris is"]
    assert exact_answer_reward(completions, solution=["paris", "7", "Paris"]) == [1.0, 1.0, 0.0]


def test_demo_command_line_sets_every_setting(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("lightning_llm.demo.run", lambda out, settings: seen.update(out=out, settings=settings))
    main(["--output-dir", str(tmp_path), "--sft-steps", "7", "--dpo-lr", "0.001", "--dpo-sft-weight", "0"])
    assert seen["out"] == str(tmp_path)
    assert seen["settings"] == DemoSettings(sft_steps=7, dpo_lr=0.001, dpo_sft_weight=0.0)
