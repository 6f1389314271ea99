"""The package surface: lazy top-level exports and the console entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lightning_llm


def test_import_does_not_import_heavy_libraries():
    code = (
        "import sys, lightning_llm; "
        "heavy = [m for m in ('torch', 'transformers', 'lightning', 'datasets') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("name", lightning_llm.__all__)
def test_every_export_resolves(name):
    obj = getattr(lightning_llm, name)
    assert getattr(obj, "__name__", name) == name


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        lightning_llm.NotAThing  # noqa: B018


def test_first_access_imports_on_demand():
    code = (
        "import sys, lightning_llm; assert 'torch' not in sys.modules; "
        "cls = lightning_llm.SFTModule; assert 'torch' in sys.modules; print(cls.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lightning_llm.modules.sft"


def test_test_modules_have_distinct_basenames():
    """The tests folders have no ``__init__.py``: pytest imports each test file by its basename, so two files of one
    name in different folders stop the whole collection ("import file mismatch")."""
    from collections import Counter
    from pathlib import Path

    names = Counter(path.name for path in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
