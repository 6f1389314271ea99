"""The data <-> module boundary runs one way, and imports point down the layers (checked on the source, by AST).

Modules and callbacks read typed batch attributes: they never index a batch, test it for keys, or reach into a data
module's datasets. Kernels sit below the ops that dispatch to them, and modules do not know callbacks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_llm"
#: attributes that belong to a data module's inside
DATA_INSIDE = ("examples", "train_dataset", "val_dataset")


def boundary_violations(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for each use of a batch as a mapping or of a data module's datasets in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "batch":
            found.append(f"{where}: batch[...]")
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            if any(isinstance(c, ast.Name) and c.id == "batch" for c in node.comparators):
                found.append(f"{where}: ... in batch")
        elif isinstance(node, ast.Attribute) and node.attr in DATA_INSIDE:
            found.append(f"{where}: .{node.attr}")
    return found


def imported_modules(source: str) -> set[str]:
    """Every module ``source`` imports (absolute names), at any depth (lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def sources(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (PACKAGE / package).rglob("*.py"))


def test_the_checker_finds_each_kind_of_violation():
    bad = (
        "def step(self, batch):\n"
        "    ids = batch['input_ids']\n"
        "    if 'ref_logps' in batch:\n"
        "        pass\n"
        "    rows = self.trainer.datamodule.train_dataset.examples\n"
    )
    found = boundary_violations(bad)
    assert [f.split(": ", 1)[1] for f in found] == ["batch[...]", "... in batch", ".examples", ".train_dataset"]
    assert boundary_violations("def step(self, batch):\n    return batch.sequences.input_ids\n") == []


@pytest.mark.parametrize("path", sources("modules", "callbacks"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_callbacks_read_typed_batches_only(path):
    assert boundary_violations(path.read_text(), str(path.relative_to(PACKAGE))) == []


@pytest.mark.parametrize("path", sources("kernels"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_kernels_do_not_import_the_ops_above_them(path):
    assert not {name for name in imported_modules(path.read_text()) if name.startswith("lightning_llm.ops")}


@pytest.mark.parametrize("path", sources("modules", "data", "models", "losses", "ops", "kernels"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_lower_layers_do_not_import_callbacks(path):
    assert not {name for name in imported_modules(path.read_text()) if name.startswith("lightning_llm.callbacks")}
