"""The offline demo runs end to end (tiny step counts) and writes what the README promises."""

from __future__ import annotations

import json

import pytest

from lightning_llm.demo import DemoSettings, main, run


@pytest.mark.slow
def test_demo_writes_checkpoints_exports_curves_and_summary(tmp_path, capsys):
    settings = DemoSettings(sft_steps=4, reward_steps=3, dpo_steps=3, num_samples=4)
    summary = run(str(tmp_path), settings)
    for stage in ("sft", "reward", "dpo"):
        assert (tmp_path / stage / "checkpoints" / "last.ckpt").is_file()
        assert (tmp_path / stage / "hf" / "config.json").is_file()
        assert (tmp_path / stage / "metrics.csv").is_file()
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["comparison"] == summary["comparison"]
    assert saved["comparison"]["questions"] == 4
    assert "loss" in saved["sft"] and "val/accuracy" in saved["reward"] and "rewards/margins" in saved["dpo"]
    printed = capsys.readouterr().out
    assert "exact answers SFT" in printed and "the reward model prefers the DPO answer" in printed


def test_demo_command_line_sets_every_setting(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("lightning_llm.demo.run", lambda out, settings: seen.update(out=out, settings=settings))
    main(["--output-dir", str(tmp_path), "--sft-steps", "7", "--dpo-lr", "0.001", "--dpo-sft-weight", "0"])
    assert seen["out"] == str(tmp_path)
    assert seen["settings"] == DemoSettings(sft_steps=7, dpo_lr=0.001, dpo_sft_weight=0.0)
