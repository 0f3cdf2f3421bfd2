"""The audit threshold policies (``--audit-threshold``): their names, the floor each takes from a calibration's
measurement, and the parser the config validates the flag with.

They sit below ``config`` (which checks a policy where it is given) and ``audit.calibration`` (which measures the
honest floor and sets the threshold from it: ``decide``); docs/architecture.md §2.

>>> parse_policy("cross-thread"), parse_policy("3e-4")
('cross-thread', 0.0003)
>>> parse_policy("loose")
Traceback (most recent call last):
...
trustgrad.errors.ConfigError: audit_threshold must be one of calibrated, cross-thread or a number in [0, 1), got 'loose'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    from .audit.calibration import Measured

__all__ = ["THRESHOLD_POLICIES", "parse_policy"]


def _calibrated(m: Measured) -> tuple[float, str]:
    return m.same_threads, "replay at the workers' thread count"


def _cross_thread(m: Measured) -> tuple[float, str]:
    return max(m.same_threads, m.cross_threads, m.float64), "replay across thread counts and float32/float64"


#: policy -> (floor, what the floor measures). "calibrated" is for workers on the auditor's platform (every local
#: job); "cross-thread" for workers whose thread count or precision may differ from the auditor's.
THRESHOLD_POLICIES: Registry = Registry("audit threshold policy")
THRESHOLD_POLICIES.register("calibrated")(_calibrated)
THRESHOLD_POLICIES.register("cross-thread")(_cross_thread)


def parse_policy(text: str) -> str | float:
    """A policy name or an explicit threshold (a number >= 0); a one-line ``ConfigError`` otherwise."""
    if text in THRESHOLD_POLICIES:
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        known = ", ".join(THRESHOLD_POLICIES.names())
        raise ConfigError(f"audit_threshold must be one of {known} or a number in [0, 1), got {text!r}")
    return value
