"""``lightning-llm``: the LightningCLI entry point.

Any module (``--model``) and data module (``--data``) of the package can be named, by class name or
``class_path``/``init_args`` in a YAML config::

    lightning-llm fit --config configs/sft/tiny.yaml
    lightning-llm fit --config configs/dpo/tiny.yaml --trainer.max_steps=50 --model.beta=0.2
    lightning-llm fit --config configs/sft/tiny.yaml --print_config

The data module takes the tokenizer of the module being trained unless ``--data.init_args.tokenizer`` names one.
A rich progress bar with the logged metrics is on by default, and unless ``--trainer.logger`` says otherwise the
metrics go to ``<default_root_dir>/metrics.csv`` (and to TensorBoard under ``<default_root_dir>/tensorboard`` when it
is installed).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import warnings
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_llm.data.base import LLMDataModule
from lightning_llm.modules.base import LLMModule

# Imported so that jsonargparse knows every subclass by its short name (``--model DPOModule``).
_MODULES = (
    "lightning_llm.modules.sft", "lightning_llm.modules.reward", "lightning_llm.modules.prm",
    "lightning_llm.modules.dpo", "lightning_llm.modules.orpo", "lightning_llm.modules.cpo",
    "lightning_llm.modules.kto", "lightning_llm.modules.bco",
    "lightning_llm.data.sft", "lightning_llm.data.preference", "lightning_llm.data.unpaired",
    "lightning_llm.data.stepwise",
)
for _name in _MODULES:
    importlib.import_module(_name)


def default_progress_bar() -> Any:
    """The progress bar the CLI shows: lightning_llm's metrics table when available, else Lightning's rich bar."""
    try:
        from lightning_llm.callbacks.rich_progress import RichProgressCallback

        return RichProgressCallback()
    except ImportError:
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar()


class _NoAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing ..." adverts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_console() -> None:
    """Keep the console of our own runs to what matters: no adverts for Lightning's cloud products, and no
    deprecation notice from Lightning's pytree code under newer torch (warnings about the run itself stay)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in logger.filters):
            logger.addFilter(_NoAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def default_loggers(root: str, subcommand: str | None = "fit") -> list[Any]:
    """For ``fit``: a CSV logger writing ``root/metrics.csv`` (kept across a resume into the same directory; the
    checkpoints then go to ``root/checkpoints``) and a TensorBoard logger under ``root/tensorboard`` when
    ``tensorboard`` is installed. ``validate`` and ``test`` write ``root/<subcommand>/metrics.csv``, leaving the
    training metrics alone; ``predict`` logs nothing."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_llm.utils.csv_logger import RunCSVLogger

    if subcommand == "predict":
        return []
    if subcommand not in (None, "fit"):
        return [RunCSVLogger(save_dir=root, name=subcommand, version="")]
    loggers: list[Any] = [RunCSVLogger(save_dir=root, name="", version="")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(save_dir=root, name="tensorboard", version="", default_hp_metric=False))
    return loggers


class LLMCLI(LightningCLI):
    """LightningCLI with lightning_llm's defaults (subclass mode for modules and data modules, rich progress)."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        super().__init__(
            LLMModule, LLMDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args, run=run,
            save_config_kwargs={"overwrite": True}, **kwargs,
        )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with the rich progress bar added unless it is off or another progress bar is configured, the
        default loggers unless others are configured, and without the recipe's checkpoint callback when
        ``--trainer.enable_checkpointing=false``."""
        from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ProgressBar

        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_checkpointing") is False and any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
            config["callbacks"] = callbacks
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            defaults = self.trainer_defaults.get("callbacks") or []
            defaults = defaults if isinstance(defaults, list) else [defaults]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": [*defaults, default_progress_bar()]}
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            from lightning_llm.callbacks.predictions import JsonlPredictionWriter

            defaults = self.trainer_defaults.get("callbacks") or []
            defaults = defaults if isinstance(defaults, list) else [defaults]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": [*defaults, JsonlPredictionWriter()]}
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = default_loggers(config.get("default_root_dir") or os.getcwd(), self.subcommand)
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> None:
    """Console entry point of ``lightning-llm``."""
    quiet_console()
    LLMCLI(args=args)


if __name__ == "__main__":
    main()
