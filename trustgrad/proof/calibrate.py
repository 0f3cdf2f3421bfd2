"""Calibrating the verifier's thresholds from measured honest reproduction error.

Thresholds must separate honest noise from forgery. On CPU the noise has two sources, both measured here by
re-executing *every* segment of honest proofs: the thread count (a different reduction order in BLAS; a replay at the
prover's thread count is bit-exact) and, for data-parallel jobs, summing per-worker gradients over the network versus
one gradient on the concatenated batch. Both stay around 1e-7 of the update's norm (docs/architecture.md §6: 3-4e-7 l2
across 1 vs 2 threads at k=10), while a wrong batch or a missing momentum buffer is off by >= 10% of it. ``suggest``
puts the relative thresholds ``margin`` times above the worst honest error seen (and keeps them far below the
forgeries), and the update lower bound ``1 / margin_bound`` below the smallest honest ratio.

>>> # m = measure("OUT/proof", threads=2); suggest([m])  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .replay import Thresholds
from .verifier import VerifyOptions, verify

__all__ = ["Measurement", "measure", "suggest"]


@dataclass(frozen=True)
class Measurement:
    """Worst honest errors of one proof (all segments re-executed) and its smallest update-to-step ratio."""

    segments: int
    rel_l1: float
    rel_l2: float
    rel_linf: float
    cos: float
    min_update_ratio: float


def measure(path: str | Path, threads: int | None = None) -> Measurement:
    """Re-execute every segment of an honest proof (``--all``) and report the worst relative distances.

    Measured with thresholds wide open, so the figures are what honest replay produces, not what passed.
    """
    loose = Thresholds(rel_l1=1e9, rel_l2=1e9, rel_linf=1e9, cos=2.0, min_update_ratio=0.0)
    v = verify(path, VerifyOptions(check_all=True, threads=threads, thresholds=loose))
    if not v.valid:
        raise ValueError(f"not a well-formed proof: {v.reasons}")
    worst = {"l1": 0.0, "l2": 0.0, "linf": 0.0, "cos": 0.0}
    for seg in v.segments:
        d = seg.distances
        for m, ref in (("l1", d.ref_l1), ("l2", d.ref_l2), ("linf", d.ref_linf)):
            worst[m] = max(worst[m], getattr(d, m) / max(ref, 1e-300))
        worst["cos"] = max(worst["cos"], d.cos)
    ratio = v.min_update_ratio if v.min_update_ratio is not None else float("inf")
    return Measurement(len(v.segments), worst["l1"], worst["l2"], worst["linf"], worst["cos"], ratio)


def suggest(measurements: list[Measurement], margin: float = 100.0, margin_bound: float = 2.0) -> Thresholds:
    """Thresholds ``margin`` x above the worst honest error, bound ``margin_bound`` x below the smallest ratio."""
    worst = lambda m: max(getattr(x, m) for x in measurements)  # noqa: E731
    return Thresholds(
        rel_l1=margin * worst("rel_l1"),
        rel_l2=margin * worst("rel_l2"),
        rel_linf=margin * worst("rel_linf"),
        cos=max(margin * margin * worst("cos"), 1e-12),  # cos distance ~ (relative error)^2 / 2
        min_update_ratio=min(x.min_update_ratio for x in measurements) / margin_bound,
    )
