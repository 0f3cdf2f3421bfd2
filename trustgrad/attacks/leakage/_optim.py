"""Shared machinery of the optimization attacks: restarts, NaN guards, timing (private)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...seeding import derive_seed
from .base import GroundTruth, LeakageResult, score

log = logging.getLogger(__name__)


@dataclass
class Trial:
    """One restart's outcome: the reconstruction (clipped to the box), its labels, objective and step count."""

    images: torch.Tensor
    labels: list[int]
    distance: float
    iterations: int


def best_of_restarts(
    name: str,
    run_one: Callable[[torch.Generator], Trial],
    *,
    restarts: int,
    seed: int,
    target_distance: float,
) -> tuple[Trial, int, float]:
    """Run up to ``restarts`` trials (each with its own seeded generator) and keep the one with the smallest finite
    objective; stop early once a trial reaches ``target_distance``. Returns (best, restarts used, seconds)."""
    start = time.perf_counter()
    best: Trial | None = None
    used = 0
    for r in range(max(1, restarts)):
        used = r + 1
        gen = torch.Generator().manual_seed(derive_seed(seed, name, r))
        trial = run_one(gen)
        log.debug("%s restart %d: distance %.3e after %d steps", name, r, trial.distance, trial.iterations)
        if not math.isfinite(trial.distance):
            log.info("%s restart %d diverged", name, r)
        if best is None or _key(trial.distance) < _key(best.distance):
            best = trial
        if math.isfinite(best.distance) and best.distance <= target_distance:
            break
    assert best is not None
    return best, used, time.perf_counter() - start


def _key(d: float) -> float:
    return d if math.isfinite(d) else math.inf


def result_from_trial(name: str, trial: Trial, used: int, seconds: float, truth: GroundTruth | None) -> LeakageResult:
    metrics, per = score(trial.images, trial.labels, truth) if truth is not None else ({}, ())
    return LeakageResult(
        attack=name,
        reconstruction=trial.images,
        labels=tuple(trial.labels),
        grad_distance=trial.distance,
        iterations=trial.iterations,
        seconds=seconds,
        restarts=used,
        metrics=metrics,
        per_image=per,
    )
