"""``trustgrad bench NAME [options]``: run one benchmark; it prints ratios against its anchor, measured in one run."""

from __future__ import annotations

import argparse

from ._registry_command import add_registry_command


def _registry():  # noqa: ANN202 - imported on use: benchmarks pull in OpenFHE and torch.distributed
    from ..bench import BENCHMARKS

    return BENCHMARKS


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_registry_command(
        sub,
        "bench",
        "measure speed or overhead against an anchor in the same run",
        _registry,
        lambda r: (r.table, {"name": r.name, "passed": r.passed, **r.data}),
    )
