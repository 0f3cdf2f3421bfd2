"""Import every module of a package once, so the registries fill themselves (no hand-kept import lists)."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["import_submodules"]


def import_submodules(package: ModuleType) -> None:
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
