"""``lightning-llm`` (LightningCLI): YAML configs fit and round-trip for every offline algorithm."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_llm.cli import LLMCLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = sorted(p for p in CONFIGS.glob("*/tiny.yaml"))


def _fast(tmp_path: Path, steps: int = 2) -> list[str]:
    return [
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
    ]


def test_every_algorithm_has_a_tiny_and_a_hub_config():
    algos = {p.parent.name for p in TINY}
    assert {"sft", "reward", "dpo", "orpo", "cpo", "kto", "bco", "prm", "grpo", "rloo", "online_dpo", "xpo"} <= algos
    for algo in algos:
        hub = CONFIGS / algo / "qwen2.5-0.5b.yaml"
        assert hub.is_file(), hub
        assert "NEEDS THE HUGGING FACE HUB" in hub.read_text()


@pytest.mark.parametrize("config", TINY, ids=lambda p: p.parent.name)
def test_tiny_config_fits_and_a_short_run_leaves_everything(config, tmp_path):
    """5 steps, fewer than any of the recipe's intervals: still a last.ckpt, every step's metrics and an export."""
    args = [a for a in _fast(tmp_path, steps=5) if "logger" not in a and "checkpointing" not in a
            and "val_check" not in a]
    cli = LLMCLI(args=["fit", "--config", str(config), *args])
    trainer = cli.trainer
    assert trainer.global_step == 5
    expected = yaml.safe_load(config.read_text())["model"]["class_path"].rsplit(".", 1)[-1]
    assert type(cli.model).__name__ == expected
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["loss"])))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert sorted({int(r["step"]) for r in rows if r.get("loss")}) == [0, 1, 2, 3, 4]
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard is a dev dependency


@pytest.mark.slow
def test_the_console_of_a_run_is_quiet(tmp_path):
    """No adverts, deprecation notices, eval-mode warnings or second progress bars from our own runs."""
    out = subprocess.run(
        [sys.executable, "-m", "lightning_llm.cli", "fit", "--config", str(CONFIGS / "dpo" / "tiny.yaml"),
         "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu"],
        capture_output=True, text=True, check=True,
    )
    console = out.stdout + out.stderr
    for noise in ("Tip:", "litlogger", "tensorboardX", "deprecated", "eval mode at the start", "Writing model shards"):
        assert noise not in console, noise
    assert "max_steps=3" in console and "loss" in console  # the run's own output is there


@pytest.mark.slow
def test_print_config_round_trips(tmp_path):
    config = CONFIGS / "sft" / "tiny.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "lightning_llm.cli", "fit", "--config", str(config), "--model.init_args.loss_type=dft",
         "--print_config"], capture_output=True, text=True, check=True,
    )
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["init_args"]["loss_type"] == "dft"
    assert printed["data"]["init_args"]["train_data"] == "sample:messages"
    # the printed config is itself a valid config: fit from it
    saved = tmp_path / "printed.yaml"
    saved.write_text(out.stdout)
    cli = LLMCLI(args=["fit", "--config", str(saved), *_fast(tmp_path, steps=1)])
    assert cli.model.loss_type == "dft"
    assert cli.trainer.global_step == 1


def test_short_class_names_and_tokenizer_override(tmp_path):
    cli = LLMCLI(args=[
        "fit", "--model", "DPOModule", "--model.model=tiny-qwen2", "--data", "PreferenceDataModule",
        "--data.train_data=sample:preference_standard", "--data.batch_size=2", "--data.max_length=64",
        "--data.tokenizer=tiny-qwen2", *_fast(tmp_path, steps=1),
    ])
    assert type(cli.model).__name__ == "DPOModule"
    assert cli.datamodule.tokenizer is not cli.model.tokenizer  # overridden, not taken from the module


def test_data_takes_the_module_tokenizer_by_default(tmp_path):
    cli = LLMCLI(args=["fit", "--config", str(CONFIGS / "sft" / "tiny.yaml"), *_fast(tmp_path, steps=1)])
    assert cli.datamodule.tokenizer is cli.model.tokenizer


@pytest.mark.slow
def test_bad_argument_is_reported(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lightning_llm.cli", "fit", "--config", str(CONFIGS / "dpo" / "tiny.yaml"),
         "--model.init_args.loss_type=not_a_loss", *_fast(tmp_path)], capture_output=True, text=True,
    )
    assert out.returncode != 0
    assert "not_a_loss" in out.stderr


@pytest.mark.slow
def test_validate_from_a_checkpoint(tmp_path):
    config = str(CONFIGS / "sft" / "tiny.yaml")
    fast = [a for a in _fast(tmp_path, steps=2) if "enable_checkpointing" not in a]
    fit = LLMCLI(args=["fit", "--config", config, *fast])
    checkpoint = fit.trainer.checkpoint_callback.best_model_path or fit.trainer.checkpoint_callback.last_model_path
    assert checkpoint
    validated = LLMCLI(args=["validate", "--config", config, *fast, f"--ckpt_path={checkpoint}"])
    fitted_weights = fit.model.model.state_dict()
    for name, value in validated.model.model.state_dict().items():
        assert torch.equal(value, fitted_weights[name]), name
    assert "val/loss" in validated.trainer.callback_metrics


@pytest.mark.slow
def test_test_and_predict_from_a_fit_checkpoint(tmp_path):
    """`test` evaluates test_data like validation (metrics under test/, in their own metrics.csv); `predict` writes
    one JSON line per prompt: a `prompt` column, or a conversation up to its last assistant turn."""
    sft = str(CONFIGS / "sft" / "tiny.yaml")
    common = [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
              "--trainer.accelerator=cpu"]
    LLMCLI(args=["fit", "--config", sft, "--trainer.max_steps=3", *common])
    fit_rows = (tmp_path / "metrics.csv").read_text()
    last = str(tmp_path / "checkpoints" / "last.ckpt")

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join((Path(__file__).resolve().parents[2] / "lightning_llm/assets/data/messages.jsonl")
                              .read_text().splitlines()[:12]) + "\n")
    cli = LLMCLI(args=["test", "--config", sft, f"--data.init_args.test_data={rows}",
                       f"--ckpt_path={last}", *common])
    metrics = cli.trainer.callback_metrics
    assert {"test/loss", "test/entropy", "test/mean_token_accuracy"} <= set(metrics)
    assert torch.isfinite(metrics["test/loss"])
    assert "test/loss" in (tmp_path / "test" / "metrics.csv").read_text()
    assert (tmp_path / "metrics.csv").read_text() == fit_rows  # the training metrics are left alone

    LLMCLI(args=["predict", "--config", sft, f"--data.init_args.predict_data={rows}",
                 "--model.init_args.generation_kwargs={max_new_tokens: 6}", f"--ckpt_path={last}", *common])
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    conversations = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(len(conversations)))
    for line, row in zip(lines, conversations):
        last_assistant = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        assert line["prompt"] == row["messages"][:last_assistant]
        assert isinstance(line["completion"], str)
    assert any(line["completion"].strip() for line in lines)


def test_every_wrong_value_of_a_config_is_listed(tmp_path, capsys):
    from lightning_llm.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text(
        "trainer:\n  max_steps: many\n"
        "model:\n  class_path: lightning_llm.SFTModule\n  init_args:\n    model: tiny-llama\n    learning_rate: fast\n"
        "data:\n  class_path: lightning_llm.SFTDataModule\n  init_args:\n    train_data: sample:messages\n"
        "    batch_size: eight\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the configuration has 3 wrong values" in err
    for line in ("model.init_args.learning_rate: Expected a <class 'float'>. Got value: fast",
                 "data.init_args.batch_size: Expected a <class 'int'>. Got value: eight",
                 "trainer.max_steps: Expected a <class 'int'>. Got value: many"):
        assert line in err


@pytest.mark.parametrize("override, words", [
    ("--model.init_args.model=./no-such-model", "model: no such directory:"),
    ("--model.init_args.model=tiny-lama", "model: unknown preset 'tiny-lama'; did you mean 'tiny-llama'?"),
    ("--model.init_args.warmup_steps=-5", "warmup_steps must be >= 0, got -5"),
])
def test_an_error_is_one_clear_line_with_the_trace_in_a_file(tmp_path, capsys, monkeypatch, override, words):
    from lightning_llm.cli import DEBUG_ENV, main

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "sft" / "tiny.yaml"), override, *_fast(tmp_path, steps=1)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    message = next(line for line in err if line.startswith("error:"))
    assert words in message and "Traceback" not in "\n".join(err)
    trace = Path(re.search(r"traceback in (\S+);", err[-1]).group(1))
    assert "Traceback" in trace.read_text()
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match=re.escape(words)):
        main(["fit", "--config", str(CONFIGS / "sft" / "tiny.yaml"), override, *_fast(tmp_path, steps=1)])


@pytest.mark.parametrize("strategy", sorted((CONFIGS / "strategy").glob("*.yaml")), ids=lambda p: p.stem)
def test_strategy_configs_combine_with_a_recipe(strategy, capsys):
    assert {"ddp", "fsdp", "fsdp2", "deepspeed_stage_2", "deepspeed_stage_3"} <= {
        p.stem for p in (CONFIGS / "strategy").glob("*.yaml")}
    with pytest.raises(SystemExit) as exit_info:
        LLMCLI(args=["fit", "--config", str(CONFIGS / "dpo" / "tiny.yaml"), "--config", str(strategy),
                     "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    given = yaml.safe_load(strategy.read_text())["trainer"]["strategy"]
    if isinstance(given, str):
        assert printed == given
    else:  # the class and every given argument (a wrong argument would silently leave the strategy at "auto")
        assert printed["class_path"] == given["class_path"]
        assert given["init_args"].items() <= printed["init_args"].items()
