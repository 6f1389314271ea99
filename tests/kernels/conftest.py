"""Kernel tests share the float64 reference of tests/ops (tests/ has no packages, so put it on the path)."""

from __future__ import annotations

import sys
from pathlib import Path

_OPS_TESTS = str(Path(__file__).resolve().parent.parent / "ops")
if _OPS_TESTS not in sys.path:
    sys.path.insert(0, _OPS_TESTS)
