"""``BaseTrainer``: TRL's ``Trainer`` surface (``train``, ``evaluate``, ``save_model``, ``state.log_history``) over a
module, a data module and a ``lightning.Trainer``.

A TRL-style trainer builds the algorithm's module (the model, the loss, the optimizer settings) and data module (the
datasets, batching) from its config at construction, as TRL builds its model and datasets; ``train()`` then builds a
``lightning.Trainer`` from the config and fits. Nothing here computes a loss: the numbers are the modules'.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.util
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_llm.trainers.config import DATA, MODULE, TRAINER, TrainingConfig, target_of

log = logging.getLogger(__name__)

#: TRL ``Trainer`` arguments that have no counterpart here (name -> what to do instead); accepted only when unset
UNSUPPORTED_ARGUMENTS = {
    "data_collator": "batching is the data module's; give rows in a supported format",
    "compute_metrics": "the module logs its algorithm's metrics; add your own with a Lightning Callback",
    "optimizers": "set the optimizer through the config (optim, learning_rate, adam_*, weight_decay, "
                  "lr_scheduler_type) or module_kwargs={'optimizer': ..., 'scheduler': ...}",
    "optimizer_cls_and_kwargs": "set the optimizer through the config or module_kwargs={'optimizer': ...}",
    "preprocess_logits_for_metrics": "the module logs its algorithm's metrics",
    "model_init": "give the model (or its name)",
    "compute_loss_func": "the loss is the algorithm's; write a module for another one",
    "formatting_func": "turn the rows into a supported format (text, messages, prompt/completion) first",
}
_UNSET: dict[str, Any] = {"optimizers": (None, None)}


@dataclasses.dataclass
class TrainerState:
    """TRL's ``trainer.state``: where the last ``train()`` stands and everything it logged."""

    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0
    #: one dict per logging step (``loss``, the algorithm's metrics, ``learning_rate``, ``num_tokens``, ``epoch``,
    #: ``step``), per evaluation (``eval_`` names) and a last one with the run's totals, in order
    log_history: list[dict[str, float]] = dataclasses.field(default_factory=list)


class LogHistory(Callback):
    """Appends what the module logs to a :class:`TrainerState`'s ``log_history`` (kept in checkpoints, so a resumed run
    continues it)."""

    def __init__(self, state: TrainerState) -> None:
        self.state = state
        self._seen: dict | None = None
        self.first_step = 0

    @property
    def state_key(self) -> str:
        return "LogHistory"

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.first_step = trainer.global_step
        self._seen = pl_module.last_metrics.get("train")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.state.global_step = trainer.global_step
        self.state.epoch = self._epoch(trainer, batch_idx)
        logged = pl_module.last_metrics.get("train")
        if logged is not None and logged is not self._seen:  # a logging step (each flush makes a new dict)
            self._seen = logged
            self.state.log_history.append({**logged, "epoch": self.state.epoch, "step": trainer.global_step})

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        values = pl_module.last_metrics.get("val") or {}
        self.state.log_history.append({**{f"eval_{k}": v for k, v in values.items()}, "epoch": self.state.epoch,
                                       "step": trainer.global_step})

    @staticmethod
    def _epoch(trainer: L.Trainer, batch_idx: int) -> float:
        batches = trainer.num_training_batches
        if not isinstance(batches, (int, float)) or not math.isfinite(batches) or batches <= 0:
            return float(trainer.current_epoch)
        return round(trainer.current_epoch + min(1.0, (batch_idx + 1) / batches), 4)

    def state_dict(self) -> dict[str, Any]:
        return {"log_history": list(self.state.log_history), "epoch": self.state.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.log_history[:] = state_dict.get("log_history", [])
        self.state.epoch = state_dict.get("epoch", 0.0)


def _import(path: str) -> type:
    module_path, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module_path), name)


