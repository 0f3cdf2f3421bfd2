"""Tracking where users already look: a run's per-epoch metrics and its protections' statistics as TensorBoard
scalars (``--tensorboard DIR``), written beside the JSON records from the same values.

Only the coordinating side writes (the process that writes ``summary.json``), once, after the run: ranks never open
a writer, so a job has one event file per run. Tags: ``epoch/<metric>`` at step = epoch (every number of a
``metrics.jsonl`` line) and ``summary/<field>`` at the last epoch (every number of ``summary.json``: accuracy, loss,
audited and rejected claims, CKKS seconds and bytes, staleness, ...). TensorBoard stores float32: a value reads back
as ``float32(value)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_tensorboard", "scalars"]

log = logging.getLogger(__name__)


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric fields of a record (booleans, strings, lists and non-finite numbers are not scalars)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def write_tensorboard(folder: str | Path, summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> Path:
    """Write one event file of the run into ``folder``; returns the folder."""
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(folder)
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for line in metrics:
            epoch = int(line.get("epoch", 0))
            for key, value in scalars(line).items():
                if key != "epoch":
                    writer.add_scalar(f"epoch/{key}", value, epoch)
        last = int(metrics[-1].get("epoch", 0)) if metrics else 0
        for key, value in scalars(summary).items():
            writer.add_scalar(f"summary/{key}", value, last)
        writer.flush()
    finally:
        writer.close()
    log.info("tensorboard events written to %s", folder)
    return folder
