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

import contextlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
import traceback
import warnings
from argparse import ArgumentError
from typing import Any

import yaml
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


#: sections of a config whose values are ``class_path`` + ``init_args``
_CLASS_SECTIONS = ("model", "data", "optimizer", "lr_scheduler")


def error_key_path(message: str) -> list[str]:
    """The config path of the value a jsonargparse error is about (``['data', 'init_args', 'batch_size']``), read
    from its nested ``Parser key "..."`` lines; empty when the message names none."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    path: list[str] = []
    for key in keys:
        path += key.split(".")
        if path[-1] in _CLASS_SECTIONS and len(path) == 1:
            path.append("init_args")
    return path if keys and path[-1] != "init_args" else []


def error_summary(message: str) -> str:
    """One line for a jsonargparse error: the value's config path and what was wrong with it."""
    path = error_key_path(message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in reversed(lines) if line.startswith(("Expected", "Problem", "Does not", "No"))
                   and "NoneType" not in line), lines[-1] if lines else message)
    return f"{'.'.join(path)}: {detail}" if path else " ".join(lines[:3])


def error_message(err: BaseException) -> str:
    """What went wrong, without the wrapping jsonargparse adds when a class's constructor raises (the Union of the
    class and ``None``, the namespace given): the constructor's own message."""
    text = str(err)
    if "Does not validate against any of the Union subtypes" not in text:
        return text
    inner = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")
             and "NoneType" not in line]
    return "; ".join(inner) or text


def _drop(config: dict, path: list[str]) -> bool:
    node = config
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    if isinstance(node, dict) and path[-1] in node:
        del node[path[-1]]
        return True
    return False


class LLMCLI(LightningCLI):
    """LightningCLI with lightning_llm's defaults (subclass mode for modules and data modules, rich progress)."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        super().__init__(
            LLMModule, LLMDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args, run=run,
            save_config_kwargs={"overwrite": True}, **kwargs,
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as LightningCLI does; when a ``--config`` file has wrong values, report every one of them at once
        (jsonargparse stops at the first), then exit with status 2."""
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
        if argv is None or "--config" not in argv:
            return super().parse_arguments(parser, args)
        try:
            with _raising(parser):
                return super().parse_arguments(parser, args)
        except ArgumentError as first:
            errors = [error_summary(str(first))] + self._further_config_errors(parser, argv, str(first))
        sys.stderr.write(f"error: the configuration has {len(errors)} wrong value{'s' * (len(errors) > 1)}:\n")
        sys.stderr.writelines(f"  - {line}\n" for line in errors)
        sys.stderr.write(f"(for the accepted options run: lightning-llm {argv[0]} --help)\n")
        raise SystemExit(2)

    def _further_config_errors(self, parser: Any, argv: list[str], message: str, limit: int = 20) -> list[str]:
        """The errors after the first: each wrong value is taken out of the merged ``--config`` files in turn, and
        the rest parsed again."""
        positions = [i + 1 for i, arg in enumerate(argv) if arg == "--config" and i + 1 < len(argv)]
        merged: dict = {}
        for position in positions:
            with open(argv[position]) as handle:
                merged = _deep_merge(merged, yaml.safe_load(handle) or {})
        rest = [arg for i, arg in enumerate(argv)
                if i not in positions and not (arg == "--config" and i + 1 in positions)]
        errors: list[str] = []
        with tempfile.TemporaryDirectory() as directory:
            for _ in range(limit):
                path = error_key_path(message)
                if not path or not _drop(merged, path):
                    break
                config = os.path.join(directory, "config.yaml")
                with open(config, "w") as handle:
                    yaml.safe_dump(merged, handle)
                try:
                    with _raising(parser):
                        parser.parse_args([*rest[:1], "--config", config, *rest[1:]])
                    break
                except ArgumentError as err:
                    message = str(err)
                    errors.append(error_summary(message))
        return errors

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with the rich progress bar added unless it is off or another progress bar is configured, the
        default loggers unless others are configured, and without the recipe's checkpoint callback when
        ``--trainer.enable_checkpointing=false`` or when not fitting (validate, test, predict save nothing)."""
        from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ProgressBar

        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        fitting = self.subcommand in (None, "fit")
        if (config.get("enable_checkpointing") is False or not fitting) and any(
                isinstance(c, ModelCheckpoint) for c in callbacks):
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


@contextlib.contextmanager
def _raising(parser: Any) -> Any:
    """jsonargparse parsers (the subcommands' too) raising ``ArgumentError`` instead of exiting, for a block."""
    parsers = [parser, *getattr(parser, "_subcommands_action", None)._name_parser_map.values()] \
        if getattr(parser, "_subcommands_action", None) is not None else [parser]
    saved = [p.exit_on_error for p in parsers]
    for p in parsers:
        p.exit_on_error = False
    try:
        yield
    finally:
        for p, value in zip(parsers, saved):
            p.exit_on_error = value


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


#: set to 1 to see the traceback of an error instead of its one-line message
DEBUG_ENV = "LIGHTNING_LLM_DEBUG"


def main(args: list[str] | None = None) -> None:
    """Console entry point of ``lightning-llm``: an error is printed as one line (its traceback goes to a log file,
    or to the console with ``LIGHTNING_LLM_DEBUG=1``)."""
    quiet_console()
    try:
        LLMCLI(args=args)
    except Exception as err:  # noqa: BLE001 - reported, with the traceback kept, and the process fails
        if os.environ.get(DEBUG_ENV):
            raise
        trace = os.path.join(tempfile.gettempdir(), f"lightning-llm-error-{os.getpid()}.log")
        with open(trace, "w") as handle:
            traceback.print_exc(file=handle)
        kind = "" if isinstance(err, ValueError) else f"{type(err).__name__}: "
        sys.stderr.write(f"error: {kind}{error_message(err)}\n(traceback in {trace}; set {DEBUG_ENV}=1 to print it "
                         "here)\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
