"""``trustgrad experiment NAME [options]``: run one experiment; it writes JSON, markdown and PNGs under --out."""

from __future__ import annotations

import argparse

from ._registry_command import add_registry_command


def _registry():  # noqa: ANN202 - imported on use
    from ..experiments import EXPERIMENTS

    return EXPERIMENTS


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_registry_command(
        sub,
        "experiment",
        "run one of the paper's experiments end to end (tables and plots)",
        _registry,
        lambda r: (f"{r.table}\n\nwritten to {r.out}", {"name": r.name, "out": str(r.out), **r.data}),
    )
