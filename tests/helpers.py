"""Small shared pieces for the data, model and module tests (imported as ``helpers``; ``tests/`` is on ``sys.path``
because the root ``conftest.py`` lives there)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from lightning import Callback, Trainer

from lightning_llm.assets import sample_path

IGNORE = -100


def sample_rows(name: str, n: int | None = None) -> list[dict]:
    """Rows of a shipped sample, read straight from its JSONL file (independently of ``load_rows``)."""
    with open(sample_path(name), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows if n is None else rows[:n]


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A CPU trainer without progress bar, logger, checkpoints or model summary, logging every step's metrics (each
    overridable)."""
    options: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False,
        "enable_checkpointing": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    return Trainer(**options)


class StepMetrics(Callback):
    """Records ``trainer.callback_metrics`` once per optimizer step (after the step's last micro-batch)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        #: per step, only the metrics that step logged (``callback_metrics`` keep older steps' values)
        self.logged: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step > len(self.steps):
            self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})
            self.logged.append(dict(getattr(pl_module, "last_metrics", {}).get("train", {})))

    def series(self, name: str) -> list[float]:
        return [step[name] for step in self.steps]


def sgd(lr: float):
    """An ``optimizer`` callable for the modules: plain SGD (no momentum, no decay)."""
    return lambda params: torch.optim.SGD(params, lr=lr)


def constant_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``scheduler`` callable for the modules: constant learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def reference_nll_sum(model: torch.nn.Module, sequences: Sequence[Sequence[int]],
                      labels: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Summed next-token NLL of each sequence run ALONE through ``model`` (no padding, no packing), in float64
    from the model's own logits. Differentiable. ``labels`` (``-100`` = no loss) default to the sequence itself."""
    total = torch.zeros((), dtype=torch.float64)
    for k, seq in enumerate(sequences):
        ids = torch.tensor([list(seq)])
        target = torch.tensor(list(labels[k]) if labels is not None else list(seq))[1:]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
        logp = torch.log_softmax(logits, dim=-1)
        keep = target != IGNORE
        total = total - logp[keep].gather(-1, target[keep].unsqueeze(-1)).sum()
    return total


def char_span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character span lies inside one of ``spans`` (from a fast tokenizer's offsets)."""
    out = []
    for start, end in offsets:
        inside = end > start and any(lo <= start and end <= hi for lo, hi in spans)
        out.append(int(inside))
    return out


def sharp_reference_model() -> torch.nn.Module:
    """The tiny llama with its head scaled up, so completions get clearly different log-probs."""
    from lightning_llm.models import tiny_model

    model = tiny_model("tiny-llama", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def perturb_(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Add seeded Gaussian noise of std ``scale`` to every weight of ``model`` in place; returns it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def perturbed_policy_model() -> torch.nn.Module:
    """:func:`sharp_reference_model` with every weight perturbed: a policy that already differs from the reference
    (the seed gives a positive KTO KL estimate on the sample data)."""
    return perturb_(sharp_reference_model(), seed=13, scale=0.03)


def flushed(module: Any, mode: str = "train") -> dict[str, float]:
    """A module's metrics as they would be logged at an optimizer step (``train``) or validation end (``val``),
    reduced and with the derived ones, without needing a Trainer."""
    return module.reduce_metrics(mode)


def as_dict(batch: Any) -> dict[str, torch.Tensor]:
    """A typed batch as the flat dict of tensors that TRL's collators build: the fields of nested sequence batches
    at the top level (those of ``kl_sequences`` with a ``kl_`` prefix), ``None`` fields left out."""
    from dataclasses import fields, is_dataclass

    out: dict[str, torch.Tensor] = {}
    for field in fields(batch):
        value = getattr(batch, field.name)
        if is_dataclass(value):
            prefix = "kl_" if field.name == "kl_sequences" else ""
            for inner in fields(value):
                tensor = getattr(value, inner.name)
                if isinstance(tensor, torch.Tensor):
                    out[prefix + inner.name] = tensor
        elif isinstance(value, torch.Tensor):
            out[field.name] = value
    return out


# ------------------------------------------------------------------------------------ fixed rollouts (online tests)
#: the longest fixed completion (and the max_completion_length of the tests that replay them)
MAX_FIXED_COMPLETION = 12


def fixed_completion(prompt_ids: Sequence[int], occurrence: int, eos_token_id: int = 2) -> list[int]:
    """A fixed completion of 3 to 11 tokens for the ``occurrence``-th copy of a prompt in a generation batch, a
    function of the prompt's ids alone; two copies in three end with EOS, the third is a truncated one."""
    generator = torch.Generator().manual_seed(sum(prompt_ids) * 31 + occurrence)
    length = int(torch.randint(3, MAX_FIXED_COMPLETION, (1,), generator=generator))
    ids = torch.randint(3, 800, (length,), generator=generator).tolist()
    return ids + [eos_token_id] if occurrence % 3 != 2 else ids


def fixed_completions(prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """:func:`fixed_completion` of every prompt of a generation batch (copies counted in order): what a
    ``FixedRollouts`` callable, a TRL ``rollout_func`` or an overridden TRL generation returns."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for ids in prompt_ids:
        key = tuple(ids)
        out.append(fixed_completion(list(ids), seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    return out


def id_reward(completion_ids, **kwargs):
    """A reward read off the token ids of a completion; ``None`` (does not apply) for a few."""
    return [None if sum(ids) % 7 == 0 else (sum(ids) % 5) / 4 for ids in completion_ids]
