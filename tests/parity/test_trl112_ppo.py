"""PPOModule against TRL 1.12.0's PPOTrainer (the last TRL with PPO), through the fixture that
``tests/parity/trl112/record_ppo.py`` recorded (its docstring says how to regenerate it and with which versions).

Both sides train the committed tiny-llama policy with the committed one-label tiny classifier as the reward model and
the value model's start, on the same prompts drawn in the same order (two rollouts of four), the same fixed
completions, two PPO epochs per rollout, plain SGD. Compared per rollout: every metric TRL 1.12 logs (``objective/*``,
``policy/*``, ``loss/*``, ``val/*``) within 1e-4 relative; per optimizer step, every parameter's gradient (policy and
value model: norm, sum, projection on a seeded random direction).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import StepMetrics, constant_lr, quiet_trainer, sample_rows, sgd
from lightning import Callback

from lightning_llm import PPOModule, PromptDataModule
from lightning_llm.models import tiny_tokenizer
from lightning_llm.rollout import FixedRollouts

HERE = Path(__file__).resolve().parent / "trl112"
FIXTURE = json.loads((HERE / "ppo.json").read_text())
NOT_COMPARED = {"eps", "lr", "episode", "epoch", "step"}  # TRL's bookkeeping


def _recorder():
    spec = importlib.util.spec_from_file_location("record_ppo", HERE / "record_ppo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECORD = _recorder()


class Grab(Callback):
    """Each optimizer step's gradients under TRL's parameter names."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {}
        for prefix, model in (("policy.", pl_module.model), ("value_model.", pl_module.value_model)):
            for name, param in model.named_parameters():
                if param.grad is not None:
                    grads[prefix + name] = param.grad.detach().double().clone()
        self.grads.append(grads)


@pytest.mark.parametrize("case", sorted(FIXTURE["cases"]))
def test_ppo_matches_trl_1_12(case):
    recorded = FIXTURE["cases"][case]
    eos = tiny_tokenizer().eos_token_id
    rows = sample_rows("prompt_only")
    drawn = [rows[i] for rollout in recorded["rollouts"] for i in rollout]
    settings = recorded["settings"]
    module = PPOModule(str(RECORD.POLICY_DIR), tiny_tokenizer(), reward_model=str(RECORD.REWARD_DIR),
                       rollout=FixedRollouts(lambda prompts: [RECORD.fixed_completion(list(p), eos) for p in prompts]),
                       max_completion_length=FIXTURE["max_completion"], temperature=FIXTURE["temperature"],
                       num_mini_batches=1, gradient_accumulation_steps=1, max_grad_norm=None,
                       optimizer=sgd(FIXTURE["lr"]), scheduler=constant_lr, **settings)
    metrics, grab = StepMetrics(), Grab()
    steps = len(recorded["steps"])
    quiet_trainer(max_steps=steps, callbacks=[metrics, grab]).fit(
        module, PromptDataModule(drawn, batch_size=FIXTURE["prompts_per_rollout"], shuffle=False))

    assert len(metrics.logged) == len(recorded["metrics"]) == 2
    for ours, theirs in zip(metrics.logged, recorded["metrics"]):
        for name, value in theirs.items():
            if name not in NOT_COMPARED:
                assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert len(grab.grads) == steps
    for ours, theirs in zip(grab.grads, recorded["steps"]):
        assert ours.keys() == theirs.keys()
        for name, stats in theirs.items():
            g = ours[name]
            assert g.norm().item() == pytest.approx(stats["norm"], rel=1e-4, abs=1e-7), name
            # a sum can cancel to rounding noise (the LM head's rows sum to zero): its tolerance scales with the norm
            slack = 1e-5 * stats["norm"] + 1e-7
            assert g.sum().item() == pytest.approx(stats["sum"], rel=1e-3, abs=slack), name
            projection = (g.flatten() * RECORD.probe(g.numel())).sum().item()
            assert projection == pytest.approx(stats["projection"], rel=1e-3, abs=slack), name
