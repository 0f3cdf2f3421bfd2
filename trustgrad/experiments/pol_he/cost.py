"""Part 3: what a verified (and an encrypted) step costs, measured in this run on this machine.

1. Direct: the median time of one honest worker gradient (plaintext step) and of one audit replay
   (:meth:`trustgrad.audit.Auditor.check`), both from part 1's honest trajectories.
2. Jobs: the server's loop seconds per model version for plaintext ``ps``, ``ps --proof audit --audit-rate 1``
   (part 2's honest runs) and ``ps --encrypt ckks`` with each key mode, run back to back with a plaintext job of the
   same seed so that they see the same machine load.
3. The blind step check (an SGD step recomputed on ciphertexts, only a distance decrypted): the function behind
   ``trustgrad bench blind``, run here with small repeats; its plaintext anchor is the numpy recomputation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...data import BatchPlan, load_dataset
from .detection import base_config, one_run

__all__ = ["measure"]

log = logging.getLogger(__name__)


def measure(s: Any, out: Path, data: dict[str, Any]) -> dict[str, Any]:
    from ...bench.blind import run as blind_run

    jobs: dict[str, dict[str, Any]] = {"plaintext": one_run(base_config(s, 0))}
    for keys in s.encrypted_keys:
        jobs[f"ckks {keys}"] = one_run(base_config(s, 0).replace(crypto={"encrypt": "ckks", "keys": keys}))
    blind = blind_run(batch=32, samples=64, repeats=s.blind_repeats, kinds=tuple(s.blind_kinds))
    per_epoch = BatchPlan(len(load_dataset("digits").x_train), s.workers, 0, 32).steps_per_epoch
    return {
        "direct": data["acceptance"]["median_seconds"],
        "jobs": jobs,
        "audit_jobs": {k: v["summary"] for k, v in data["detection"]["honest"].items() if k.startswith("sync/")},
        "blind": blind,
        "steps_per_epoch": per_epoch,
        "workers": s.workers,
    }
