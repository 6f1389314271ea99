"""What every example shares: its command line and the tiny offline model it trains when no ``--model`` is given.

    python examples/<script>.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

Without ``--model`` a tiny random-init Llama (the ``tiny-llama`` preset, built from a config) is written with
``save_pretrained`` to ``<output-dir>/tiny-llama`` and trained from there, the way a hub model or a local checkpoint
would be: nothing is downloaded. ``--fast`` runs a handful of steps on short sequences (the smoke tests use it).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

# Rust tokenizers warn once per forked process otherwise (data loaders, generation).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: steps and the longest sequence of a ``--fast`` run
FAST_STEPS = 2
FAST_MAX_LENGTH = 64


@dataclass(frozen=True)
class ExampleArgs:
    """The parsed command line."""

    #: a hub id or a local ``save_pretrained`` directory
    model: str
    output_dir: Path
    fast: bool

    def steps(self, full: int) -> int:
        """``full`` optimizer steps, or a handful with ``--fast``."""
        return FAST_STEPS if self.fast else full

    def max_length(self, full: int = 128) -> int:
        """The longest sequence (in tokens) of the run."""
        return FAST_MAX_LENGTH if self.fast else full

    def logger(self):
        """A ``CSVLogger`` writing ``<output-dir>/metrics.csv`` (no version folders)."""
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(str(self.output_dir), name="", version="")


def tiny_model_dir(directory: str | os.PathLike, preset: str = "tiny-llama") -> str:
    """Write the tiny random-init ``preset`` and its tokenizer to ``directory`` (once); return the directory."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        from lightning_llm.models import tiny_model, tiny_tokenizer

        tiny_model(preset).save_pretrained(directory)
        tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def parse_args(description: str | None, default_output_dir: str, argv: list[str] | None = None) -> ExampleArgs:
    """Parse ``--model``, ``--fast`` and ``--output-dir``; without ``--model``, make the tiny model directory."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a hub id or a local save_pretrained directory (default: a tiny random-init Llama, "
                             "written under --output-dir)")
    parser.add_argument("--fast", action="store_true", help=f"{FAST_STEPS} steps per stage, short sequences")
    parser.add_argument("--output-dir", default=default_output_dir, help=f"default {default_output_dir}")
    options = parser.parse_args(argv)
    output_dir = Path(options.output_dir)
    model = options.model or tiny_model_dir(output_dir / "tiny-llama")
    return ExampleArgs(model=model, output_dir=output_dir, fast=options.fast)
