"""The one multi-process harness for distributed tests (docs/architecture.md §5).

``run_ranks(fn, world_size, *args)`` starts ``world_size`` real processes (forked from a clean fork server;
rendezvous through a file in a temporary folder: never a fixed port), joins them into a gloo process group whose
every collective has a timeout, runs ``fn(ctx, *args)`` on each and returns the per-rank values. A child's exception
fails the test with the child's traceback; a job that exceeds ``job_timeout`` fails instead of hanging. ``fn`` must
be defined at module level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trustgrad.errors import LaunchError
from trustgrad.launch import spawn

COLLECTIVE_TIMEOUT = 60.0
JOB_TIMEOUT = 240.0


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, job_timeout: float = JOB_TIMEOUT, **kw: Any
) -> list[Any]:
    try:
        return spawn(fn, world_size, args, timeout=kw.pop("timeout", COLLECTIVE_TIMEOUT), job_timeout=job_timeout, **kw)
    except LaunchError as exc:
        detail = f"\n--- traceback of rank {exc.rank} ---\n{exc.remote_traceback}" if exc.remote_traceback else ""
        raise AssertionError(f"{exc}{detail}") from None


def flooding_tolerance(cfg: Any) -> float:
    """How far threshold CKKS's flooding noise moves a run's weights against the plaintext run: each step's mean
    carries noise of sigma * sqrt(W) / W per weight, momentum m sums it 1 / (1 - m) times, the steps add up as a random
    walk; 6 such standard deviations (the max over every weight). Measured: 5.2e-4 (ring, 8 steps) and 5.3e-4 (ps, 6
    steps) against 1.5e-3 and 1.3e-3."""
    from trustgrad.crypto import FLOODING

    per_step = cfg.lr / (1 - cfg.momentum) * FLOODING.sigma(50) * cfg.workers**-0.5
    return 6 * per_step * cfg.max_steps**0.5
