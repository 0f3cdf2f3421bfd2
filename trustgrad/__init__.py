"""trustgrad: secure distributed training (Proof-of-Learning + CKKS homomorphic encryption) on torch.distributed.

The Python API (``trustgrad.api``): ``fit(model, dataset, ...)`` trains a user's own model factory with any pattern
and protection of ``trustgrad train`` and returns a ``TrainResult``; ``verify(proof, VerifyOptions(...))`` checks a
proof. (``fit``, not ``train``: ``trustgrad.train`` is the worker loop's module.) Names load on first use, so
``import trustgrad`` stays light for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["fit", "job_config", "run_job", "TrainResult", "EpochMetrics", "verify", "VerifyOptions", "Verdict"]

_LAZY = {
    "fit": "api",
    "job_config": "api",
    "run_job": "api",
    "TrainResult": "api",
    "EpochMetrics": "api",
    "verify": "proof",
    "VerifyOptions": "proof",
    "Verdict": "proof",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'trustgrad' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
