from __future__ import annotations

import copy
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from callback_helpers import PolicySnapshots, RefSFTModule, float64_state, sft_data
from helpers import quiet_trainer

from lightning_llm import SFTModule, SyncRefModelCallback
from lightning_llm.callbacks import sync_reference
from lightning_llm.models.loading import load_model
from lightning_llm.models.peft import apply_peft

HERE = Path(__file__).parent


def _two_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A policy and a reference of the same architecture with different weights (presets are seeded alike)."""
    policy = load_model("tiny-llama")
    reference = load_model("tiny-llama")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn(param.shape, generator=generator))
    return reference, policy


def _mixed(reference: dict, policy: dict, alpha: float) -> dict:
    return {name: (1.0 - alpha) * reference[name] + alpha * policy[name] for name in reference}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_sync_reference_mixes_every_parameter(alpha):
    reference, policy = _two_models()
    ref_before, policy_before = float64_state(reference), float64_state(policy)
    assert any(not torch.equal(ref_before[n], policy_before[n]) for n in ref_before)

    sync_reference(reference, policy, alpha)

    expected = _mixed(ref_before, policy_before, alpha)
    for name, value in float64_state(reference).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    for name, value in float64_state(policy).items():
        assert torch.equal(value, policy_before[name]), f"the policy changed: {name}"


def test_sync_reference_errors():
    reference, policy = _two_models()
    with pytest.raises(ValueError, match="alpha"):
        sync_reference(reference, policy, 1.5)
    with pytest.raises(ValueError, match="ref_model is None"):
        sync_reference(None, policy, 0.5)
    lora_policy = apply_peft(copy.deepcopy(policy), {"r": 2, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="same parameters"):
        sync_reference(reference, lora_policy, 0.5)
    with pytest.raises(ValueError, match="sync_steps"):
        SyncRefModelCallback(sync_steps=0)
    with pytest.raises(ValueError, match="alpha"):
        SyncRefModelCallback(alpha=-0.1)


@pytest.mark.parametrize("peft", [False, True])
def test_callback_refuses_modules_without_a_separate_reference(peft):
    kwargs = {"peft_config": {"r": 2, "target_modules": ["q_proj"]}} if peft else {}
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[SyncRefModelCallback(sync_steps=1)])
    with pytest.raises(ValueError, match="separate reference model"):
        trainer.fit(SFTModule("tiny-llama", **kwargs), sft_data())


def test_callback_syncs_every_n_steps_during_fit():
    torch.manual_seed(0)
    module = RefSFTModule("tiny-llama", learning_rate=1e-2)
    snapshots = PolicySnapshots()
    trainer = quiet_trainer(max_steps=5, limit_val_batches=0, accumulate_grad_batches=2,
                            callbacks=[snapshots, SyncRefModelCallback(sync_steps=2, alpha=0.25)])
    trainer.fit(module, sft_data(batch_size=4))

    # The reference starts as the initial policy and is mixed at steps 2 and 4 only (not at 5).
    expected = snapshots.by_step[0]
    for step in (2, 4):
        expected = _mixed(expected, snapshots.by_step[step], 0.25)
    for name, value in float64_state(module.ref_model).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    assert not any(p.requires_grad for p in module.ref_model.parameters())


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_mixed_references(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("MASTER_PORT", None)
    result = subprocess.run([sys.executable, str(HERE / "ddp_sync_ref_script.py"), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for name, value in ranks[0]["ref"].items():
        assert torch.equal(value, ranks[1]["ref"][name]), f"ranks disagree on {name}"
    policy = ranks[0]["policy"]
    expected = _mixed(_mixed(policy[0], policy[2], 0.5), policy[4], 0.5)
    for name, value in ranks[0]["ref"].items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(policy[4]["model.embed_tokens.weight"], policy[0]["model.embed_tokens.weight"])

    # Completions were generated in two shares (2 + 1 padded) and gathered back in prompt order.
    with open(tmp_path / "logs" / "version_0" / "completions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["4", "4", "4"]
    assert rows[0]["prompt"] == "The sky is" and rows[2]["prompt"] == "One, two,"
    assert "Name a colour." in rows[1]["prompt"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_sharded_parameters_mix_and_gather_exactly(tmp_path):
    out_file = tmp_path / "ok"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(HERE / "fsdp2_sync_script.py"), str(_free_port()), str(out_file)],
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert out_file.read_text() == "ok"


def test_dpo_module_syncs_its_reference_itself():
    from lightning_llm import DPOModule, PreferenceDataModule

    module = DPOModule("tiny-llama", learning_rate=1e-2, sync_ref_model=True, ref_model_sync_steps=2,
                       ref_model_mixup_alpha=0.5)
    snapshots = PolicySnapshots()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[snapshots])
    trainer.fit(module, PreferenceDataModule("sample:preference", val_split=0.1, batch_size=4, max_length=64))

    assert not any(isinstance(cb, SyncRefModelCallback) for cb in trainer.callbacks)  # the module knows no callback
    expected = _mixed(snapshots.by_step[0], snapshots.by_step[2], 0.5)
    for name, value in float64_state(module.ref_model).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(expected["model.embed_tokens.weight"], snapshots.by_step[0]["model.embed_tokens.weight"])
