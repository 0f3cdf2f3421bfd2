"""When a parameter server lets a worker go on, and how it turns pushed gradients into updates.

Every schedule is one rule of stale-synchronous parallel (SSP; Ho et al., NIPS 2013, "More Effective Distributed ML
via a Stale Synchronous Parallel Parameter Server"): a worker whose clock (gradients pushed) is ``c`` may compute its
next gradient once the slowest live worker's clock is at least ``c - S``.

- ``sync`` (S = 0, aggregated): the server waits for one gradient from every live worker on the same version, applies
  their mean as one update, then releases everyone. This is exactly synchronous data parallelism (tested equal to
  ``allreduce``).
- ``ssp`` (S given): each gradient is applied on arrival; a worker more than S clocks ahead of the slowest waits.
- ``async`` (S = infinity): each gradient is applied on arrival and its sender gets the current model back at once
  (Downpour SGD, Dean et al. 2012). Staleness is unbounded.

Asynchronous updates use ``lr / W`` and DANA-Zero momentum (Hakimi et al., "Taming Momentum in a Distributed
Asynchronous Environment", 2019): one momentum buffer per worker, and workers compute on the look-ahead
``theta - lr/W * mu * sum_j v_j``. ``lr / W``: a pushed gradient averages one worker's batch, a W-th of what one
synchronous update averages, so W asynchronous updates move the model as far as one synchronous step. Why DANA: plain
momentum SGD at the server with gradients W-1 updates stale diverged here with the synchronous settings (measured in a
one-process simulation of digits/mlp, delay 3, lr 0.1/4, momentum 0.9: test accuracy 0.25 after 10 epochs, against
0.95 without delay; smaller rates or momentum gave 0.83-0.93); DANA-Zero reached 0.967 with the unchanged settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...config import RunConfig
from ...errors import ConfigError
from ...registry import Registry

__all__ = ["Schedule", "SCHEDULES", "schedule_for"]


@dataclass(frozen=True)
class Schedule:
    name: str
    bound: float  # S: how many clocks a worker may run ahead of the slowest live one
    aggregate: bool  # apply the mean of one gradient per live worker (sync) or each gradient on arrival
    tolerates_loss: bool  # a dead or silent worker is dropped (True) or fails the run (False)

    def lr_scale(self, workers: int) -> float:
        return 1.0 if self.aggregate else 1.0 / workers

    def may_proceed(self, next_clock: int, floor: float) -> bool:
        """SSP's rule: a worker about to compute clock ``next_clock`` waits until the slowest clock >= it - S."""
        return floor >= next_clock - self.bound


SCHEDULES: Registry = Registry("ps schedule")


@SCHEDULES.register("sync")
def _sync(cfg: RunConfig) -> Schedule:
    if cfg.pattern.staleness is not None:
        raise ConfigError("--staleness applies to --schedule ssp only (sync waits for every worker: staleness 0)")
    return Schedule("sync", 0, aggregate=True, tolerates_loss=False)


@SCHEDULES.register("async")
def _async(cfg: RunConfig) -> Schedule:
    if cfg.pattern.staleness is not None:
        raise ConfigError("--staleness applies to --schedule ssp only (async never waits: staleness is unbounded)")
    return Schedule("async", math.inf, aggregate=False, tolerates_loss=True)


@SCHEDULES.register("ssp")
def _ssp(cfg: RunConfig) -> Schedule:
    s = cfg.pattern.staleness
    if s is None:
        raise ConfigError("--schedule ssp needs --staleness S (a worker may run at most S clocks ahead), e.g. 2")
    if s < 0:
        raise ConfigError(f"--staleness must be >= 0, got {s}")
    return Schedule("ssp", s, aggregate=False, tolerates_loss=True)


def schedule_for(cfg: RunConfig) -> Schedule:
    """The validated schedule of ``cfg`` (unknown names and misplaced ``--staleness`` raise ``ConfigError``)."""
    return SCHEDULES.get(cfg.pattern.schedule)(cfg)
