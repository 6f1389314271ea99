"""XPOModule and NashMDModule against TRL 1.13.0's XPOTrainer and NashMDTrainer (the last TRL with either), through
the fixtures that ``tests/parity/trl113/record_xpo.py`` and ``record_nash_md.py`` recorded (their docstrings say how to
regenerate them and with which versions).

Both sides train the committed tiny-llama weights for two SGD steps on the same four prompts, with the same fixed
completions (the policy's and the reference's, or the mixture's for Nash-MD, replayed here from the fixture) and the
same rule reward. Compared at both steps: the loss and every metric TRL 1.13 logs (XPO: ``loss/dpo``, ``loss/xpo``,
``objective/*``, ``rewards/*``, ``logps/*``, ``val/*_contain_eos_token``, ``alpha``, ``beta``; Nash-MD: ``loss/score``,
``loss/kl``, ``objective/entropy``, ``rewards/*``, ``logps/*``, ``val/*_contain_eos_token``, ``beta``,
``mixture_coef``) within 1e-4 relative, and every parameter's gradient (norm, sum, projection on a seeded random
direction, one whole matrix). The second step is off the reference, so the KL terms are compared with non-zero values.
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
from lightning_llm.modules.xpo import XPOModule
from lightning_llm.rollout import FixedRollouts

HERE = Path(__file__).resolve().parent / "trl113"
#: algorithm -> its module and the KL metric that must be non-zero at the second step
ALGORITHMS = {"xpo": (XPOModule, "objective/kl"), "nash_md": (NashMDModule, "loss/kl")}
FIXTURES = {name: json.loads((HERE / f"{name}.json").read_text()) for name in ALGORITHMS}
NOT_COMPARED = {"grad_norm", "learning_rate", "epoch", "step"}  # Lightning's own bookkeeping


def probe(size: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)


def rule_reward(completion_ids, **kwargs):
    return [(sum(ids) % 11) / 10.0 for ids in completion_ids]


class Replay:
    """A FixedRollouts callable: the module asks for the policy's completions, then the reference's (XPO) or the
    mixture's (Nash-MD)."""

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


@pytest.mark.parametrize(("algorithm", "case"), [(name, case) for name in ALGORITHMS
                                                   for case in sorted(FIXTURES[name]["cases"])])
def test_matches_trl_1_13(algorithm, case):
    module_cls, kl_metric = ALGORITHMS[algorithm]
    fixture = FIXTURES[algorithm]
    recorded = fixture["cases"][case]
    settings = recorded["settings"]
    module = module_cls(str(HERE / "tiny-llama"), tokenizer="tiny-llama", reward_funcs=[rule_reward],
                        rollout=FixedRollouts(Replay(recorded["completions"])),
                        max_completion_length=fixture["max_completion"], optimizer=sgd(fixture["lr"]),
                        scheduler=constant_lr, **settings)
    metrics, grab = StepMetrics(), Grab()
    everything = sample_rows("prompt_only")
    rows = [everything[i] for i in fixture["rows"]]
    quiet_trainer(max_steps=2, callbacks=[metrics, grab]).fit(
        module, PromptDataModule(rows, batch_size=2 * fixture["prompts"], seed=42))

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
    assert recorded["steps"][1]["metrics"]["rewards/margins"] != 0 and recorded["steps"][1]["metrics"][kl_metric]
