"""TRL-style runs end to end, in child processes: a run SIGKILLed mid-way and resumed with
``train(resume_from_checkpoint=True)`` gives the uninterrupted run's losses, log history and final weights; the same
script under ``torchrun`` or ``accelerate launch`` on 2 processes gives the 1-process run's first-step loss;
``evaluate``, ``save_model`` and the TRL attributes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lightning_llm.trainers as trainers

SCRIPT = Path(__file__).with_name("_facade_script.py")
pytestmark = pytest.mark.slow


def run(*args: str, launcher: list[str] | None = None, expect_kill: bool = False) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [*(launcher or [sys.executable]), str(SCRIPT), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if expect_kill:
        assert done.returncode == -9, done.stderr[-3000:]
    else:
        assert done.returncode == 0, done.stderr[-3000:]


def history(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


def test_a_killed_run_resumes_exactly(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(str(full))
    run(str(killed), "--kill-at", "5", expect_kill=True)
    assert (killed / "last.ckpt").is_file() and not (killed / "history.json").exists()
    run(str(killed), "--resume")
    ours, theirs = history(killed), history(full)
    losses = lambda h: [(e["step"], e["loss"]) for e in h["log_history"] if "loss" in e]  # noqa: E731
    assert [s for s, _ in losses(theirs)] == [1, 2, 3, 4, 5, 6]
    assert losses(ours) == losses(theirs)  # bitwise: one process on CPU
    assert ours["global_step"] == 6
    weights = load_file(killed / "final" / "model.safetensors")
    reference = load_file(full / "final" / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert sorted(p.name for p in killed.glob("checkpoint-*.ckpt")) == [
        "checkpoint-2.ckpt", "checkpoint-4.ckpt", "checkpoint-6.ckpt"]


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
    # accelerate's --cpu launches one process unless MPI is set up; --multi_gpu is its torch.distributed launcher, which
    # runs on CPU (gloo) where there is no GPU
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                   "29534"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_the_same_script_runs_under_torchrun_and_accelerate_launch(tmp_path, launcher):
    one, two = tmp_path / "one", tmp_path / "two"
    run(str(one), "--batch-size", "8", "--rows", "8", "--dropout", "0")
    run(str(two), "--batch-size", "4", "--rows", "8", "--dropout", "0", launcher=LAUNCHERS[launcher])
    first = lambda h: next(e for e in h["log_history"] if "loss" in e)  # noqa: E731
    # each step holds all 8 rows in both runs (8 x 1 process, 4 x 2), no dropout: the same loss over the same tokens
    assert math.isclose(first(history(two))["loss"], first(history(one))["loss"], rel_tol=1e-5)
    assert first(history(two))["num_tokens"] == first(history(one))["num_tokens"]
    assert (two / "final" / "model.safetensors").is_file()


def test_evaluate_save_model_and_trl_attributes(tmp_path):
    args = trainers.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, logging_steps=1, eval_strategy="steps",
                              eval_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                              use_cpu=True, disable_tqdm=True, save_strategy="no", gradient_checkpointing=False)
    trainer = trainers.DPOTrainer("tiny-llama", args=args, train_dataset="sample:preference",
                                  eval_dataset="sample:preference")
    assert trainer.processing_class is trainer.module.tokenizer and trainer.model is trainer.module.model
    output = trainer.train()
    assert output.global_step == 2 and output.metrics["train_loss"] == output.training_loss
    entries = trainer.state.log_history
    assert [e["step"] for e in entries if "loss" in e] == [1, 2]
    evals = [e for e in entries if "eval_loss" in e]
    assert len(evals) == 1 and evals[0]["step"] == 2 and "eval_rewards/margins" in evals[0]
    assert "train_runtime" in entries[-1] and not (tmp_path / "dpo" / "last.ckpt").exists()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(evals[0]["eval_loss"], rel=1e-6)  # same weights, same rows
    assert trainer.state.log_history[-1]["eval_loss"] == metrics["eval_loss"]
    saved = trainer.save_model(tmp_path / "saved")
    assert (saved / "model.safetensors").is_file() and (saved / "tokenizer_config.json").is_file()
    assert (tmp_path / "dpo" / "final" / "config.json").is_file() and (tmp_path / "dpo" / "metrics.csv").is_file()
    with pytest.raises(ValueError, match="holds no last.ckpt"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        trainers.SFTTrainer("tiny-llama", args=trainers.SFTConfig(output_dir=str(tmp_path / "sft")),
                            train_dataset="sample:messages").evaluate()
