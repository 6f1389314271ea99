"""HFGenerateEngine on an FSDP2-, an FSDP1- and a ZeRO-3-sharded model in two CPU processes: synced ranks, the
unsharded model's tokens. (The ZeRO-3 case needs ``deepspeed``, which is not a dependency: it is skipped without it.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_sharded_generation_with_synced_ranks_equals_the_unsharded_model(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "sharded_generate_script.py"), str(_free_port()), str(out)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(out.read_text())
    for report in reports:
        assert report["got"] == report["expected"], report["rank"]
        assert report["again"] == report["expected"], report["rank"]
        assert "use HFGenerateEngine" in report["fast_refused"]
        assert report["fsdp1"] == report["expected"], report["rank"]
        assert report["fsdp1_root_sharded"]  # the root's own flat parameter really was a shard
    # the ranks really finished at different lengths (what synced_gpus is for)
    longest = [max(len(ids) for ids in report["got"]) for report in reports]
    assert longest[1] == 2 and longest[0] > 2


@pytest.mark.slow
def test_zero3_generation_with_gathered_parameters_equals_the_unpartitioned_model(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "report.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "zero3_generate_script.py"), str(_free_port()), str(out)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for report in json.loads(out.read_text()):
        assert report["partitioned"], report["rank"]  # every parameter was an empty ZeRO-3 partition
        assert report["got"] == report["expected"], report["rank"]
