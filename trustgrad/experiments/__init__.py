"""Experiments: ``trustgrad experiment NAME --out DIR``. Each writes JSON, a markdown table and PNG plots.

An experiment is a module here that registers ``run(args: list[str]) -> ExperimentResult`` under its name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..plugins import import_submodules
from ..registry import Registry

__all__ = ["EXPERIMENTS", "ExperimentResult"]


@dataclass(frozen=True)
class ExperimentResult:
    name: str
    table: str  # markdown
    out: Path  # folder holding results.json, results.md and the PNGs
    data: dict[str, Any] = field(default_factory=dict)


EXPERIMENTS: Registry[Callable[[list[str]], ExperimentResult]] = Registry("experiment")

import_submodules(sys.modules[__name__])
