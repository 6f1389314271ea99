"""NashMDModule against TRL 1.13.0's NashMDTrainer (the last TRL with Nash-MD), through the fixture that
``tests/parity/trl113/record_nash_md.py`` recorded (its docstring says how to regenerate it and with which versions).

Both sides train the committed tiny-llama weights for two SGD steps on the same four prompts, with the same fixed
completions (the policy's and the mixture's, replayed here from the fixture) and the same rule reward. Compared at
both steps: the loss and every metric TRL 1.13 logs (``loss/score``, ``loss/kl``, ``objective/entropy``,
``rewards/*``, ``logps/*``, ``val/*_contain_eos_token``, ``beta``, ``mixture_coef``) within 1e-4 relative, and every
parameter's gradient (norm, sum, projection on a seeded random direction, one whole matrix). The second step is off
the reference, so the KL term is compared with a non-zero value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import StepMetrics, constant_lr, quiet_trainer, sample_rows, sgd
from lightning import Callback

from lightning_llm.data.prompts import PromptDataModule
from lightning_llm.modules.nash_md import NashMDModule
from lightning_llm.rollout import FixedRollouts

HERE = Path(__file__).resolve().parent / "trl113"
FIXTURE = json.loads((HERE / "nash_md.json").read_text())
NOT_COMPARED = {"grad_norm", "learning_rate", "epoch", "step"}  # Lightning's own bookkeeping


def probe(size: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)


def rule_reward(completion_ids, **kwargs):
    return [(sum(ids) % 11) / 10.0 for ids in completion_ids]


class Replay:
    """A FixedRollouts callable: NashMDModule asks for the policy's completions, then the mixture's."""

    def __init__(self, completions: dict[str, list[int]]) -> None:
        self.completions = completions
        self.calls = 0

    def __call__(self, prompt_ids):
        source = self.calls % 2
        self.calls += 1
        return [self.completions[json.dumps([list(ids), source])] for ids in prompt_ids]


class Grab(Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().double().clone() for n, p in pl_module.model.named_parameters()
                           if p.grad is not None})


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("case", sorted(FIXTURE["cases"]))
def test_nash_md_matches_trl_1_13(case):
    recorded = FIXTURE["cases"][case]
    settings = recorded["settings"]
    module = NashMDModule(str(HERE / "tiny-llama"), tokenizer="tiny-llama", reward_funcs=[rule_reward],
                          rollout=FixedRollouts(Replay(recorded["completions"])),
                          max_completion_length=FIXTURE["max_completion"], optimizer=sgd(FIXTURE["lr"]),
                          scheduler=constant_lr, **settings)
    metrics, grab = StepMetrics(), Grab()
    everything = sample_rows("prompt_only")
    rows = [everything[i] for i in FIXTURE["rows"]]
    quiet_trainer(max_steps=2, callbacks=[metrics, grab]).fit(
        module, PromptDataModule(rows, batch_size=2 * FIXTURE["prompts"], seed=42))

    assert len(metrics.logged) == len(recorded["steps"]) == 2
    for step, (ours, theirs) in enumerate(zip(metrics.logged, recorded["steps"]), start=1):
        names = sorted(set(theirs["metrics"]) - NOT_COMPARED)
        missing = [n for n in names if n not in ours]
        assert not missing, f"step {step}: we do not log {missing}"
        bad = {n: (ours[n], theirs["metrics"][n]) for n in names if not close(ours[n], theirs["metrics"][n])}
        assert not bad, f"step {step}: ours vs TRL 1.13: {bad}"
        grads = grab.grads[step - 1]
        assert grads.keys() == theirs["grads"].keys()
        for name, expected in theirs["grads"].items():
            g = grads[name].flatten()
            got = {"norm": g.norm().item(), "sum": g.sum().item(), "projection": (g * probe(g.numel())).sum().item()}
            scale = expected["norm"]
            for key in got:
                assert abs(got[key] - expected[key]) <= 1e-4 * scale * (1 if key != "projection" else 10) + 1e-7, \
                    f"step {step}, grad of {name}: {key} {got[key]} vs TRL {expected[key]}"
            if "full" in expected:
                error = (g - torch.tensor(expected["full"], dtype=torch.float64)).abs().max().item()
                assert error <= 1e-4 * g.abs().max().item() + 1e-8, f"step {step}: {name} max error {error}"
    # the second step is off the reference: the comparison is not of zeros
    assert recorded["steps"][1]["metrics"]["rewards/margins"] != 0 and recorded["steps"][1]["metrics"]["loss/kl"]
