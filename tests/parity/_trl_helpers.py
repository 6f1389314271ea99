"""Shared pieces of the TRL 1.16 parity tests: build a TRL trainer offline, run its loss on one fixed batch, and run
ours on the same batch, so that both sides can be compared metric by metric.

Everything here is offline: TRL gets model *objects* (``tiny_model`` presets, built from a fixed seed, so the same
preset is the same weights on both sides), the shipped tiny tokenizer and a ``datasets.Dataset``; ``report_to=[]``.

Typical use (any TRL trainer whose ``compute_loss(model, inputs)`` records metrics that its ``log`` reports)::

    trainer = build_trl_trainer(DPOTrainer, DPOConfig, policy, tokenizer, rows, tmp_path, ref_model=reference, beta=0.1)
    theirs = trl_step(trainer, trl_batch(trainer))          # {"loss": ..., "rewards/chosen": ..., ...}
    ours = module_step(module, our_batch)                   # same names, from the module's metric buffer
    assert_metrics_close(ours, theirs, ["loss", "rewards/chosen"])

Imported as ``_trl_helpers`` by the tests next to it, and as ``parity._trl_helpers`` from elsewhere in ``tests/``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: TRL log keys that are bookkeeping, not metrics of the batch
_BOOKKEEPING = ("step", "epoch", "num_input_tokens_seen")


def perturb_(model: nn.Module, scale: float = 0.05, seed: int = 7) -> nn.Module:
    """Add seeded Gaussian noise ``N(0, scale²)`` to every parameter of ``model``, in place; returns ``model``.

    Used to move a policy away from its reference (an identical ``tiny_model``), so that log-ratios and rewards are
    not zero; the same ``seed`` gives the same perturbation on both sides of a comparison.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
    return model


def trl_config(config_cls: type, output_dir: str | Path, batch_size: int, **overrides: Any):
    """A TRL ``*Config`` for one offline CPU step: no reporting, no saving, no progress bars, fp32, one process, and
    ``per_device_{train,eval}_batch_size = batch_size``; ``overrides`` set any other field (``beta``, ``loss_type``...).
    """
    options: dict[str, Any] = {
        "output_dir": str(output_dir), "report_to": [], "use_cpu": True, "bf16": False, "fp16": False,
        "max_steps": 1, "per_device_train_batch_size": batch_size, "per_device_eval_batch_size": batch_size,
        "save_strategy": "no", "disable_tqdm": True, "seed": 42,
    }
    fields = getattr(config_cls, "__dataclass_fields__", {})
    if "gradient_checkpointing" in fields:
        options["gradient_checkpointing"] = False
    if "dataset_num_proc" in fields:
        options["dataset_num_proc"] = None
    options.update(overrides)
    return config_cls(**options)


def build_trl_trainer(trainer_cls: type, config_cls: type, model: nn.Module, tokenizer, rows: Sequence[dict],
                      output_dir: str | Path, *, ref_model: nn.Module | None = None,
                      trainer_kwargs: dict[str, Any] | None = None, **config: Any):
    """A TRL trainer on ``rows`` (a list of dicts, made into a ``datasets.Dataset``), with ``model`` (an object; pass
    a copy if you keep using it: TRL patches the model's forward) and ``ref_model`` when given.

    The whole dataset is one batch (``batch_size = len(rows)``), so that metrics do not depend on batch order.
    """
    from datasets import Dataset

    args = trl_config(config_cls, output_dir, len(rows), **config)
    kwargs: dict[str, Any] = {"model": model, "args": args, "processing_class": tokenizer,
                              "train_dataset": Dataset.from_list(list(rows))}
    if ref_model is not None:
        kwargs["ref_model"] = ref_model
    kwargs.update(trainer_kwargs or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(**kwargs)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):  # trl_step's log() would print every step
        trainer.remove_callback(callback)
    return trainer


def trl_examples(trainer, dataset=None) -> list[dict]:
    """The prepared (tokenized) examples of ``dataset`` (default: the trainer's training set), in order."""
    dataset = trainer.train_dataset if dataset is None else dataset
    return [dataset[i] for i in range(len(dataset))]


def trl_batch(trainer, dataset=None) -> dict[str, Any]:
    """All examples of ``dataset`` (default: the training set) in order, collated as the trainer's loader would
    (unused columns removed, the trainer's own data collator), on the trainer's device."""
    collate = trainer._get_collator_with_removed_columns(trainer.data_collator, "training")
    return trainer._prepare_inputs(collate(trl_examples(trainer, dataset)))


def trl_step(trainer, batch: dict[str, Any]) -> dict[str, float]:
    """TRL's loss on ``batch`` in training mode and the metrics its ``log`` reports for it:
    ``{"loss": ..., name: ...}``.

    The metrics go through the trainer's own ``log`` (each TRL trainer reduces its stored metrics there), which also
    clears them, so the trainer can be reused for another step (e.g. after changing its loss settings).
    """
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    trainer.log({"loss": float(loss)})
    logged = dict(trainer.state.log_history[-1])
    for key in _BOOKKEEPING:
        logged.pop(key, None)
    return {k: float(v) for k, v in logged.items()}


def module_step(module, batch: dict[str, Any]) -> dict[str, float]:
    """Our module's first training step on ``batch`` without a ``Trainer``: ``training_step`` in training mode (no
    gradient), then the metric buffer flushed as at an optimizer step (same names as logged)."""
    module.configure_model()
    module.train()
    with torch.no_grad():
        module.training_step(batch, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer warns; the returned values are what it logs
        values = module.flush_metrics("train")
    return {k: float(v) for k, v in values.items()}


def assert_metrics_close(ours: dict[str, float], theirs: dict[str, float], names: Iterable[str],
                         atol: float = 1e-4, context: str = "") -> None:
    """Every metric in ``names`` is present on both sides and equal within ``atol``; the message lists them all."""
    names = list(names)
    missing = [n for n in names if n not in ours or n not in theirs]
    assert not missing, f"{context}: missing metrics {missing} (ours: {sorted(ours)}, TRL: {sorted(theirs)})"
    bad = {n: (ours[n], theirs[n]) for n in names
           if not math.isclose(ours[n], theirs[n], rel_tol=0.0, abs_tol=atol)}
    assert not bad, f"{context}: ours vs TRL differ beyond {atol}: {bad}"


def copies(model: nn.Module, n: int) -> list[nn.Module]:
    """``n`` independent deep copies of ``model`` (one per side of a comparison)."""
    return [copy.deepcopy(model) for _ in range(n)]
