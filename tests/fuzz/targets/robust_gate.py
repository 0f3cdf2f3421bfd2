"""Fuzz target: ``--aggregate`` specs (flags, TOML, experiment arguments) and the rounds a robust gate aggregates.

A case mutates an honest spec (a few characters or a random one) and builds a round of updates a colluding worker
controls entirely: any values (NaN, inf, huge, denormal), any number of rows. What must hold for every accepted
spec and round: the update is finite, every non-finite row is refused with a reason, and the update stays inside the
per-coordinate range of the finite rows (Krum, Multi-Krum, median, trimmed mean and Bulyan are convex combinations
per coordinate) or, for centered clipping, within tau of its previous center.
"""

from __future__ import annotations

import math

import torch

from tests.fuzz.harness import Finding
from trustgrad.errors import ConfigError
from trustgrad.robust import Gate, parse_aggregate

NAME = "robust-gate"
HONEST = ["mean", "krum,f=1", "multi-krum,f=1,m=3", "median", "trimmed-mean,trim=0.2", "bulyan,f=1",
          "centered-clipping,tau=0.5,iters=3"]  # fmt: skip
SPECIALS = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-45, 0.0]


def setup(workdir):
    return None


def _spec(rng) -> str:
    spec = rng.choice(HONEST)
    for _ in range(rng.randint(0, 3)):
        i = rng.randrange(len(spec) + 1)
        spec = spec[:i] + rng.choice("=,.-+e0123456789xf \x00") + spec[i + rng.randint(0, 1) :]
    return spec


def _round(rng) -> torch.Tensor:
    n, d = rng.randint(1, 12), rng.randint(1, 6)
    g = torch.tensor([[rng.gauss(0, 1) for _ in range(d)] for _ in range(n)], dtype=torch.float32)
    for _ in range(rng.randint(0, 2 * n)):
        g[rng.randrange(n), rng.randrange(d)] = rng.choice(SPECIALS)
    return g


def case(state, rng):
    spec = _spec(rng)
    try:
        gate = Gate(parse_aggregate(spec))
        g = _round(rng)
        center = torch.tensor([rng.gauss(0, 1) for _ in range(g.shape[1])], dtype=torch.float64)
        gate.center = center.clone()
        verdict = gate(g)
    except ConfigError as exc:
        if "\n" in str(exc):
            raise
        return "refused"
    finite = torch.isfinite(g).all(1)
    bad = {i for i in range(len(g)) if not bool(finite[i])}
    if set(verdict.reasons) != bad or not bad <= set(verdict.excluded):
        raise Finding("silent-accept", f"{spec!r}: non-finite rows {sorted(bad)} but reasons {verdict.reasons}")
    if not bool(torch.isfinite(verdict.update).all()):
        raise Finding(
            "silent-accept", f"{spec!r}: a non-finite update from finite rows {sorted(set(range(len(g))) - bad)}"
        )
    kept = g[finite].double()
    if len(kept) == 0:
        if float(verdict.update.abs().sum()) != 0:
            raise Finding("silent-accept", f"{spec!r}: a non-zero update from no usable row")
        return "accepted"
    if gate.rule.name == "centered-clipping":
        moved = float((verdict.update.double() - center).norm())
        limit = gate.rule.tau * gate.rule.iters * (1 + 1e-6)
        if not (math.isfinite(moved) and moved <= limit):
            raise Finding("silent-accept", f"{spec!r}: centered clipping moved {moved} > tau x iters = {limit}")
        return "accepted"
    # float32 rounding of the update: allow one part in 1e6 of the range's magnitude
    slack = 1e-6 * kept.abs().max(0).values + 1e-30
    u = verdict.update.double()
    if bool((u < kept.min(0).values - slack).any() or (u > kept.max(0).values + slack).any()):
        raise Finding("silent-accept", f"{spec!r}: update outside the honest-or-not finite rows' range")
    return "accepted"
