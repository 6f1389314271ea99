"""Exact resume after a crash: a run SIGKILLed at a micro-batch and resumed from its last checkpoint trains on the
same batches, logs the same loss at every step and ends with the same weights (and callback states) as the run that
was never interrupted, bitwise on CPU.

Each case (``_resume_script.py``'s ``CASES``) runs three child processes: uninterrupted, killed, resumed. The online
algorithms add their cases (generation buffers, samplers) to the same script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "_resume_script.py"

pytestmark = pytest.mark.slow

#: case -> the micro-batch (optimizer step, micro-batch within it) at which the run is killed, and why it is there
KILLS = {
    "sft_accumulate": ((7, 1), "mid gradient accumulation, in the epoch after a checkpoint at an epoch's last batch"),
    "sft_epochs": ((5, 0), "an epoch-bounded run, whose schedule length is counted from the data"),
    "sft_log_window": ((13, 0), "inside a logging window: the window's metric sums were in the checkpoint"),
    "sft_stream": ((7, 0), "a shuffled stream, mid-epoch: the stream continues at the right row"),
    "dpo_epoch_boundary": ((8, 0), "right at an epoch boundary (the checkpoint is the previous epoch's last step)"),
    "kto_accumulate": ((4, 1), "mid gradient accumulation, mid-epoch"),
    "bco": ((5, 0), "mid-epoch, with BCO's running reward mean"),
    "grpo_mid_generation": ((3, 1), "mid generation batch: the buffer and the sampler position come back"),
    "rloo_mid_generation": ((4, 0), "between the two passes over a generation batch"),
    "online_dpo_accumulate": ((4, 1), "mid gradient accumulation, after the epoch's beta changed"),
    "xpo_accumulate": ((4, 1), "mid gradient accumulation, after the epoch's alpha and beta changed"),
    "nash_md_accumulate": ((4, 1), "mid gradient accumulation, after the epoch's beta and mixture_coef changed"),
    "ppo_between_rollouts": ((10, 0), "at a rollout after a checkpoint: value model, optimizer and schedule continue"),
}


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def trace(path: Path) -> tuple[dict, dict]:
    """Per-step records and per-micro-batch records of a run (a resumed run's later records replace its first)."""
    steps, batches = {}, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        kind = record.pop("kind")
        if kind == "step":
            steps[record["step"]] = record
        elif kind == "rollout":  # what an online module trained on for that batch
            batches[("rollout", record["epoch"], record["batch"])] = record
        else:
            batches[(record["step"], record["micro"])] = record
    return steps, batches


def assert_same_state(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("case", list(KILLS))
def test_a_killed_run_resumes_exactly(tmp_path, case):
    (step, micro), _ = KILLS[case]
    full = run(tmp_path, case, "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run(tmp_path, case, "killed", "--kill", f"{step}:{micro}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = [int(p.stem.split("step=")[1]) for p in (tmp_path / "killed" / "checkpoints").glob("epoch=*.ckpt")]
    assert saved and max(saved) <= step  # resuming repeats what the kill lost since the last checkpoint
    resumed = run(tmp_path, case, "killed", "--resume", str(tmp_path / "killed" / "checkpoints" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    full_steps, full_batches = trace(tmp_path / "full" / "trace.jsonl")
    steps, batches = trace(tmp_path / "killed" / "trace.jsonl")
    assert batches == full_batches  # the same token ids in every micro-batch, in the same epoch
    assert steps == full_steps  # the same logged loss (bitwise) at every step
    # no two steps log the same metrics (on-policy GRPO/RLOO losses are zero up to rounding: their other metrics differ)
    logged = {tuple(sorted((k, v) for k, v in s.items() if k != "step")) for s in full_steps.values()}
    assert len(full_steps) >= 8 and len(logged) == len(full_steps)
    assert_same_state(torch.load(tmp_path / "full" / "final.pt"), torch.load(tmp_path / "killed" / "final.pt"))
