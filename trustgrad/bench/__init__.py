"""Benchmarks: ``trustgrad bench NAME``. Each measures its anchor in the same run and reports ratios against it.

A benchmark is a module here that registers ``run(args: list[str]) -> BenchResult`` under its name. Timings are
never asserted in tests (honest measurement: ratios on the same machine in the same run, printed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..plugins import import_submodules
from ..registry import Registry

__all__ = ["BENCHMARKS", "BenchResult"]


@dataclass(frozen=True)
class BenchResult:
    name: str
    table: str  # a markdown table for people
    data: dict[str, Any] = field(default_factory=dict)  # the numbers, for --json
    passed: bool | None = None  # whether the stated target was met (None: no target)


BENCHMARKS: Registry[Callable[[list[str]], BenchResult]] = Registry("benchmark")

import_submodules(sys.modules[__name__])
