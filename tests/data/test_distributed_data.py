"""Data on 2 CPU processes (DDP, gloo): the reference precompute is sharded and cached; a stream is shared out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "_ddp_data_script.py"

pytestmark = pytest.mark.slow


def run_script(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def ranks(tmp_path: Path, out: str, world_size: int) -> list[dict]:
    return [json.loads((tmp_path / f"{out}.rank{r}.json").read_text()) for r in range(world_size)]


def test_reference_precompute_is_sharded_gathered_and_cached(tmp_path):
    """2 processes give the log-probs of 1 process; rank 0 prepares the rows and rank 1 loads them from the cache;
    each row is scored once in all; a second run loads both caches."""
    run_script(tmp_path, "precompute", "one", "--devices", "1", "--cache", str(tmp_path / "cache1"))
    run_script(tmp_path, "precompute", "two", "--devices", "2", "--cache", str(tmp_path / "cache2"))
    (one,) = ranks(tmp_path, "one", 1)
    two = ranks(tmp_path, "two", 2)
    n = one["rows"]
    assert one["scored"] == n > 100
    assert sum(rank["scored"] for rank in two) == n and all(rank["scored"] > 0 for rank in two)
    # prepare_data tokenizes on rank 0 (a cold cache); rank 1 loads what it wrote
    assert two[0]["encoded"] >= n and two[1]["encoded"] == 0
    for rank in two:
        assert rank["chosen"] == pytest.approx(one["chosen"], abs=1e-5)
        assert rank["rejected"] == pytest.approx(one["rejected"], abs=1e-5)
    assert len(set(one["chosen"])) > n // 2  # real, distinct log-probs

    run_script(tmp_path, "precompute", "again", "--devices", "2", "--cache", str(tmp_path / "cache2"))
    again = ranks(tmp_path, "again", 2)
    assert [rank["scored"] for rank in again] == [0, 0]
    assert [rank["encoded"] for rank in again] == [0, 0]
    for rank in again:
        assert rank["chosen"] == two[0]["chosen"] and rank["rejected"] == two[0]["rejected"]


def test_a_stream_is_shared_out_and_a_bad_row_is_named(tmp_path):
    """31 streamed rows, batch 2, 2 processes: every row trained on once, by one process, in equal step counts (the
    last 3 rows split 1 + 2); a stream whose row 17 is bad fails on both processes naming row 17."""
    run_script(tmp_path, "stream", "ok", "--devices", "2", "--rows", "31")
    out = ranks(tmp_path, "ok", 2)
    seen = [row for rank in out for batch in rank["batches"] for row in batch]
    assert sorted(seen) == list(range(31))
    assert out[0]["steps"] == out[1]["steps"] == len(out[0]["batches"]) == 8
    assert out[0]["batches"][0] == [0, 1] and out[1]["batches"][0] == [2, 3]

    failed = run_script(tmp_path, "stream", "bad", "--devices", "2", "--rows", "31", "--bad", "17", check=False)
    assert failed.returncode != 0
    message = "train_data: row 17, column 'text': expected a string, got int"
    assert failed.stderr.count(f"ValueError: {message}") >= 2  # raised on both processes
