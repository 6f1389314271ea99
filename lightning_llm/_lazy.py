"""Lazy package attributes (PEP 562): a name is imported from its module on first access, then cached."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` resolving ``exports`` (name -> defining module).

    ``namespace`` is the package's ``globals()``: a resolved name is stored there, so later look-ups skip the hook.
    """

    def __getattr__(name: str) -> Any:
        module_path = exports.get(name)
        if module_path is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_path), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
