"""``trustgrad experiment robustness``: robust aggregators and adaptive attacks against audits (docs/robustness.md)."""

from __future__ import annotations

from .experiment import run_experiment

__all__ = ["run_experiment"]