def _check_callbacks(callbacks: Any) -> list[Callback]:
    """Lightning callbacks (instances, or classes built without arguments); a ``transformers.TrainerCallback`` is
    refused by name."""
    out: list[Callback] = []
    for index, callback in enumerate(list(callbacks or [])):
        kind = callback if isinstance(callback, type) else type(callback)
        if any(base.__name__ == "TrainerCallback" and base.__module__.startswith("transformers")
               for base in kind.__mro__):
            raise TypeError(f"callbacks[{index}] is a transformers.TrainerCallback ({kind.__name__}); these trainers "
                            "run on Lightning and take Lightning callbacks (lightning.pytorch.Callback, e.g. "
                            "lightning_llm.BEMACallback): port its hooks to one")
        if isinstance(callback, type) and issubclass(callback, Callback):
            callback = callback()
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks[{index}] must be a lightning.pytorch.Callback, got {kind.__name__}")
        out.append(callback)
    return out


def process_layout() -> tuple[int, int]:
    """``(devices per node, nodes)`` of a ``torchrun``/``accelerate launch`` job, from its environment; ``(1, 1)``
    for a plain ``python`` run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world <= 1:
        return 1, 1
    if local < 1 or world % local:
        raise ValueError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
    return local, world // local


class BaseTrainer:
    """What every TRL-style trainer shares; subclasses name their config, module and data module.

    Args:
        model: a hub id, a local directory, a tiny preset (``tiny-llama``) or a ``PreTrainedModel``.
        args: the config (default: the algorithm's config with ``output_dir="<model name>-<algorithm>"``, as TRL).
        train_dataset: rows in the algorithm's format: a ``datasets.Dataset`` (or ``IterableDataset``), a list of
            dicts, a local file, a hub id or ``"sample:<name>"``.
        eval_dataset: rows for evaluation (``evaluate()``, and during training with ``eval_strategy``).
        processing_class: the tokenizer (or its name); default: the model's.
        callbacks: Lightning callbacks (``lightning_llm.BEMACallback``, ...), instances or classes.
        peft_config: a ``peft.LoraConfig`` (or a dict of its fields): train adapters.
    """

    #: dotted paths of the config, module and data module classes
    config_class: type[TrainingConfig] = TrainingConfig
    module_path: str = ""
    datamodule_path: str = ""
    #: the suffix of TRL's default ``output_dir`` (``<model>-<suffix>``)
    algorithm: str = ""

    def __init__(self, model: Any, args: TrainingConfig | None = None, *, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, callbacks: Any = None,
                 peft_config: Any = None, **unsupported: Any) -> None:
        name = type(self).__name__
        for key, value in unsupported.items():
            if key not in UNSUPPORTED_ARGUMENTS:
                near = difflib.get_close_matches(key, self._argument_names(), n=3, cutoff=0.6)
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}"
                                + (f"; did you mean {', '.join(near)}?" if near else ""))
            if value is not None and value != _UNSET.get(key):
                raise ValueError(f"{name}({key}=...) is not supported: {UNSUPPORTED_ARGUMENTS[key]}")
        if args is None:
            args = self.config_class(output_dir=f"{_model_name(model)}-{self.algorithm}")
        if not isinstance(args, self.config_class):
            raise TypeError(f"{name} takes args={self.config_class.__name__}(...), got {type(args).__name__}")
        if isinstance(eval_dataset, dict):
            if len(eval_dataset) != 1:
                raise ValueError(f"{name}: eval_dataset as a dict of {len(eval_dataset)} datasets is not supported; "
                                 "give one dataset")
            eval_dataset = next(iter(eval_dataset.values()))
        self.args = args
        self.output_dir = Path(args.output_dir or "trainer_output")
        self.state = TrainerState()
        self.callbacks = _check_callbacks(callbacks)
        L.seed_everything(args.seed, verbose=False)
        self.module = self._build_module(model, processing_class, peft_config, self.module_arguments())
        self.datamodule = self._build_datamodule(train_dataset, eval_dataset)
        #: the ``lightning.Trainer`` of the last ``train()``/``evaluate()``
        self.trainer: L.Trainer | None = None
        self._run_trainer: L.Trainer | None = None  # the fitting trainer of the last train() (or PPO step())

    def module_arguments(self) -> dict[str, Any]:
        """The algorithm's own module arguments from the trainer's constructor (``ref_model``, ``reward_funcs``...)."""
        return {}

    @classmethod
    def _argument_names(cls) -> list[str]:
        import inspect

        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    # ------------------------------------------------------------------------------------------ building the parts
    def routed(self, target: str) -> dict[str, Any]:
        """The config fields going to ``target`` (``module``, ``data`` or ``trainer``), by their names there."""
        out = {}
        for config_field in dataclasses.fields(self.args):
            where, name = target_of(config_field)
            if where == target:
                out[name] = getattr(self.args, config_field.name)
        return out

    def _build_module(self, model: Any, processing_class: Any, peft_config: Any,
                      arguments: dict[str, Any]) -> Any:
        args = self.args
        kwargs = self.routed(MODULE)
        warmup = args.warmup_steps
        if warmup and warmup < 1:
            kwargs["warmup_ratio"] = float(warmup)
        else:
            kwargs["warmup_steps"] = int(warmup)
        kwargs.update(_model_init_kwargs(args.model_init_kwargs))
        optimizer = self._optimizer_factory()
        if optimizer is not None:
            kwargs["optimizer"] = optimizer
        kwargs["export_dir"] = str((self.output_dir / "final").resolve())
        kwargs.update(arguments)
        kwargs.update(args.module_kwargs or {})
        return _import(self.module_path)(model, tokenizer=processing_class, peft_config=peft_config, **kwargs)

    def _optimizer_factory(self) -> Any:
        """The optimizer callable for non-default optimizer fields (the module's fused AdamW otherwise)."""
        args = self.args
        if args.optim == "sgd":
            return functools.partial(torch.optim.SGD, lr=args.learning_rate, weight_decay=args.weight_decay)
        if (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8):
            return None
        return functools.partial(torch.optim.AdamW, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                 eps=args.adam_epsilon, weight_decay=args.weight_decay)

    def _build_datamodule(self, train_dataset: Any, eval_dataset: Any) -> Any:
        args = self.args
        kwargs = self.routed(DATA)
        kwargs["seed"] = args.data_seed if args.data_seed is not None else args.seed
        if args.train_sampling_strategy == "sequential":
            kwargs["shuffle"] = False
        pad = getattr(args, "pad_to_multiple_of", "auto")
        if pad not in (None, "auto"):
            kwargs["pad_to_multiple_of"] = int(pad)
        return _import(self.datamodule_path)(train_dataset, eval_dataset, **kwargs)

    def _precision(self) -> str:
        args = self.args
        if args.fp16:
            if args.use_cpu or not torch.cuda.is_available():
                raise ValueError(f"{type(args).__name__}(fp16=True) needs a CUDA device (fp16 mixed precision does not "
                                 "run on CPU); use bf16=True there")
            return "16-mixed"
        if args.bf16:
            return "bf16-mixed"
        if args.bf16 is None and not args.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed"
        return "32-true"

    def _loggers(self) -> list[Any]:
        from lightning_llm.cli import default_loggers

        loggers = [lg for lg in default_loggers(str(self.output_dir), "fit")
                   if type(lg).__name__ != "TensorBoardLogger"]
        reporters = set(self.args.reporters())
        if "all" in reporters:
            reporters |= {r for r, package in (("tensorboard", "tensorboard"), ("wandb", "wandb"))
                          if importlib.util.find_spec(package) is not None}
        if "tensorboard" in reporters:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(self.output_dir), name="runs", version="",
                                             default_hp_metric=False))
        if "wandb" in reporters:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(save_dir=str(self.output_dir)))
        return loggers

    def _checkpoint(self) -> Callback | None:
        args = self.args
        if args.save_strategy == "no":
            return None
        from lightning_llm.callbacks.checkpoint import RunCheckpoint

        keep = -1 if args.save_total_limit is None else args.save_total_limit
        every = {"every_n_train_steps": args.save_steps} if args.save_strategy == "steps" else {"every_n_epochs": 1}
        return RunCheckpoint(dirpath=str(self.output_dir), filename="checkpoint-{step}", auto_insert_metric_name=False,
                             save_top_k=keep, monitor="step" if keep > 0 else None, mode="max", **every)

    def lightning_trainer(self, *, fitting: bool = True) -> L.Trainer:
        """The ``lightning.Trainer`` the config describes (``fitting=False``: for ``evaluate``, no checkpoints)."""
        from lightning_llm.cli import default_progress_bar, quiet_console

        quiet_console()
        args = self.args
        devices, nodes = process_layout()
        callbacks = [LogHistory(self.state), *self.callbacks]
        progress = args.disable_tqdm is not True
        if progress:
            callbacks.append(default_progress_bar())
        checkpoint = self._checkpoint() if fitting else None
        if checkpoint is not None:
            callbacks.append(checkpoint)
        options: dict[str, Any] = {
            "accelerator": "cpu" if args.use_cpu else "auto", "devices": devices, "num_nodes": nodes,
            "precision": self._precision(), "default_root_dir": str(self.output_dir), "callbacks": callbacks,
            "logger": self._loggers() if fitting else False, "enable_checkpointing": checkpoint is not None,
            "enable_progress_bar": progress, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "gradient_clip_val": self._gradient_clip_val(),
            "max_epochs": -1 if args.max_steps > 0 else int(args.num_train_epochs),
        }
        if devices * nodes > 1:
            options["strategy"] = "ddp"
        options.update(self.routed(TRAINER))
        if args.eval_strategy == "no":
            options["limit_val_batches"] = 0
        elif args.eval_strategy == "steps":
            options.update(val_check_interval=args.eval_steps or args.logging_steps, check_val_every_n_epoch=None)
        options.update(args.trainer_kwargs or {})
        self.trainer = L.Trainer(**options)
        return self.trainer

    def _gradient_clip_val(self) -> float | None:
        """The ``lightning.Trainer``'s ``gradient_clip_val`` (None for the modules that clip themselves)."""
        return self.args.max_grad_norm or None

    # ------------------------------------------------------------------------------------------------- TRL's API
    @property
    def model(self) -> torch.nn.Module:
        """The model being trained (built on first access)."""
        return self.module.ensure_model()

    @property
    def processing_class(self) -> Any:
        """The tokenizer."""
        return self.module.tokenizer

    @property
    def tokenizer(self) -> Any:
        return self.module.tokenizer

    def _checkpoint_path(self, resume: str | bool | None) -> str | None:
        if resume in (None, False):
            return None
        if resume is True:
            last = self.output_dir / "last.ckpt"
            if not last.is_file():
                raise ValueError(f"resume_from_checkpoint=True, but {self.output_dir} holds no last.ckpt to resume "
                                 "from")
            return str(last)
        path = Path(resume)
        if path.is_dir():
            candidates = [path / "last.ckpt"] if (path / "last.ckpt").is_file() else sorted(
                path.glob("checkpoint-*.ckpt"), key=lambda p: int(p.stem.split("-")[-1]))
            if not candidates:
                raise ValueError(f"resume_from_checkpoint={resume!r}: the directory holds no last.ckpt and no "
                                 "checkpoint-<step>.ckpt")
            return str(candidates[-1])
        if not path.is_file():
            raise ValueError(f"resume_from_checkpoint={resume!r}: no such checkpoint file")
        return str(path)

    def train(self, resume_from_checkpoint: str | bool | None = None) -> Any:
        """Train; returns TRL's ``TrainOutput(global_step, training_loss, metrics)``.

        ``resume_from_checkpoint``: ``True`` for ``output_dir/last.ckpt``, a checkpoint file, or a directory (its
        ``last.ckpt``, else its newest ``checkpoint-<step>.ckpt``); the run continues exactly where it was saved
        (data position, random states, callbacks' state, the log history). At the end the model and tokenizer are
        written in Hugging Face format to ``output_dir/final`` — this project's addition to TRL, where a later stage
        (``reward_model="<output_dir>/final"``) finds them.
        """
        from transformers.trainer_utils import TrainOutput

        ckpt = self._checkpoint_path(resume_from_checkpoint if resume_from_checkpoint is not None
                                     else self.args.resume_from_checkpoint)
        trainer = self.lightning_trainer(fitting=True)
        self._run_trainer = trainer  # what a later PPOTrainer.step() continues
        start_entries = len(self.state.log_history)
        started = time.perf_counter()
        trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=ckpt)
        runtime = time.perf_counter() - started
        self.state.global_step = trainer.global_step
        self.state.max_steps = trainer.max_steps if trainer.max_steps > 0 else trainer.global_step
        entries = [e for e in self.state.log_history[start_entries:] if "loss" in e]
        training_loss = _mean_over_steps(entries, first_step=self._first_step(trainer))
        steps = max(1, trainer.global_step - self._first_step(trainer))
        samples = steps * self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * \
            trainer.world_size
        metrics = {"train_runtime": round(runtime, 4), "train_samples_per_second": round(samples / runtime, 3),
                   "train_steps_per_second": round(steps / runtime, 3), "train_loss": training_loss,
                   "epoch": self.state.epoch}
        self.state.log_history.append({**metrics, "step": trainer.global_step})
        return TrainOutput(trainer.global_step, training_loss, metrics)

    def _first_step(self, trainer: L.Trainer) -> int:
        history = next((c for c in trainer.callbacks if isinstance(c, LogHistory)), None)
        return history.first_step if history is not None else 0

    def evaluate(self, eval_dataset: Any = None) -> dict[str, float]:
        """Metrics on the evaluation rows (``eval_`` names, as TRL's); also appended to ``state.log_history``."""
        datamodule = self.datamodule if eval_dataset is None else self._build_datamodule(None, eval_dataset)
        if datamodule.val_data is None and not datamodule.val_split:
            raise ValueError(f"{type(self).__name__}.evaluate() needs an eval_dataset (here or at construction)")
        trainer = self.lightning_trainer(fitting=False)
        trainer.validate(self.module, datamodule=datamodule, verbose=False)
        entry = self.state.log_history[-1] if self.state.log_history else {}
        return {k: v for k, v in entry.items() if k.startswith("eval_")} | {"epoch": self.state.epoch}

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the model and tokenizer in Hugging Face format (default: ``output_dir``)."""
        return self.module.export_hf(output_dir if output_dir is not None else self.output_dir)

    def log(self, logs: dict[str, float]) -> None:
        """Append ``logs`` to ``state.log_history`` with the current epoch and step (TRL's ``Trainer.log``)."""
        self.state.log_history.append({**logs, "epoch": self.state.epoch, "step": self.state.global_step})


def _mean_over_steps(entries: list[dict[str, float]], first_step: int) -> float:
    """The mean training loss over the steps of ``entries`` (each a mean over the steps since the previous one)."""
    total, steps, previous = 0.0, 0, first_step
    for entry in entries:
        span = max(1, int(entry["step"]) - previous)
        total += float(entry["loss"]) * span
        steps += span
        previous = int(entry["step"])
    return total / steps if steps else float("nan")


def _model_init_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """TRL's ``model_init_kwargs`` as the module's loading arguments."""
    kwargs = dict(kwargs or {})
    out: dict[str, Any] = {}
    if "torch_dtype" in kwargs:
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    for name in ("dtype", "attn_implementation", "revision", "trust_remote_code"):
        if name in kwargs:
            value = kwargs.pop(name)
            out[name] = str(value).replace("torch.", "") if name == "dtype" and value is not None else value
    if kwargs:
        out["model_kwargs"] = kwargs
    return out


def _model_name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return Path(str(model).rstrip("/")).name or "model"
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or "model"
    return Path(str(name).rstrip("/")).name or "model"

